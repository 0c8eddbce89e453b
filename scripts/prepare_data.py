#!/usr/bin/env python3
"""Build the training data and tokenizer for the bundled "tiny" MoE model.

Sources (Debian packages, located through ``dpkg -L``):

* ``jargon-text``  - the Jargon File 4.4.7 (public domain)
* ``fortunes`` and ``fortunes-min`` - BSD fortune collections (the ``off/``
  directory of offensive fortunes is never read)
* ``python3-doc`` (content in ``python3.X-doc``) - the Python documentation
  as HTML (PSF licence), reduced to text with the stdlib ``html.parser``

Install them first::

    apt-get install -y jargon-text fortunes fortunes-min python3-doc

Then, from the repository root::

    python3 scripts/prepare_data.py            # --seed 1234 by default

Outputs:

* ``data/train.bin``, ``data/heldout.bin``: uint16 token ids, documents
  concatenated, each followed by ``<|endoftext|>`` (id 0); ``data/`` is
  git-ignored. ``data/train.txt`` holds the exact text that was tokenized.
* ``fate_cli/models/tiny/heldout.txt``: held-out plain prose, documents
  separated by one blank line (documents themselves contain no blank line).
* ``fate_cli/models/tiny/tokenizer.json`` and ``tokenizer_config.json``:
  byte-level BPE, vocabulary 4096, trained on the train split only.
* ``fate_cli/models/tiny/DATA.md``: provenance, licences and sizes.

Everything is a deterministic function of ``--seed`` and the package contents.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]  # ids 0, 1, 2
VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 1024

# Held-out target per source, in bytes of UTF-8 text (about 340 KB in all).
HELDOUT_BYTES = {"jargon": 110_000, "fortunes": 80_000, "pydoc": 150_000}

# Fortune files left out besides off/: ascii-art depends on exact layout,
# ethnic and men-women are mostly stereotype jokes.
FORTUNE_DENYLIST = {"ascii-art", "ethnic", "men-women"}

PYDOC_SKIP = re.compile(
    r"^(genindex.*|search|py-modindex|contents|license|copyright|about|bugs|"
    r"download|whatsnew/changelog)\.html$"
)

MAX_DOC_CHARS = 8000

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful assistant."]

JARGON_QUESTIONS = [
    "What does {t} mean?",
    "What does {t} mean?",
    "What is {t}?",
    "Define {t}.",
    'What does the jargon term "{t}" mean?',
    "In hacker slang, what does {t} mean?",
    "Explain the hacker term {t}.",
    "What is meant by {t}?",
]
FORTUNE_PROMPTS = [
    "Tell me a fortune.",
    "Tell me a fortune.",
    "Say something wise.",
    "Give me a fortune cookie.",
    "Tell me something funny.",
    "Share a quote with me.",
    "Fortune, please.",
]
PY_FUNC_QUESTIONS = [
    "What does {n}() do?",
    "What does {n}() do in Python?",
    "Explain {n}() in Python.",
    "What is {n}() for?",
]
PY_CLASS_QUESTIONS = [
    "What is {n} in Python?",
    "What is the {n} class for?",
    "Explain {n} in Python.",
]
PY_ATTR_QUESTIONS = ["What is {n} in Python?", "What is {n}?"]
PY_GLOSSARY_QUESTIONS = [
    "What is {n} in Python?",
    'What does "{n}" mean in Python?',
    "Define the Python term {n}.",
]


@dataclass
class Doc:
    source: str  # "jargon" | "fortunes" | "pydoc"
    kind: str  # "jargon_entry" | "jargon_prose" | "fortune" | "pydoc"
    text: str  # plain form: no blank lines inside
    qa: list[tuple[str, str]] = field(default_factory=list)  # (question template, answer)
    origin: str = ""


# --------------------------------------------------------------------------- text utils


def squash_blank_lines(text: str) -> str:
    """Strip trailing spaces and drop blank lines, so documents never contain one."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(ln for ln in lines if ln.strip()).strip("\n")


