"""The continuous-batching scheduler in process: requests admitted at different steps, rows freed and
compacted, the fixed-size (padded) decode step, and stop strings held back across tokens."""

from __future__ import annotations

import threading

import torch

from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.runtime import open_model
from fate_cli.engine.scheduler import Failed, Finished, Piece, Request, Scheduler, StopText
from fate_cli.tokenizer import Message
from tests.helpers import one_thread  # noqa: F401 - one thread for tiny matrices

TEXTS = ["What does hack mean?", "Unix", "Tell me a story about a compiler.", "Hi", "What is a daemon?"]


class Collect:
    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.end: Finished | Failed | None = None
        self.done = threading.Event()

    def __call__(self, event) -> None:  # noqa: ANN001
        if isinstance(event, Piece):
            self.pieces.append(event.text)
        else:
            self.end = event
            self.done.set()


def run_all(scheduler: Scheduler, prompts: list[list[int]], limits: list[int]) -> list[Collect]:
    """Submit every request (more than the rows: the rest wait for rows to free) and wait for every answer."""
    out = [Collect() for _ in prompts]
    greedy = SamplingParams(temperature=0.0)
    scheduler.start()
    try:
        for i in range(len(prompts)):
            scheduler.submit(Request(prompts[i], limits[i], greedy, out[i]))
        for c in out:
            assert c.done.wait(timeout=120)
    finally:
        scheduler.close()
    return out


def check_equal_alone(graphs: DecodeGraphs | None, max_batch: int) -> Scheduler:
    rt = open_model("tiny", "cpu", "float32")
    rt.graphs = graphs(rt.model) if graphs else None
    prompts = [rt.tokenizer.encode_chat([Message("user", t)]) for t in TEXTS]
    limits = [12, 3, 12, 7, 9]  # rows end at different steps: freed rows are refilled and compacted
    eos = rt.tokenizer.eos_ids
    alone = [generate(rt.model, p, n, Sampler(SamplingParams(temperature=0.0), torch.device("cpu")), eos).token_ids
             for p, n in zip(prompts, limits)]
    scheduler = Scheduler(rt, max_batch, 256, 8)
    scheduler.warm_up()
    got = run_all(scheduler, prompts, limits)
    for ids, c in zip(alone, got):
        assert "".join(c.pieces) == rt.tokenizer.decode([t for t in ids if t not in eos])
        assert isinstance(c.end, Finished) and c.end.completion_tokens == len(ids)
        assert c.end.prompt_tokens == len(prompts[got.index(c)])
        assert c.end.reason == ("stop" if ids[-1] in eos else "length")
    assert scheduler.stats.admitted == len(TEXTS) and not scheduler.rows
    return scheduler


def test_eager_batched_rows_equal_each_request_alone():
    scheduler = check_equal_alone(None, 3)  # five requests through three rows
    assert scheduler.stats.padding_rows == 0
    assert scheduler.stats.steps < scheduler.stats.generated_tokens - len(TEXTS)  # rows shared steps


def test_padded_fixed_size_steps_equal_each_request_alone():
    """The GPU's path (a decode step per power-of-two row count, padding rows fed token 0) run uncaptured."""
    scheduler = check_equal_alone(lambda model: DecodeGraphs(model, capture=False), 4)
    assert sorted(scheduler.steps) == [1, 2, 4]  # three rows run the four-row step with one padding row
    assert scheduler.stats.padding_rows > 0
    assert scheduler.decode_note.startswith("decode: static")


def test_stop_strings_are_held_back_and_cut():
    rt = open_model("tiny", "cpu", "float32")
    tok = rt.tokenizer
    ids = tok.encode("The hacker ethic is a set of ideas")
    text = tok.decode(ids)
    stop = text[text.index("set") - 1: text.index("set") + 3]  # " set"
    s = StopText(tok, [stop, "zzzz"])
    sent, stopped = "", False
    for t in ids:
        piece, stopped = s.push(t)
        sent += piece
        assert stop not in sent  # never sent past a stop string
        if stopped:
            break
    assert stopped and sent + s.flush() == text[: text.index(stop)]
    plain = StopText(tok, [])
    assert "".join(plain.push(t)[0] for t in ids) + plain.flush() == text
