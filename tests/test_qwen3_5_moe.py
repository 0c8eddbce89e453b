"""Qwen3.5 / Qwen3.6 MoE (Gated DeltaNet hybrid) against transformers, the reference, on tiny random checkpoints:
both expert layouts, several linear/full patterns, one row and several; the KV-and-state path through
generate, the batch and the uncaptured decode step; chat's state reuse across turns."""

from __future__ import annotations

import pytest
import torch

from fate_cli.chat import ChatSession
from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.engine.runtime import open_model
from fate_cli.model.loader import Checkpoint, load_model
from fate_cli.tokenizer import Message
from quant.source import SourceReader
from tests.tiny_models import make_tiny_model

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
LINEAR, FULL = "linear_attention", "full_attention"
SYSTEM = Message("system", "Be brief.")
CASES = {
    "hub-layout": {},  # the text model inside the VLM, separate expert tensors, 3 linear : 1 full
    "fused": {"fused_experts": True},
    "text-fused-alternating": {"text_only": True, "fused_experts": True, "layer_types": [FULL, LINEAR, FULL, LINEAR]},
    "full-first": {"num_hidden_layers": 3, "layer_types": [FULL, LINEAR, LINEAR]},
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a thread pool costs more than it gives, the more so on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0), CPU)


def reference_tokens(ref, prompt: list[int], n: int) -> list[int]:  # noqa: ANN001
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_match_transformers(tmp_path, case):
    path = make_tiny_model(tmp_path / case, family="qwen3_5_moe", **CASES[case])
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path, CPU, torch.float32).model
    gen = torch.Generator().manual_seed(1)

    rows = torch.randint(3, 128, (2, 70), generator=gen)  # two rows, over one 64-token chunk
    with torch.no_grad():
        logits, expected = ours(rows, ours.new_cache(2, 96), 0), ref(rows).logits
    rel = (logits - expected).norm() / expected.norm()
    assert rel < 1e-5, f"{case}: relative logit error {rel:.2e}"

    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (17, 5, 9)]
    theirs = [reference_tokens(ref, p, 20) for p in prompts]
    assert generate(ours, prompts[0], 20, greedy()).token_ids == theirs[0]
    step = DecodeGraphs(ours, capture=False)
    assert generate(ours, prompts[0], 20, greedy(), graphs=step).token_ids == theirs[0]
    assert step.describe() == "decode: static, uncaptured"  # the step ran, not the eager fallback
    for graphs in (None, step):  # rows of different lengths, each with its own state
        batch = generate_batch(ours, prompts, 20, greedy(), graphs=graphs)
        assert [r.token_ids for r in batch.results] == theirs


def test_prefill_in_pieces_continues_the_state(tmp_path):
    """A prompt fed in pieces (a chunk, single tokens, a chunk) gives the logits of one pass."""
    model = load_model(make_tiny_model(tmp_path / "m", family="qwen3_5_moe"), CPU, torch.float32).model
    tokens = torch.randint(3, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(tokens, model.new_cache(1, 128), 0)
        cache = model.new_cache(1, 128)
        pieces = [model(tokens[:, :40], cache, 0), model(tokens[:, 40:41], cache, 40),
                  model(tokens[:, 41:42], cache, 41), model(tokens[:, 42:], cache, 42)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_fused_experts_read_as_the_separate_tensors(tmp_path):
    separate = make_tiny_model(tmp_path / "separate", family="qwen3_5_moe")
    fused = make_tiny_model(tmp_path / "fused", family="qwen3_5_moe", fused_experts=True)
    a, b, c = Checkpoint(separate), Checkpoint(fused), SourceReader(fused)
    base = "model.language_model.layers.2.mlp.experts.3"
    assert f"{base}.gate_proj.weight" not in b.names()  # really fused on disk
    for name in ("gate_proj", "up_proj", "down_proj"):
        key = f"{base}.{name}.weight"
        assert b.shape(key) == c.shape(key) == a.shape(key)
        assert torch.equal(b.get(key), a.get(key)) and torch.equal(c.get(key), a.get(key))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("q35") / "m", family="qwen3_5_moe", fused_experts=True)


def test_offloaded_tiers_give_the_resident_tokens(tiny_path, tmp_path, monkeypatch):
    """The quantizer reads fused experts by their per-expert names; offloading keeps the tokens."""
    from cache.setup import footprint
    from fate_cli.engine.runtime import DEFAULT_CONTEXT
    from fate_cli.model.loader import load_args
    from quant.store import QuantParams

    monkeypatch.setenv("FATE_HOME", str(tmp_path))
    args = load_args(tiny_path)
    fp = footprint(args, torch.float32, min(DEFAULT_CONTEXT, args.max_position_embeddings), QuantParams(), False)
    budget = fp.fixed + 3 * len(fp.moe_layers) * fp.expert_hot  # three of four experts' slots per layer
    resident = open_model(str(tiny_path), "cpu", "float32", "resident", "1GB", 4)
    offloaded = open_model(str(tiny_path), "cpu", "float32", "lru", str(budget), 4)
    prompt = [5, 9, 14, 3, 27, 8, 11]
    want = generate(resident.model, prompt, 16, greedy()).token_ids
    assert generate(offloaded.model, prompt, 16, greedy()).token_ids == want
    assert offloaded.offload.stats.misses > 0


def ask(session: ChatSession, text: str) -> tuple[list[int], int]:
    tokens: list[int] = []
    _, stats = session.ask(text, tokens.append)
    return tokens, stats.prompt_tokens


def fresh_answer(runtime, history: list[Message], text: str) -> tuple[list[int], int]:  # noqa: ANN001
    fresh = ChatSession(runtime, SYSTEM.content, SamplingParams(temperature=0.0), 12)
    fresh.history = list(history)
    return ask(fresh, text)


@pytest.mark.parametrize("stepped", [False, True])
def test_chat_turns_reuse_the_state(tiny_path, stepped):
    runtime = open_model(str(tiny_path), "cpu", "float32")
    if stepped:
        runtime.graphs = DecodeGraphs(runtime.model, capture=False)
    session = ChatSession(runtime, SYSTEM.content, SamplingParams(temperature=0.0), 12)
    ask(session, "Hello there, how are you?")
    history = list(session.history)
    whole = len(runtime.tokenizer.encode_chat([SYSTEM, *history, Message("user", "The cat sat on the mat.")]))

    # every cached token reused: the live state continues
    second, prefilled = ask(session, "The cat sat on the mat.")
    assert prefilled < whole / 2
    assert (second, whole) == fresh_answer(runtime, history, "The cat sat on the mat.")

    # the last answer rewritten (as templates that drop reasoning do): back to the state saved at the prompt's end
    session.history[-1] = Message("assistant", "A rewritten answer.")
    history = list(session.history)
    third, prefilled = ask(session, "Once upon a time?")
    whole = len(runtime.tokenizer.encode_chat([SYSTEM, *history, Message("user", "Once upon a time?")]))
    prompt_end = len(runtime.tokenizer.encode_chat([SYSTEM, *history[:-1]]))
    assert prefilled == whole - prompt_end
    assert (third, whole) == fresh_answer(runtime, history, "Once upon a time?")

    # the oldest turns dropped: nothing to continue from, the conversation is prefilled again
    session.history = session.history[2:]
    history = list(session.history)
    fourth, prefilled = ask(session, "And the dog?")
    assert (fourth, prefilled) == fresh_answer(runtime, history, "And the dog?")


def test_thinking_switch_reaches_the_template(tiny_path):
    runtime = open_model(str(tiny_path), "cpu", "float32")
    tok = runtime.tokenizer
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking is defined and enable_thinking is false %}<no-think>{% endif %}")
    assert "<no-think>" not in tok.render_chat([Message("user", "hi")])
    tok.template_vars["enable_thinking"] = False
    assert tok.render_chat([Message("user", "hi")]).endswith("<no-think>")