def collapse_ws(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def dpkg_files(package: str) -> list[Path]:
    out = subprocess.run(["dpkg", "-L", package], check=True, capture_output=True, text=True)
    return [Path(p) for p in out.stdout.splitlines() if p.strip()]


def dpkg_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], check=True, capture_output=True, text=True)
    return out.stdout.strip()


# --------------------------------------------------------------------------- Jargon File

_BOX = re.compile(r"[\u2500-\u257f]")
_ENTRY = re.compile(r"^   :(.+?):(?:\s+(.*))?$")


def _jargon_paragraphs(lines: list[str]) -> list[str]:
    """Group lines into paragraphs; reflow plain ones, keep indented ones as is."""
    paras: list[list[str]] = []
    cur: list[str] = []
    for ln in lines:
        if ln.strip():
            cur.append(ln.rstrip())
        elif cur:
            paras.append(cur)
            cur = []
    if cur:
        paras.append(cur)
    out = []
    for p in paras:
        plain = all(len(ln) - len(ln.lstrip(" ")) == 3 for ln in p) and not any(_BOX.search(ln) for ln in p)
        if plain:
            out.append(collapse_ws(" ".join(p)))
        else:
            out.append("\n".join(ln.expandtabs(8)[3:] if ln.startswith("   ") else ln.strip() for ln in p))
    # Drop the Crunchly cartoon captions: "(The next cartoon ...)" and the short caption before it.
    keep: list[str] = []
    for para in out:
        if "Crunchly" in para and para.startswith("("):
            if keep and len(keep[-1]) < 100 and "\n" not in keep[-1]:
                keep.pop()
            continue
        keep.append(para)
    return keep


def _unbrace(text: str) -> str:
    return re.sub(r"\{([^{}]+)\}", r"\1", text)


def load_jargon(path: Path) -> list[Doc]:
    lines = read_text(path).replace("\xa0", " ").split("\n")
    docs: list[Doc] = []

    def col0(ln: str) -> bool:
        return bool(ln) and not ln[0].isspace()

    idx_ch1 = next(i for i, ln in enumerate(lines) if ln.startswith("Chapter") and "1." in ln)
    idx_gloss = next(i for i, ln in enumerate(lines) if ln == "Glossary" and i > idx_ch1)
    idx_app = next(i for i, ln in enumerate(lines) if ln.startswith("Appendix A."))

    # Prose: introduction chapters and the appendices, split at column-0 headings.
    def prose(a: int, b: int) -> None:
        heading, body = "", []
        for ln in lines[a:b] + ["<END>"]:
            if col0(ln):
                paras = [p for p in _jargon_paragraphs(body) if len(p) > 1]
                text = _unbrace(squash_blank_lines("\n".join([collapse_ws(heading)] + paras)))
                if paras and sum(len(p) for p in paras) / len(paras) > 40 and len(text) > 200:
                    docs.extend(
                        Doc("jargon", "jargon_prose", chunk, origin=f"jargon:{collapse_ws(heading)}")
                        for chunk in chunk_text(text)
                    )
                heading, body = ln, []
            else:
                body.append(ln)

    prose(idx_ch1, idx_gloss)
    prose(idx_app, len(lines))

    # Lexicon entries: ":term: pronunciation, part of speech" then paragraphs,
    # until the next entry or a letter heading (two-space indent).
    term, rest, body = None, "", []

    def flush() -> None:
        if term is None:
            return
        paras = _jargon_paragraphs(body)
        if not paras:
            return
        definition = _unbrace(squash_blank_lines("\n".join(paras)))
        header = f"{term}: {rest}".strip() if rest else f"{term}:"
        docs.append(
            Doc(
                "jargon",
                "jargon_entry",
                squash_blank_lines(f"{header}\n{definition}"),
                qa=[("jargon:" + term, definition)],
                origin=f"jargon-entry:{term}",
            )
        )

    for ln in lines[idx_gloss:idx_app]:
        m = _ENTRY.match(ln)
        if m:
            flush()
            term, rest, body = m.group(1).strip(), (m.group(2) or "").strip(), []
        elif term is not None and (re.match(r"^  \S", ln) or col0(ln)):
            flush()
            term, rest, body = None, "", []
        elif term is not None:
            body.append(ln)
    flush()
    return docs


