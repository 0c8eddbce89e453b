"""`fate chat`: a multi-turn conversation through the model's chat template, streamed, with a live panel.

The KV cache lives across turns: each turn renders the whole conversation, keeps the cached tokens that
still match its start, and prefills only the rest. When the conversation outgrows the context, the
oldest turns are dropped (the system message stays) and the user is told.

Linear-attention layers (qwen3_5_moe) keep a recurrent state that sums up every cached token, and sliding-window
layers (gpt_oss) a ring of their last keys whose older slots later tokens overwrite: neither can be cut back
like full layers' keys and values. A turn continues from them when it reuses every cached token; otherwise
from a copy taken at the end of the last prompt (kept in host memory) when the reused tokens reach that far
(a template that rewrites the last answer, e.g. dropping its reasoning, lands here); otherwise (dropped turns,
a new system message) the conversation is prefilled again from its start.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live

from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.runtime import DEFAULT_CONTEXT, Runtime, open_model
from fate_cli.errors import FateError, ResourceError, UsageError, oom_line
from fate_cli.model.kv_cache import Carried

if TYPE_CHECKING:
    from cache.hybrid import HybridOptions
from fate_cli.model.values import SAMPLING, check_sampling, check_text
from fate_cli.panel import ChatPanel
from fate_cli.run import sampling_from
from fate_cli.tokenizer import Message, StreamDecoder

HELP = """commands:
  /help                 this list
  /reset                forget the conversation (keeps the system message)
  /stats                expert cache statistics of the session
  /set NAME VALUE       sampling: temperature, top_p, top_k, seed, max_tokens
  /set think on|off     the chat template's thinking switch (enable_thinking)
  /system TEXT          set the system message (and reset)
  /exit                 leave (also Ctrl-D); Ctrl-C stops an answer"""

PANEL_REFRESH_PER_S = 4  # several times a second, cheap enough to cost decode under 2%


class SessionCounters:
    """Hit/miss counts at the start of the current answer, so the panel can show this answer's rate."""

    def __init__(self) -> None:
        self.hits = self.misses = 0

    def start_answer(self, stats) -> None:  # noqa: ANN001 - CacheStats
        self.hits, self.misses = stats.hits, stats.misses

    def answer_counts(self, stats) -> tuple[int, int]:  # noqa: ANN001
        hits = stats.hits - self.hits
        return hits, hits + stats.misses - self.misses


