"""Sliding-window layers keep only their window: a ring of `window` slots in the KV cache (gpt_oss).

The tiny gpt_oss has a window of 8 on layers 0 and 2 and sequences here run to 62 positions, so every ring
wraps many times: on one prefill longer than the window, on chunks that start past it and wrap it, on eager
and static decode steps, for batch rows of different lengths, across chat turns, and in the server's rows."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from cache.setup import footprint
from fate_cli.chat import ChatSession
from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.engine.runtime import open_model
from fate_cli.engine.scheduler import Finished, Scheduler
from fate_cli.model.kv_cache import KVCache
from fate_cli.model.loader import load_args, load_model
from fate_cli.tokenizer import Message
from quant.store import QuantParams
from tests.test_scheduler import run_all
from tests.tiny_gpt_oss import LONG_PROMPT as LONG
from tests.tiny_gpt_oss import SLIDING_PROMPTS as PROMPTS
from tests.tiny_gpt_oss import make_tiny_gpt_oss, reference_tokens

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")
WINDOW = 8


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0), CPU)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_gpt_oss(tmp_path_factory.mktemp("sliding") / "m")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref, load_model(path, CPU, torch.float32).model


@pytest.fixture(scope="module")
def expected(tiny):
    return [reference_tokens(tiny[1], p) for p in PROMPTS]


def test_sliding_layers_hold_only_their_window(tiny):
    model = tiny[2]
    cache = model.new_cache(3, 64)
    assert model.args.sliding_layers == (True, False, True, False) and model.args.sliding_window == WINDOW
    assert tuple(cache.k.shape) == (2, 3, 2, 64, 16)  # the two full layers: every position
    assert tuple(cache.ring_k.shape) == (2, 3, 2, WINDOW, 16)  # the two sliding layers: the window
    assert not cache.truncatable
    assert model.new_cache(1, 5).ring == 5  # a cache shorter than the window needs no more slots than positions


def test_logits_of_a_prompt_longer_than_the_window_match_transformers(tiny, expected):
    _, ref, model = tiny
    prompt = torch.tensor([LONG + PROMPTS[2]])  # 55 tokens
    with torch.no_grad():
        logits = model(prompt, model.new_cache(1, 64), 0)
        want = ref(prompt).logits
    rel = (logits - want).norm() / want.norm()
    assert rel < 1e-5, f"relative logit error {rel:.2e}"
    for p, tokens in zip(PROMPTS, expected):  # 20 greedy tokens past the prompt: the ring wraps on decode
        assert generate(model, p, 20, greedy()).token_ids == tokens


def test_chunks_that_wrap_the_ring_equal_one_pass(tiny):
    """Chunks through the cache: one shorter than the window, one longer that starts past it and wraps the ring,
    a single token, then the rest; every position's logits equal one pass over the whole sequence."""
    model = tiny[2]
    tokens = torch.tensor([LONG + PROMPTS[2]])
    bounds = [0, 5, 19, 20, 21, tokens.shape[1]]
    with torch.no_grad():
        whole = model(tokens, model.new_cache(1, 64), 0)
        cache = model.new_cache(1, 64)
        parts = [model(tokens[:, a:b], cache, a) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-5, atol=1e-5)


def test_batch_rows_of_different_lengths_and_the_static_step_match_transformers(tiny, expected):
    model = tiny[2]
    assert [r.token_ids for r in generate_batch(model, PROMPTS, 20, greedy()).results] == expected
    graphs = DecodeGraphs(model, capture=False)
    assert generate(model, LONG, 20, greedy(), graphs=graphs).token_ids == expected[0]
    assert graphs.describe() == "decode: static, uncaptured"  # the step ran, not the eager fallback
    batched = generate_batch(model, PROMPTS, 20, greedy(), graphs=DecodeGraphs(model, capture=False))
    assert [r.token_ids for r in batched.results] == expected


def test_cache_bytes_are_the_planned_bytes_and_less_than_full_attention(tiny):
    args = load_args(tiny[0])
    full = dataclasses.replace(args, sliding_layers=(False,) * args.num_layers)
    for rows, length in ((1, 64), (3, 200), (2, 5)):
        cache = KVCache.for_model(args, rows, length, torch.float32, CPU)
        plan = footprint(args, torch.float32, length, QuantParams(), False, rows=rows)
        assert cache.nbytes == plan.kv_cache == KVCache.planned_bytes(args, rows, length, torch.float32)
        whole = KVCache.for_model(full, rows, length, torch.float32, CPU)
        assert whole.nbytes == KVCache.planned_bytes(full, rows, length, torch.float32)
        # two of four layers keep min(window, length) positions instead of length: K and V, 2 heads of 16 floats
        assert whole.nbytes - cache.nbytes == rows * 2 * 2 * (length - min(WINDOW, length)) * 2 * 16 * 4
        assert cache.nbytes < whole.nbytes or length <= WINDOW


def test_show_gives_the_window_and_the_smaller_cache(tiny, capsys):
    from fate_cli.show import show_command

    show_command(str(tiny[0]))
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert fields["attention"].endswith("a sliding window of 8 tokens on 2 of 4 layers")
    # 512 positions on the two full layers, 8 on the two sliding ones; K and V, 2 heads of 16 at 2 bytes
    assert (2 * 512 + 2 * 8) * 2 * 2 * 16 * 2 == 133_120
    assert fields["KV cache"].startswith("133.1 kB per row of 512 tokens")