# --------------------------------------------------------------------------- fortunes


def load_fortunes(files: list[Path]) -> tuple[list[Doc], list[str]]:
    docs: list[Doc] = []
    used: list[str] = []
    for path in files:
        if "off" in path.parts or path.name in FORTUNE_DENYLIST or path.suffix in {".dat", ".u8"}:
            continue
        if not path.is_file() or path.is_symlink():
            continue
        used.append(path.name)
        for raw in re.split(r"^%\s*$", read_text(path), flags=re.M):
            lines = [collapse_ws(ln) for ln in raw.split("\n")]
            text = "\n".join(ln for ln in lines if ln)
            if not (20 <= len(text) <= 2000):
                continue
            letters = sum(c.isalpha() for c in text)
            if letters < 0.6 * len(text.replace(" ", "").replace("\n", "")):
                continue  # ASCII art, tables of symbols
            docs.append(Doc("fortunes", "fortune", text, qa=[("fortune", text)], origin=f"fortune:{path.name}"))
    return docs, used


# --------------------------------------------------------------------------- Python docs

_BLOCK_TAGS = {
    "p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr",
    "section", "dl", "ul", "ol", "table", "blockquote", "caption", "figure", "hr", "br",
}  # fmt: skip
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"}
_API_KINDS = {"function", "method", "classmethod", "staticmethod", "class", "exception",
              "decorator", "attribute", "data", "glossary"}  # fmt: skip


