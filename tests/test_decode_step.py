"""The fixed-shape decode step (fate_cli/engine/decode_step.py) against the eager forward, the reference.

On a CPU the step runs uncaptured with the torch reference of the fused expert kernels: what is tested
here is its structure (positions in a device tensor, masked attention over the whole cache, device-side
routing, experts found through each layer's slot table, the host's part between segments). The CUDA-graph
capture and the Triton kernels are tested on a GPU (tests/test_decode_step_cuda.py).
"""

from __future__ import annotations

import pytest
import torch

from fate_cli.engine.decode_step import DecodeGraphs, unavailable
from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.engine.runtime import open_model
from fate_cli.model.loader import load_model
from tests.tiny_models import FAMILIES, make_tiny_model

CPU = torch.device("cpu")
PROMPT = [5, 9, 14, 3, 27, 8, 11]


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0), CPU)


def static(model) -> DecodeGraphs:  # noqa: ANN001
    return DecodeGraphs(model, capture=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_step_gives_the_eager_tokens_on_every_family(tmp_path, family):
    model = load_model(make_tiny_model(tmp_path / family, family=family), CPU, torch.float32).model
    eager = generate(model, PROMPT, 16, greedy()).token_ids
    graphs = static(model)
    stepped = generate(model, PROMPT, 16, greedy(), graphs=graphs)
    assert graphs.describe() == "decode: static, uncaptured"  # the step ran, not the eager fallback
    assert stepped.token_ids == eager
    again = generate(model, PROMPT[:3], 16, greedy(), graphs=graphs)  # a later request reuses the step
    assert again.token_ids == generate(model, PROMPT[:3], 16, greedy()).token_ids


def test_static_step_batch_equals_each_prompt_alone(tmp_path):
    model = load_model(make_tiny_model(tmp_path / "q", family="qwen2_moe"), CPU, torch.float32).model
    prompts = [PROMPT, PROMPT[2:4], [7, 7, 30, 2]]
    alone = [generate(model, p, 10, greedy()).token_ids for p in prompts]
    batched = generate_batch(model, prompts, 10, greedy(), graphs=static(model))
    assert [r.token_ids for r in batched.results] == alone


def offloaded_run(graphs: bool, texts: list[str]):  # noqa: ANN201
    rt = open_model("tiny", "cpu", "float32", "fate", "16MB", 4)  # every copy at the hot tier
    runs = [generate(rt.model, rt.tokenizer.encode(t), 20, greedy(), graphs=static(rt.model) if graphs else None)
            for t in texts]
    return rt, [r.token_ids for r in runs]


def test_static_step_under_offloading_keeps_tokens_and_bookkeeping():
    """fate at 16 MB: the step shows the cache each layer's routing, so tokens, hits, misses, bytes moved
    and prediction scores equal the eager path's, and each layer's device table mirrors its slots."""
    texts = ["The hacker ethic", "What does hack mean?"]
    eager_rt, eager_tokens = offloaded_run(False, texts)
    step_rt, step_tokens = offloaded_run(True, texts)
    assert step_tokens == eager_tokens
    a, b = eager_rt.offload.stats, step_rt.offload.stats
    assert b.misses > 0 and b.prefetches > 0
    assert (a.hits, a.misses, dict(a.bytes_moved), a.prefetches) == (b.hits, b.misses, dict(b.bytes_moved),
                                                                      b.prefetches)
    assert {k: (v.predicted, v.predicted_used) for k, v in a.layers.items()} == {
        k: (v.predicted, v.predicted_used) for k, v in b.layers.items()}
    # the host's part of each decode step is timed: one record per step (a request's first token is prefill's)
    assert a.decode_host_steps == 0 and b.decode_host_steps == sum(len(t) - 1 for t in step_tokens)
    assert b.decode_host_seconds > 0
    for state in step_rt.offload.layers.values():
        slots = state.table[0].tolist()
        assert {e: s for e, s in enumerate(slots) if s >= 0} == state.slot_of
        assert all(state.table[1, e] == (0 if t == "hot" else 1) for e, t in state.tier_of.items())


def test_static_step_resident_policy_needs_no_host():
    rt = open_model("tiny", "cpu", "float32", "resident", "1GB", 4)
    graphs = static(rt.model)
    generate(rt.model, [5, 6, 7], 4, greedy(), graphs=graphs)
    assert len(graphs._step.outputs) == 1  # one segment: every expert sits in its slot for good
    prompt = rt.tokenizer.encode("Unix is")
    stepped = generate(rt.model, prompt, 20, greedy(), graphs=graphs).token_ids
    assert stepped == generate(rt.model, prompt, 20, greedy()).token_ids  # the same INT4 experts, eager


def test_capture_is_refused_on_cpu_with_a_reason():
    model = open_model("tiny", "cpu", "float32").model
    assert unavailable(model, 1) == "decode: eager (CUDA graphs need a GPU)"
    graphs = DecodeGraphs(model)
    generate(model, [5, 6], 3, greedy(), graphs=graphs)  # falls back to eager and says so
    assert graphs.describe() == "decode: eager (CUDA graphs need a GPU)"