class ChatSession:
    def __init__(self, runtime: Runtime, system: str | None, params: SamplingParams, max_tokens: int):
        self.runtime, self.params, self.max_tokens = runtime, params, max_tokens
        self.system = system
        self.history: list[Message] = []
        model = runtime.model
        self.context = min(DEFAULT_CONTEXT, model.args.max_position_embeddings)  # what the plan reserved
        self.cache = model.new_cache(1, self.context)
        self.cached_ids: list[int] = []  # tokens whose keys and values are in self.cache, in order
        self.counters = SessionCounters()
        self.notes: list[str] = []
        self.saved_state: tuple[int, Carried] | None = None  # (position, the rings and linear state there)

    def messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.history

    def reset(self) -> None:
        self.history, self.cached_ids, self.saved_state = [], [], None

    def resume_from(self, reuse: int) -> int:
        """How many cached tokens this turn can keep, given that `reuse` of them match: all of them where no
        ring or linear-attention state is involved or they cover exactly these, else the saved copy's position
        (put back) when the match reaches it, else none."""
        if self.cache.truncatable or reuse == len(self.cached_ids):
            return reuse
        if self.saved_state is not None and self.saved_state[0] <= reuse:
            self.cache.restore(self.saved_state[1])
            return self.saved_state[0]
        return 0

    def prompt_ids(self) -> list[int]:
        """The conversation's tokens, dropping the oldest turns while it and an answer overflow the context."""
        while True:
            ids = self.runtime.tokenizer.encode_chat(self.messages())
            if len(ids) + min(self.max_tokens, 64) < self.context or len(self.history) <= 1:
                break
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]
            self.notes.append("the context is full: dropped the oldest turn")
        if len(ids) >= self.context:
            raise ResourceError(f"the message is {len(ids)} tokens but the context is {self.context}; shorten it")
        return ids

    def ask(self, text: str, on_token, on_prefill=None) -> tuple[str, object]:  # noqa: ANN001
        """Answer `text`; returns (answer, generation stats). Ctrl-C propagates after the state is made safe.

        on_prefill(n), if given, is called with the number of tokens about to be prefilled (after KV reuse)."""
        self.history.append(Message("user", text))
        try:
            ids = self.prompt_ids()
        except FateError:
            self.history.pop()
            raise
        reuse = 0
        while reuse < min(len(ids) - 1, len(self.cached_ids)) and ids[reuse] == self.cached_ids[reuse]:
            reuse += 1  # keep at least one token to prefill: its logits start the answer
        reuse = self.resume_from(reuse)
        self.cached_ids = ids[:reuse]
        offload = self.runtime.offload
        if offload is not None:
            self.counters.start_answer(offload.stats)
        sampler = Sampler(self.params, self.runtime.loaded.device)
        produced: list[int] = []
        if on_prefill is not None:
            on_prefill(len(ids) - reuse)

        def collect(token_id: int) -> bool | None:
            if not produced and not self.cache.truncatable:  # the prompt is in, no answer token yet
                self.saved_state = (len(ids), self.cache.snapshot("cpu"))
            produced.append(token_id)
            return on_token(token_id)

        try:
            result = generate(self.runtime.model, ids[reuse:], self.max_tokens, sampler,
                              self.runtime.tokenizer.eos_ids, on_token=collect, cache=self.cache, start_pos=reuse,
                              graphs=self.runtime.graphs)
        except KeyboardInterrupt:
            self.cached_ids = []  # the cache holds a partial step: rebuild it next turn
            self.history.append(Message("assistant", self.runtime.tokenizer.decode(produced)))
            raise
        except Exception:  # CUDA out of memory, say: forget this turn, keep the session
            self.cached_ids = []
            self.history.pop()
            raise
        answer_ids = [t for t in result.token_ids if t not in self.runtime.tokenizer.eos_ids]
        # every produced token but the last went through the model: its keys are cached
        self.cached_ids = ids + result.token_ids[:-1]
        answer = self.runtime.tokenizer.decode(answer_ids)
        self.history.append(Message("assistant", answer))
        return answer, result.stats


def chat_command(
    model: str | None,
    prompt: str | None,
    system: str | None,
    max_tokens: int,
    temperature: float | None,
    seed: int | None,
    device: str | None,
    dtype: str | None,
    vram: str | None = None,
    policy: str | None = "fate",
    transfer_bits: int | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    panel: bool = True,
    eager: bool = False,
    lines: bool = False,
    think: bool = True,
    hybrid: HybridOptions | None = None,
) -> None:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    check_sampling(temperature, top_p, top_k, seed)  # bad input fails before the model loads
    text = None
    if prompt is not None:
        text = check_text(prompt, "--prompt")
    elif not sys.stdin.isatty():  # read as bytes: a pipe's invalid UTF-8 gets a one-line error, not a traceback
        text = check_text(sys.stdin.buffer.read().decode("utf-8", "surrogateescape"), "the message on stdin")
    if system is not None:
        check_text(system, "--system")
    with err.status("loading the model, pinning the host tier, planning…", spinner="dots"):
        runtime = open_model(model, device, dtype, policy, vram, transfer_bits, eager=eager, hybrid=hybrid)
    runtime.announce(err)
    if not think:
        runtime.tokenizer.template_vars["enable_thinking"] = False
    params = sampling_from(runtime, temperature, top_p, top_k, seed)
    session = ChatSession(runtime, system, params, max_tokens)
    if text is not None:
        # piped stdin is one message, blank lines and all, unless --lines makes each line a turn
        turns = [t for t in text.splitlines() if t.strip()] if lines and prompt is None else [text]
        for turn in turns:
            if turn.strip():
                answer_plain(session, turn)
        return
    interactive_loop(session, err, panel and sys.stdout.isatty())