class _SphinxText(HTMLParser):
    """Text of a Sphinx page's main body as blocks: (kind, text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, is_main, is_skipped)
        self.main = 0
        self.skip = 0
        self.pre = 0
        self.buf: list[str] = []
        self.blocks: list[tuple[str, str]] = []
        self.prefix = ""
        self.heading = ""
        # API entries: stack of [kind, id, signature, dd_start_block]
        self.dl: list[list] = []
        self.api: list[tuple[str, str, str, str, int]] = []  # kind, name, signature, first para, block idx

    def _kind(self) -> str:
        for tag, _, _ in reversed(self.stack):
            if tag in {"pre", "dt", "li", "p", "h1", "h2", "h3", "h4", "h5", "h6"}:
                return tag
        return "p"

    def _flush(self, kind: str | None = None) -> None:
        text = "".join(self.buf)
        self.buf = []
        kind = kind or self._kind()
        if kind == "pre":
            text = squash_blank_lines(text.expandtabs(8))
        else:
            text = collapse_ws(text)
        if not text:
            return
        if self.prefix and kind != "pre":
            text, self.prefix = self.prefix + text, ""
        self.blocks.append((kind, text))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        classes = set(a.get("class", "").split())
        if tag in _VOID_TAGS:
            if self.main and not self.skip and tag in _BLOCK_TAGS:
                self._flush()
            return
        is_main = tag == "div" and a.get("role") == "main"
        is_skip = bool(
            tag in {"script", "style", "nav"}
            or (tag == "a" and "headerlink" in classes)
            or (tag == "div" and classes & {"toctree-wrapper", "sphinxsidebar", "related", "footer"})
        )
        if self.main and not self.skip:
            if tag in _BLOCK_TAGS:
                self._flush()
            if tag == "li":
                self.prefix = "- "
            elif tag in {"td", "th"} and self.buf and "".join(self.buf).strip():
                self.buf.append(" | ")
            elif tag == "dl":
                kind = next((c for c in classes if c in _API_KINDS), "")
                self.dl.append([kind if ("py" in classes or kind == "glossary") else "", "", "", -1])
            elif tag == "dt" and self.dl and self.dl[-1][0] and not self.dl[-1][1]:
                self.dl[-1][1] = a.get("id", "") or "?"
                self.dl[-1][2] = len(self.blocks)
            elif tag == "dd" and self.dl and self.dl[-1][0] and self.dl[-1][3] < 0:
                self.dl[-1][3] = len(self.blocks)
        self.stack.append((tag, is_main, is_skip))
        self.main += is_main
        self.skip += is_skip
        self.pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS or not any(t == tag for t, _, _ in self.stack):
            return
        while self.stack:
            t, is_main, is_skip = self.stack[-1]
            if self.main and not self.skip and t in _BLOCK_TAGS:
                self._flush()
            self.stack.pop()
            self.main -= is_main
            self.skip -= is_skip
            self.pre -= t == "pre"
            if self.main and not self.skip:
                if t == "dd" and self.dl and self.dl[-1][0] and self.dl[-1][3] >= 0:
                    kind, ident, sig_at, dd_at = self.dl[-1]
                    sig = self.blocks[sig_at][1] if sig_at < len(self.blocks) else ""
                    para = next((x for k, x in self.blocks[dd_at:] if k == "p"), "")
                    if para:
                        self.api.append((kind, ident, sig, para, len(self.blocks)))
                    self.dl[-1][1], self.dl[-1][3] = "", -1  # ready for the next dt/dd pair
                elif t == "dl" and self.dl:
                    self.dl.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        if self.main and not self.skip:
            self.buf.append(data)


def chunk_text(text: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """Split at line boundaries into pieces of at most ~limit characters."""
    if len(text) <= limit:
        return [text]
    out, cur, size = [], [], 0
    for ln in text.split("\n"):
        if cur and size + len(ln) > limit:
            out.append("\n".join(cur))
            cur, size = [], 0
        cur.append(ln)
        size += len(ln) + 1
    if cur:
        out.append("\n".join(cur))
    return out


def _api_qa(kind: str, ident: str, sig: str, para: str) -> tuple[str, str] | None:
    if kind == "glossary":
        term = sig.strip()
        if not term or len(term) > 60:
            return None
        return ("py-glossary:" + term, para)
    name = ident if re.fullmatch(r"[A-Za-z_][\w.]*", ident) else ""
    if not name:
        return None
    answer = f"{sig}\n{para}" if sig and len(sig) < 200 else para
    return (f"py-{kind}:{name}", answer)


def load_pydoc(root: Path) -> tuple[list[Doc], int]:
    docs: list[Doc] = []
    pages = 0
    for path in sorted(root.rglob("*.html")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("_") or PYDOC_SKIP.match(rel):
            continue
        parser = _SphinxText()
        parser.feed(read_text(path))
        parser.close()
        if not parser.blocks:
            continue
        pages += 1
        title = next((t for k, t in parser.blocks if k == "h1"), rel)
        # Sections start at h1/h2; each block index maps to its section.
        sections: list[tuple[int, list[str]]] = []
        for i, (kind, text) in enumerate(parser.blocks):
            if kind == "h1":
                sections.append((i, [text]))
            elif kind == "h2" or not sections:
                sections.append((i, [title, text]))
            else:
                sections[-1][1].append(text)
        starts = [s for s, _ in sections]
        section_docs: list[list[Doc]] = []
        for _, parts in sections:
            text = squash_blank_lines("\n".join(parts))
            if len(text) < 200:
                section_docs.append([])
                continue
            section_docs.append([Doc("pydoc", "pydoc", chunk, origin=f"pydoc:{rel}") for chunk in chunk_text(text)])
        for kind, ident, sig, para, at in parser.api:
            qa = _api_qa(kind, ident, sig, para)
            if qa is None:
                continue
            sec = max(i for i, s in enumerate(starts) if s <= max(at - 1, 0))
            if section_docs[sec]:
                section_docs[sec][0].qa.append(qa)
        for group in section_docs:
            docs.extend(group)
    return docs, pages


# --------------------------------------------------------------------------- chat rendering


def chatml(messages: list[tuple[str, str]]) -> str:
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)


def question_for(key: str, rng: random.Random) -> str:
    kind, _, name = key.partition(":")
    if kind == "jargon":
        return rng.choice(JARGON_QUESTIONS).format(t=name)
    if kind == "fortune":
        return rng.choice(FORTUNE_PROMPTS)
    if kind == "py-glossary":
        return rng.choice(PY_GLOSSARY_QUESTIONS).format(n=name)
    if kind in {"py-class", "py-exception"}:
        return rng.choice(PY_CLASS_QUESTIONS).format(n=name)
    if kind in {"py-attribute", "py-data"}:
        return rng.choice(PY_ATTR_QUESTIONS).format(n=name)
    return rng.choice(PY_FUNC_QUESTIONS).format(n=name)


def render_train(docs: list[Doc], rng: random.Random) -> tuple[list[str], dict[str, int]]:
    """Plain documents plus chat conversations built from the docs' QA pairs."""
    out: list[str] = []
    exchanges: list[tuple[str, str]] = []
    stats = {"plain": 0, "chat": 0, "exchanges": 0}
    chat_prob = {"jargon_entry": 0.7, "fortune": 0.35}
    for d in docs:
        if d.kind in chat_prob:
            if rng.random() < chat_prob[d.kind]:
                exchanges.extend((question_for(k, rng), a) for k, a in d.qa)
                continue
        elif d.kind == "pydoc":
            exchanges.extend((question_for(k, rng), a) for k, a in d.qa if rng.random() < 0.5)
        out.append(d.text)
        stats["plain"] += 1
    rng.shuffle(exchanges)
    stats["exchanges"] = len(exchanges)
    i = 0
    while i < len(exchanges):
        n = rng.choice([1, 1, 1, 2, 2, 3])
        msgs: list[tuple[str, str]] = []
        if rng.random() < 0.2:
            msgs.append(("system", rng.choice(SYSTEM_PROMPTS)))
        for q, a in exchanges[i : i + n]:
            msgs += [("user", q), ("assistant", a)]
        out.append(chatml(msgs))
        stats["chat"] += 1
        i += n
    rng.shuffle(out)
    return out, stats