def test_a_restored_snapshot_undoes_what_later_tokens_overwrote(tiny):
    """Continue from an earlier position: the ring must be put back as it was there (later tokens overwrote its
    slots); then the logits equal a fresh prefill. Without the snapshot they do not."""
    model = tiny[2]
    head, tail, other = LONG[:20], LONG[20:], PROMPTS[2]
    with torch.no_grad():
        fresh = model(torch.tensor([head + other]), model.new_cache(1, 64), 0)[:, 20:]
        cache = model.new_cache(1, 64)
        model(torch.tensor([head]), cache, 0)
        saved = cache.snapshot("cpu")
        model(torch.tensor([tail]), cache, 20)
        stale = model(torch.tensor([other]), cache, 20)
        cache.restore(saved)
        again = model(torch.tensor([other]), cache, 20)
    torch.testing.assert_close(again, fresh, rtol=1e-5, atol=1e-5)
    assert (stale - fresh).abs().max() > 1e-3


def ask(session: ChatSession, text: str) -> tuple[list[int], int]:
    tokens: list[int] = []
    _, stats = session.ask(text, tokens.append)
    return tokens, stats.prompt_tokens


def same_cache(a: ChatSession, b: ChatSession) -> None:
    """Two sessions hold the same tokens, and the same keys and values for them (rings slot for slot)."""
    n = len(a.cached_ids)
    assert a.cached_ids == b.cached_ids and n > WINDOW
    for x, y in ((a.cache.k, b.cache.k), (a.cache.v, b.cache.v)):
        torch.testing.assert_close(x[:, :, :, :n], y[:, :, :, :n], rtol=1e-4, atol=1e-5)
    for x, y in ((a.cache.ring_k, b.cache.ring_k), (a.cache.ring_v, b.cache.ring_v)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stepped", [False, True])
def test_chat_turns_equal_a_fresh_prefill(tiny, stepped):
    """Every cached token reused (the rings continue); the last answer rewritten (the rings put back as they were
    at the prompt's end); the oldest turn dropped (prefilled again): each turn's answer, and the keys and values
    cached after it, equal a fresh session's."""
    runtime = open_model(str(tiny[0]), "cpu", "float32")
    runtime.tokenizer.eos_ids = []  # every answer runs its 12 tokens: the rings wrap on decode too
    if stepped:
        runtime.graphs = DecodeGraphs(runtime.model, capture=False)
    system = "You are terse."
    tok = runtime.tokenizer

    def check_fresh(session: ChatSession, history: list[Message], text: str, got: tuple[list[int], int]) -> None:
        fresh = ChatSession(runtime, system, SamplingParams(temperature=0.0), 12)
        fresh.history = list(history)
        assert ask(fresh, text) == got
        same_cache(session, fresh)

    session = ChatSession(runtime, system, SamplingParams(temperature=0.0), 12)
    ask(session, "Hello there, how are you?")
    history = list(session.history)
    whole = len(tok.encode_chat([Message("system", system), *history, Message("user", "The cat sat.")]))
    second, prefilled = ask(session, "The cat sat.")
    assert prefilled < whole - WINDOW  # the rings carried more than a window of earlier turns
    check_fresh(session, history, "The cat sat.", (second, whole))

    session.history[-1] = Message("assistant", "A rewritten answer.")
    history = list(session.history)
    third, prefilled = ask(session, "Once upon a time?")
    whole = len(tok.encode_chat([Message("system", system), *history, Message("user", "Once upon a time?")]))
    prompt_end = len(tok.encode_chat([Message("system", system), *history[:-1]]))
    assert prefilled == whole - prompt_end  # resumed at the snapshot taken at the last prompt's end
    check_fresh(session, history, "Once upon a time?", (third, whole))

    session.history = session.history[2:]
    history = list(session.history)
    fourth, prefilled = ask(session, "And the dog?")
    check_fresh(session, history, "And the dog?", (fourth, prefilled))


@pytest.mark.parametrize("stepped", [False, True])
def test_server_rows_moved_with_their_rings_equal_each_request_alone(tiny, stepped):
    """Five requests through three rows that end at different steps: a freed row takes the last row's keys, its
    rings included, and every answer equals the request run alone."""
    runtime = open_model(str(tiny[0]), "cpu", "float32")
    runtime.graphs = DecodeGraphs(runtime.model, capture=False) if stepped else None
    prompts = [LONG, [17, 4, 4, 80], PROMPTS[2], LONG[5:30], [9, 9]]
    limits = [20, 3, 14, 7, 18]
    eos = runtime.tokenizer.eos_ids
    alone = [generate(runtime.model, p, n, greedy(), eos).token_ids for p, n in zip(prompts, limits)]
    scheduler = Scheduler(runtime, 3, 64, 8)
    scheduler.warm_up()
    got = run_all(scheduler, prompts, limits)
    for ids, c in zip(alone, got):
        assert "".join(c.pieces) == runtime.tokenizer.decode([t for t in ids if t not in eos])
        assert isinstance(c.end, Finished) and c.end.completion_tokens == len(ids)