SMALL_QWEN35 = {"model_type": "qwen3_5_moe", "text_config": {
    "vocab_size": 4096, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64, "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}}}


def test_synthetic_shape_runs_every_policy_in_the_bench(monkeypatch):
    """The published shape's config is read by the family code; a small one of the same form goes through the
    bench's sweep under every policy (random weights straight into the tiers)."""
    from fate_cli import synthetic
    from fate_cli.bench import BENCH_ORDER, open_target, prompt_set, sweep

    big = synthetic.synthetic_args("synthetic:qwen3.6-35b-a3b")
    assert (big.num_layers, len(big.linear_layer_ids), big.num_experts, big.top_k, big.vocab_size) == (
        40, 30, 256, 8, 248320)
    assert big.attention_layer_ids == list(range(3, 40, 4)) and big.rotary_dim == 64
    monkeypatch.setitem(synthetic.CONFIGS, "small-qwen3.5", SMALL_QWEN35)
    rows = sweep([lambda: open_target("synthetic:small-qwen3.5", CPU, torch.float32, None)], "50%",
                 list(BENCH_ORDER), prompt_set(16, 2, None), 4, 1, CPU)
    assert len(rows) == 2 * len(BENCH_ORDER) and all(r["status"] == "ok" for r in rows), rows[0]


@pytest.mark.parametrize("stepped", [False, True])
def test_serve_scheduler_rows_keep_their_state(tiny_path, stepped):
    """Requests through fewer rows than requests: rows freed, refilled and compacted (the last row's state moves
    into the freed one); each answer equals the request run alone."""
    from fate_cli.engine.scheduler import Finished, Request, Scheduler
    from tests.test_scheduler import Collect

    rt = open_model(str(tiny_path), "cpu", "float32")
    rt.graphs = DecodeGraphs(rt.model, capture=False) if stepped else None
    prompts = [[5, 9, 14, 3, 27, 8, 11], [40, 41], list(range(3, 40)), [7, 7, 30], [99, 3, 4, 5, 6]]
    limits = [12, 3, 12, 7, 9]
    eos = rt.tokenizer.eos_ids
    alone = [generate(rt.model, p, n, greedy(), eos).token_ids for p, n in zip(prompts, limits)]
    scheduler = Scheduler(rt, 3, 128, 8)
    scheduler.warm_up()
    out = [Collect() for _ in prompts]
    scheduler.start()
    try:
        for p, n, c in zip(prompts, limits, out):
            scheduler.submit(Request(p, n, SamplingParams(temperature=0.0), c))
        assert all(c.done.wait(timeout=120) for c in out)
    finally:
        scheduler.close()
    assert scheduler.stats.finished["length"] + scheduler.stats.finished["stop"] == len(prompts)
    for ids, c in zip(alone, out):
        assert isinstance(c.end, Finished) and c.end.completion_tokens == len(ids)
        assert "".join(c.pieces) == rt.tokenizer.decode([t for t in ids if t not in eos])