def answer_plain(session: ChatSession, text: str) -> None:
    """Non-interactive: the answer streamed to stdout as plain text, nothing else there."""
    stream = StreamDecoder(session.runtime.tokenizer)

    def on_token(token_id: int) -> None:
        sys.stdout.write(stream.push(token_id))
        sys.stdout.flush()

    session.ask(text, on_token)
    sys.stdout.write("\n")


def interactive_loop(session: ChatSession, err: Console, with_panel: bool) -> None:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    out = Console(highlight=False)
    out.print("[dim]/help for commands, Ctrl-D or /exit to leave[/dim]")
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            out.print()
            return
        except KeyboardInterrupt:
            out.print("^C")
            continue
        except UnicodeDecodeError:
            out.print("[red]error:[/red] that line is not valid UTF-8; type it again")
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            if slash_command(session, text.strip(), out) == "exit":
                return
            continue
        try:
            if with_panel:
                answer_with_panel(session, text, out)
            else:
                answer_plain(session, text)
        except KeyboardInterrupt:
            out.print("\n[dim](stopped)[/dim]")
        except FateError as error:
            out.print(f"[red]error:[/red] {error}")
        except RuntimeError as error:  # torch.OutOfMemoryError: the session survives, the turn is dropped
            if "out of memory" not in str(error):
                raise
            if session.runtime.loaded.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
            out.print(f"[red]error:[/red] {oom_line()}; the session goes on, ask again or /reset")
        for note in session.notes:
            out.print(f"[yellow]{note}[/yellow]")
        session.notes.clear()


def answer_with_panel(session: ChatSession, text: str, out: Console) -> None:
    view = ChatPanel(session.runtime, session.counters)
    stream = StreamDecoder(session.runtime.tokenizer)

    def on_token(token_id: int) -> None:
        view.answer.append(stream.push(token_id))
        view.meter.token()

    with Live(view, console=out, refresh_per_second=PANEL_REFRESH_PER_S, transient=False):
        session.ask(text, on_token, view.meter.prefill)


def slash_command(session: ChatSession, line: str, out: Console) -> str | None:
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/bye", "/quit"):
        return "exit"
    if name == "/help":
        out.print(HELP, markup=False)
    elif name == "/reset":
        session.reset()
        out.print("[dim]conversation cleared[/dim]")
    elif name == "/system":
        session.system = rest or None
        session.reset()
        out.print(f"[dim]system message {'set' if rest else 'removed'}; conversation cleared[/dim]")
    elif name == "/stats":
        off = session.runtime.offload
        if off is None:
            out.print("every expert is resident at 16 bits: no cache statistics")
        else:
            s = off.sync_stats().as_dict()
            recall = s["decode_prediction_recall"]
            out.print(f"hit rate {100 * s['hit_rate']:.1f}% ({s['hits']} hits, {s['misses']} misses), "
                      f"prediction recall {'-' if recall is None else f'{recall:.3f}'}, moved "
                      f"{', '.join(f'{t} {v / 1e6:.1f} MB' for t, v in s['bytes_moved'].items()) or 'nothing'}, "
                      f"waited on copies {s['stall_seconds']:.3f} s")
    elif name == "/set" and rest.partition(" ")[0] == "think":
        value = rest.partition(" ")[2].strip()
        if value not in ("on", "off"):
            out.print("[red]error:[/red] /set think takes on or off; e.g. /set think off")
            return None
        session.runtime.tokenizer.template_vars["enable_thinking"] = value == "on"
        out.print(f"[dim]think = {value} (the chat template's enable_thinking)[/dim]")
    elif name == "/set":
        key, _, value = rest.partition(" ")
        if key not in SAMPLING:
            out.print(f"[red]error:[/red] /set takes one of {', '.join(SAMPLING)}; e.g. /set temperature 0.7")
            return None
        try:
            parsed = SAMPLING[key].parse(value, f"/set {key}")
        except UsageError as error:
            out.print(f"[red]error:[/red] {error}")
            return None
        if key == "max_tokens":
            session.max_tokens = parsed
        else:
            session.params = replace(session.params, **{key: parsed})
        out.print(f"[dim]{key} = {parsed}[/dim]")
    else:
        out.print(f"[red]error:[/red] unknown command {name}; /help lists them")
    return None
