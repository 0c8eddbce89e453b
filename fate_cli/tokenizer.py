"""Tokenizer (tokenizers' tokenizer.json) and chat template (Jinja, from tokenizer_config.json).

The template is rendered the way transformers renders it (sandboxed, trim_blocks, lstrip_blocks,
bos/eos tokens as variables), so prompts match what the model was tuned on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from fate_cli.errors import BadModel, ModelNotFound
from fate_cli.model.args import read_json_object
from fate_cli.model.values import check_text


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class Message:
    role: str
    content: str


class Tokenizer:
    def __init__(self, model_dir: Path):
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFound(f"{model_dir} has no tokenizer.json; pull the model again with `fate pull`")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on parse errors
            raise BadModel(f"{path} cannot be read ({str(err).splitlines()[0]}); re-download the model") from None
        config = read_json_object(model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = self._find_template(model_dir, config)
        # extra variables for the chat template, e.g. enable_thinking (Qwen3's thinking switch)
        self.template_vars: dict[str, Any] = {}
        gen = read_json_object(model_dir / "generation_config.json")
        cfg = read_json_object(model_dir / "config.json")
        self.generation_defaults = gen
        self.eos_ids = self._eos_ids(gen, cfg)

    def _find_template(self, model_dir: Path, config: dict[str, Any]) -> str | None:
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    def _eos_ids(self, gen: dict[str, Any], cfg: dict[str, Any]) -> list[int]:
        ids: list[int] = []
        for source in (gen.get("eos_token_id"), cfg.get("eos_token_id")):
            if source is None:
                continue
            for value in source if isinstance(source, list) else [source]:
                if isinstance(value, int) and value not in ids:
                    ids.append(value)
            break  # generation_config.json wins over config.json
        if self.eos_token is not None:
            eos = self.tok.token_to_id(self.eos_token)
            if eos is not None and eos not in ids:
                ids.append(eos)
        return ids

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(check_text(text, "the text"), add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise BadModel("this model has no chat template; run the prompt with --raw")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda obj, indent=None, **_: json.dumps(obj, indent=indent, ensure_ascii=False)
        try:
            return env.from_string(self.chat_template).render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **self.template_vars,
            )
        except jinja2.TemplateError as err:
            raise BadModel(f"the model's chat template failed to render: {err}; try --raw") from None
        except Exception as err:  # the template is the model's code: 1/0, a range too large for the sandbox...
            what = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
            raise BadModel(f"the model's chat template failed to render ({what}); try --raw") from None

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """Token ids of the rendered conversation; the template itself places bos/eos tokens."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
