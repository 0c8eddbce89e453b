"""Continuous batching: one thread owns the model and decodes every admitted request together.

A server's requests arrive at any time and end at different lengths, so the fixed batch of generate_batch
(every row prefilled first, run until the last one ends) does not fit. Here the KV cache has `max_batch`
rows and the scheduler thread repeats, at each step boundary:

1. free the rows of requests whose client went away (`Request.cancel`);
2. admit queued requests into free rows: each is prefilled into its own row (in groups that pass through
   each layer together where the expert provider asks: klotski), which gives its first token;
3. one decode step for all active rows together, each at its own position (`RowPositions`), then one
   sampled token per row, each row with its own sampler (temperature, top_p, seed, logit_bias).

Active requests always hold rows 0..n-1: when a row ends, the last active row's keys and values are copied
into it, so a step computes exactly the live rows. On a GPU with captured decode steps, a step runs the
captured step of the smallest power-of-two row count that holds them (captured once per size, at start);
the padding rows above n are free rows, fed token 0 at position 0, which the next prefill overwrites.

Greedy answers equal each request decoded alone (float32): prefill and decode are the same calls as
generate()'s, one row alone decodes with generate()'s integer position, and the batched step is the one
generate_batch uses, which is tested equal. A request's text is decoded as it grows and checked against its
stop strings, holding back what could still become one; the thread hands each piece to the request's
`deliver` callback, which must not block (the HTTP layer puts it on the request's own asyncio queue).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fate_cli.engine.decode_step import DecodeStep, unavailable
from fate_cli.engine.generate import Sampler, SamplingParams, prefill_rows, synchronize
from fate_cli.model.kv_cache import RowPositions
from fate_cli.tokenizer import Tokenizer

RATE_WINDOW_S = 10.0  # tokens/s figures cover the steps of the last this many seconds
STATS_EVERY_S = 0.25  # how often the thread copies the expert cache's counters for readers on other threads


class QueueFull(Exception):
    """The queue of waiting requests is at its limit."""


@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" (end of sequence or a stop string), "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


Event = Piece | Finished | Failed


class StopText:
    """A request's text as its tokens arrive: pieces safe to send, the end at a stop string.

    Text that could be the start of a stop string is held back until it cannot be; a stop string ends the
    text where it begins (it is not part of the answer, as in OpenAI's API)."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token -> (text to send now, whether a stop string ended the answer)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return "", False
        self.text = text
        first = None
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop) + 1))
            if at != -1 and (first is None or at < first):
                first = at
        if first is not None:
            self.text = text[:first]
            return self._take(first), True
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        return self._take(len(text) - hold), False

    def flush(self) -> str:
        """The rest of the text, at the end of the answer."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


class Request:
    """One completion: its prompt ids, limits and sampling, and where its events go."""

    def __init__(self, prompt_ids: Sequence[int], max_tokens: int, params: SamplingParams,
                 deliver: Callable[[Event], None], stop: Sequence[str] = (),
                 logit_bias: dict[int, float] | None = None):
        self.prompt_ids, self.max_tokens, self.params = list(prompt_ids), max_tokens, params
        self.deliver, self.stop, self.logit_bias = deliver, list(stop), dict(logit_bias or {})
        self.cancelled = False

    def cancel(self) -> None:
        """The client went away: its row is freed at the next step boundary (or it leaves the queue)."""
        self.cancelled = True


@dataclass
class Row:
    request: Request
    sampler: Sampler
    text: StopText
    limit: int  # tokens this request may generate (max_tokens, within the context)
    pos: int  # where the next token's keys go: the tokens in this row's cache
    token: int = 0  # the last sampled token, the next step's input
    generated: int = 0
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values) on the device


@dataclass
class ServeStats:
    """Counters and recent speeds for /metrics; written by the scheduler thread only."""

    admitted: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "cancelled": 0, "error": 0})
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    last_step_rows: int = 0
    padding_rows: int = 0  # rows computed only to fill a fixed-size step
    decode: deque = field(default_factory=deque)  # (time, tokens, seconds) of recent decode steps
    prefill: deque = field(default_factory=deque)  # (time, tokens, seconds) of recent prefills
    cache: dict = field(default_factory=dict)  # the expert cache's counters, copied by the thread

    def record(self, which: deque, tokens: int, seconds: float) -> None:
        now = time.monotonic()
        which.append((now, tokens, seconds))
        while which and which[0][0] < now - RATE_WINDOW_S:
            which.popleft()

    @staticmethod
    def rate(which: deque) -> float:
        """Tokens per second of busy time over the window (0 when idle for the whole window)."""
        recent = [(t, s) for when, t, s in list(which) if when >= time.monotonic() - RATE_WINDOW_S]
        seconds = sum(s for _, s in recent)
        return sum(t for t, _ in recent) / seconds if seconds else 0.0


class Scheduler:
    """Owns the model on its own thread; `submit` queues a request from any thread."""

    def __init__(self, runtime, max_batch: int, context: int, max_queue: int):  # noqa: ANN001 - Runtime
        self.runtime, self.model, self.tokenizer = runtime, runtime.model, runtime.tokenizer
        self.device = self.model.embed_tokens.weight.device
        self.max_batch, self.context, self.max_queue = max_batch, context, max_queue
        self.eos = set(self.tokenizer.eos_ids)
        self.cache = self.model.new_cache(max_batch, context)
        self.rows: list[Row] = []  # active requests; rows[i] lives in the cache's row i
        self.queue: deque[Request] = deque()
        self.cond = threading.Condition()
        self.stats = ServeStats()
        self.steps: dict[int, DecodeStep] = {}  # captured decode steps by row count
        self.decode_note = "decode: eager"
        self._stop = False
        self._last_copy = 0.0
        self._admitting: list[Request] = []  # taken from the queue, not yet in a row
        self.thread = threading.Thread(target=self._loop, name="fate-scheduler", daemon=True)

    # ---- other threads ---------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Capture the decode step of each power-of-two row count up to max_batch (GPU only), before serving."""
        graphs = self.runtime.graphs
        if graphs is None or not graphs.enabled:
            self.decode_note = graphs.describe() if graphs is not None else self.decode_note
            return
        sizes = sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)})
        for size in sizes:
            why = unavailable(self.model, size, graphs.capture)
            if why:
                self.decode_note = f"{why} for {size} rows and up"
                break
            step = DecodeStep(self.model, self.cache.rows(0, size), graphs.capture)
            if graphs.capture:
                step.capture_graphs()
            self.steps[size] = step
            self.decode_note = step.describe()

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull when max_queue requests already wait beyond the free rows."""
        if len(request.prompt_ids) >= self.context:
            raise ValueError("the prompt does not fit the context")
        with self.cond:
            waiting = sum(1 for r in self.queue if not r.cancelled)
            if waiting >= self.max_queue + self.max_batch - len(self.rows):  # free rows take some at the next step
                raise QueueFull()
            self.queue.append(request)
            self.cond.notify()

    @property
    def in_flight(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        return sum(1 for r in list(self.queue) if not r.cancelled)

    # ---- the scheduler thread --------------------------------------------------------------------

    def _loop(self) -> None:
        # denormals slow CPU float math ~80x; the flag is per thread, so this thread sets it too (as open_model)
        torch.set_flush_denormal(True)
        while True:
            with self.cond:
                while not self._stop and not self.rows and not self.queue:
                    self.cond.wait()
                if self._stop:
                    return
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    self._admit()
                    if self.rows:
                        self._step()
                self._copy_cache_stats()
            except Exception as err:  # noqa: BLE001 - out of memory, a kernel failure: fail these requests, serve on
                self._fail_all(err)

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.rows))):
            if self.rows[i].request.cancelled:
                self._free(i, "cancelled")
        with self.cond:
            for r in [r for r in self.queue if r.cancelled]:
                self.queue.remove(r)
                self.stats.finished["cancelled"] += 1

    def _admit(self) -> None:
        new: list[Request] = []
        with self.cond:
            while self.queue and len(self.rows) + len(new) < self.max_batch:
                request = self.queue.popleft()
                if not request.cancelled:
                    new.append(request)
        if not new:
            return
        self._admitting = list(new)
        if not self.rows:
            self.model.begin_request()  # the batch starts afresh: per-request predictors begin anew
        first = len(self.rows)
        lengths = [len(r.prompt_ids) for r in new]
        synchronize(self.device)
        t0 = time.perf_counter()
        logits = prefill_rows(self.model, [r.prompt_ids for r in new], self.cache, first)
        for request, row_logits in zip(new, logits):
            self._admitting.remove(request)
            row = Row(request, Sampler(request.params, self.device), StopText(self.tokenizer, request.stop),
                      limit=min(request.max_tokens, self.context - len(request.prompt_ids)),
                      pos=len(request.prompt_ids), bias=self._bias(request))
            self.rows.append(row)
            row.token = int(self._sample(row, row_logits[None])[0])
        synchronize(self.device)
        self.stats.record(self.stats.prefill, sum(lengths), time.perf_counter() - t0)
        self.stats.admitted += len(new)
        self.stats.prompt_tokens += sum(lengths)
        self._took(list(range(first, len(self.rows))))

    def _step(self) -> None:
        n = len(self.rows)
        tokens = torch.tensor([r.token for r in self.rows], dtype=torch.long, device=self.device)
        positions = [r.pos for r in self.rows]
        t0 = time.perf_counter()
        size = next((s for s in sorted(self.steps) if s >= n), None)
        if size is not None:
            pad = size - n
            self.stats.padding_rows += pad
            logits = self.steps[size](torch.cat([tokens, tokens.new_zeros(pad)]), positions + [0] * pad)[:n]
        elif n == 1:  # alone: generate()'s own call, so a lone request decodes exactly as `fate run`
            logits = self.model(tokens.view(1, 1), self.cache.rows(0, 1), positions[0])[:, -1]
        else:
            logits = self.model(tokens.view(-1, 1), self.cache.rows(0, n), RowPositions.of(positions, self.device))
            logits = logits[:, -1]
        for i, row in enumerate(self.rows):
            row.pos += 1
            row.token = int(self._sample(row, logits[i: i + 1])[0])
        self.stats.record(self.stats.decode, n, time.perf_counter() - t0)  # the sampled ids synchronised it
        self.stats.steps += 1
        self.stats.last_step_rows = n
        self._took(list(range(n)))

    def _bias(self, request: Request) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not request.logit_bias:
            return None
        ids = torch.tensor(list(request.logit_bias), dtype=torch.long, device=self.device)
        return ids, torch.tensor(list(request.logit_bias.values()), dtype=torch.float32, device=self.device)

    def _sample(self, row: Row, logits: torch.Tensor) -> list[int]:
        if row.bias is not None:
            logits = logits.float().index_add(1, row.bias[0], row.bias[1][None])
        return row.sampler(logits).tolist()

    def _took(self, indices: list[int]) -> None:
        """Each of these rows has sampled row.token: hand out its text, and free the rows that ended."""
        ended: list[tuple[int, str]] = []
        for i in indices:
            row = self.rows[i]
            row.generated += 1
            self.stats.generated_tokens += 1
            if row.token in self.eos:
                ended.append((i, "stop"))
                continue
            piece, stopped = row.text.push(row.token)
            if piece:
                row.request.deliver(Piece(piece))
            if stopped:
                ended.append((i, "stop"))
            elif row.generated >= row.limit:
                ended.append((i, "length"))
        for i, reason in sorted(ended, reverse=True):  # highest first: moving the last row keeps lower indices
            self._free(i, reason)

    def _free(self, i: int, reason: str) -> None:
        row = self.rows[i]
        if reason != "cancelled":
            rest = row.text.flush()
            if rest:
                row.request.deliver(Piece(rest))
            row.request.deliver(Finished(reason, len(row.request.prompt_ids), row.generated))
        self.stats.finished[reason] += 1
        last = len(self.rows) - 1
        if i != last:  # keep rows 0..n-1 dense: the last row's keys and values move into the freed one
            moved = self.rows[last]
            self.cache.copy_row(last, i, moved.pos)  # and its sliding rings and linear-attention state
            self.rows[i] = moved
        self.rows.pop()

    def _fail_all(self, err: Exception) -> None:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "out of memory" in message and self.device.type == "cuda":
            torch.cuda.empty_cache()
        for request in [row.request for row in self.rows] + self._admitting:
            request.deliver(Failed(message))
            self.stats.finished["error"] += 1
        self.rows.clear()
        self._admitting = []

    def _copy_cache_stats(self) -> None:
        """The expert cache's counters for /metrics, copied here: its dicts change while this thread runs."""
        offload = self.runtime.offload
        now = time.monotonic()
        if offload is None or (now - self._last_copy < STATS_EVERY_S and self.rows):
            return
        self._last_copy = now
        s = offload.stats
        self.stats.cache = {"hits": s.hits, "misses": s.misses, "recall": s.decode_recall,
                            "bytes_moved": dict(s.bytes_moved), "prefetches": s.prefetches,
                            "stall_seconds": s.stall_seconds}