# --------------------------------------------------------------------------- tokenizer

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def train_tokenizer(texts: list[str]):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    split = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))

    def pieces():
        for t in texts:
            yield from (p for p in split.split(t) if p)

    tok.train_from_iterator(pieces(), trainer=trainer)
    return tok


def tokenizer_config() -> dict:
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def encode_docs(tok, docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(0)
    arr = np.asarray(ids, dtype=np.int64)
    assert arr.max() < 2**16
    return arr.astype(np.uint16)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--data-dir", type=Path, default=REPO / "data")
    ap.add_argument("--model-dir", type=Path, default=REPO / "fate_cli" / "models" / "tiny")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)

    # --- locate sources through dpkg
    jargon_path = next(p for p in dpkg_files("jargon-text") if p.name == "jargon.txt.gz")
    fortune_files = sorted(
        {
            p
            for pkg in ("fortunes", "fortunes-min")
            for p in dpkg_files(pkg)
            if "games" in p.parts and "fortunes" in p.parts
        }
    )
    pydoc_link = next(p for p in dpkg_files("python3-doc") if p.name == "html" and "python3-doc" in p.parts)
    pydoc_root = pydoc_link.resolve()
    pydoc_pkg = subprocess.run(
        ["dpkg-query", "-S", str(pydoc_root)], check=True, capture_output=True, text=True
    ).stdout.split(":")[0]
    packages = ["jargon-text", "fortunes", "fortunes-min", "python3-doc", pydoc_pkg]
    versions = {p: dpkg_version(p) for p in packages}

    # --- load and clean
    jargon = load_jargon(jargon_path)
    fortunes, fortune_used = load_fortunes(fortune_files)
    pydoc, pydoc_pages = load_pydoc(pydoc_root)
    raw_bytes = {
        "jargon": len(gzip.decompress(jargon_path.read_bytes())),
        "fortunes": sum(p.stat().st_size for p in fortune_files if p.name in fortune_used),
        "pydoc": sum(p.stat().st_size for p in pydoc_root.rglob("*.html")),
    }

    docs: list[Doc] = []
    seen: set[str] = set()
    for d in jargon + fortunes + pydoc:
        key = collapse_ws(d.text).lower()
        if key in seen:
            continue
        seen.add(key)
        docs.append(d)

    # --- split by document: seeded shuffle per source, held-out taken from the front
    heldout: list[Doc] = []
    train: list[Doc] = []
    for source in ("jargon", "fortunes", "pydoc"):
        group = [d for d in docs if d.source == source]
        rng.shuffle(group)
        size = 0
        for d in group:
            n = len(d.text.encode())
            if size < HELDOUT_BYTES[source] and n <= 4000:
                heldout.append(d)
                size += n
            else:
                train.append(d)
    train_texts, chat_stats = render_train(train, rng)
    train_texts = [t + EOT for t in train_texts]

    # --- tokenizer (train split only)
    tok = train_tokenizer(train_texts)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    probes = [
        "Hello, world!\n\n  indented\ttab\r\nCRLF",
        "naïve café — “quotes” ‘single’ 😀 中文 \x00\x7f",
        chatml([("user", "What does hack mean?"), ("assistant", "A quick job.")]) + EOT,
        "".join(d.text for d in heldout[:50]),
    ]
    for p in probes:
        assert tok.decode(tok.encode(p).ids, skip_special_tokens=False) == p, repr(p[:80])

    args.model_dir.mkdir(parents=True, exist_ok=True)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.model_dir / "tokenizer.json"))
    (args.model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")

    # --- token files
    train_ids = encode_docs(tok, train_texts)
    heldout_ids = encode_docs(tok, [d.text for d in heldout])
    train_ids.tofile(args.data_dir / "train.bin")
    heldout_ids.tofile(args.data_dir / "heldout.bin")
    (args.data_dir / "train.txt").write_text("".join(train_texts))
    heldout_text = "\n\n".join(d.text for d in heldout) + "\n"
    (args.model_dir / "heldout.txt").write_text(heldout_text)

    # --- provenance
    def nbytes(ds: list[Doc], src: str) -> int:
        return sum(len(d.text.encode()) for d in ds if d.source == src)

    train_bytes = sum(len(t.encode()) for t in train_texts)
    rows = []
    for src in ("jargon", "fortunes", "pydoc"):
        rows.append(
            f"| {src} | {raw_bytes[src]:,} | {nbytes(docs, src):,} | "
            f"{sum(d.source == src for d in train):,} / {nbytes(train, src):,} | "
            f"{sum(d.source == src for d in heldout):,} / {nbytes(heldout, src):,} |"
        )
    source_rows = "\n".join(
        "| " + " | ".join(row) + " |"
        for row in [
            ("jargon-text", versions["jargon-text"], f"The Jargon File 4.4.7 (`{jargon_path}`)", "public domain"),
            ("fortunes", versions["fortunes"], "BSD fortune collections", "BSD (`/usr/share/doc/fortunes/copyright`)"),
            (
                "fortunes-min",
                versions["fortunes-min"],
                "fortunes, literature, riddles",
                "BSD (`/usr/share/doc/fortunes-min/copyright`)",
            ),
            (
                f"python3-doc / {pydoc_pkg}",
                f"{versions['python3-doc']} / {versions[pydoc_pkg]}",
                f"Python documentation HTML (`{pydoc_root}`)",
                "PSF License Agreement (documentation); code examples also 0BSD",
            ),
        ]
    )
    tok_sha = hashlib.sha256((args.model_dir / "tokenizer.json").read_bytes()).hexdigest()[:16]
    data_md = f"""# Training data of the bundled "tiny" model

Built by `python3 scripts/prepare_data.py --seed {args.seed}` from Debian packages
(`apt-get install -y jargon-text fortunes fortunes-min python3-doc`).

## Sources and licences

| package | version | content | licence |
| --- | --- | --- | --- |
{source_rows}

Fortune files used ({len(fortune_used)}): {", ".join(fortune_used)}.
Not used: the `off/` directory (offensive fortunes, never read) and {", ".join(sorted(FORTUNE_DENYLIST))}
(ASCII art that needs exact layout; stereotype jokes).

Python documentation: {pydoc_pages} HTML pages, main body only (sidebars, navigation,
tables of contents, permalink marks, index/search/licence pages dropped), split into sections
of at most {MAX_DOC_CHARS} characters.

## Cleaning and format

- Whitespace: runs of spaces/tabs collapsed, hard-wrapped paragraphs reflowed, code kept as is
  (tabs expanded), blank lines removed, so no document contains a blank line.
- Jargon File: cross-reference braces removed, cartoon captions dropped; one document per
  lexicon entry, introduction and appendices as prose documents.
- Duplicates (same text after whitespace folding, case-insensitive) removed.
- Conversations (ChatML, `<|im_start|>role\\n...<|im_end|>\\n`): 70% of the training Jargon
  entries become "What does <term> mean?" style exchanges, 35% of training fortunes become
  "Tell me a fortune." style exchanges, and half of the Python API/glossary definitions of training
  sections become "What does x() do?" exchanges; exchanges are grouped 1-3 per conversation, 20%
  with a system prompt. The rest stays plain text. Every document ends with `<|endoftext|>`.

## Split (by document, seeded shuffle)

| source | raw bytes | cleaned bytes | train docs / bytes | held-out docs / bytes |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Held-out documents are plain prose only and none of their text (nor its conversations) is in the
training split. `heldout.txt` joins them with one blank line ({len(heldout_text.encode()):,} bytes).

Training stream: {len(train_texts):,} documents ({chat_stats["plain"]:,} plain, {chat_stats["chat"]:,}
conversations with {chat_stats["exchanges"]:,} exchanges), {train_bytes:,} bytes of text.

## Tokenizer and token counts

Byte-level BPE (`tokenizers`), vocabulary {VOCAB_SIZE}, trained on the training split only;
special tokens `<|endoftext|>` = 0, `<|im_start|>` = 1, `<|im_end|>` = 2; no normalizer, so
`decode(encode(x)) == x` for any string. `tokenizer.json` sha256 prefix: `{tok_sha}`.

| split | tokens | bytes per token |
| --- | --- | --- |
| train (`data/train.bin`) | {len(train_ids):,} | {train_bytes / len(train_ids):.2f} |
| held-out (`data/heldout.bin`) | {len(heldout_ids):,} | {len(heldout_text.encode()) / len(heldout_ids):.2f} |
"""
    (args.model_dir / "DATA.md").write_text(data_md)

    print(f"sources: {', '.join(f'{p} {v}' for p, v in versions.items())}")
    for src in ("jargon", "fortunes", "pydoc"):
        print(
            f"  {src:9s} docs={sum(d.source == src for d in docs):6d} "
            f"train={nbytes(train, src):10,d}B heldout={nbytes(heldout, src):8,d}B"
        )
    print(f"train:   {len(train_texts):,} docs ({chat_stats}), {train_bytes:,} bytes, {len(train_ids):,} tokens")
    print(f"heldout: {len(heldout):,} docs, {len(heldout_text.encode()):,} bytes, {len(heldout_ids):,} tokens")
    print(f"tokenizer: vocab {tok.get_vocab_size()}, sha256 {tok_sha}, {train_bytes / len(train_ids):.2f} bytes/token")
    print(
        f"wrote {args.data_dir}/{{train.bin,heldout.bin,train.txt}}, "
        f"{args.model_dir}/{{tokenizer.json,tokenizer_config.json,heldout.txt,DATA.md}}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
