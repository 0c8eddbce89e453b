"""The captured decode step over sliding-window rings on a GPU (skipped without CUDA and Triton).

The tiny gpt_oss (window 8 on layers 0 and 2) decodes sequences of up to 62 positions, so each ring wraps
many times inside the graph, its slot and each slot's position computed on the device from the step's
position tensor. The fused expert kernels take plain SwiGLU experts only, so the model is built over the
same weights with its experts' biases and clamp left out (the attention, the rings and the router as they
are); its captured tokens are held to its own eager forward. The real family (biased, clamped experts) is held
to transformers through whichever decode path the GPU gives it."""

from __future__ import annotations

import pytest
import torch

from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.model.experts import DenseExpert, ResidentExperts
from fate_cli.model.loader import load_model
from quant.triton_kernels import HAVE_TRITON
from tests.tiny_gpt_oss import LONG_PROMPT as LONG
from tests.tiny_gpt_oss import SLIDING_PROMPTS as PROMPTS
from tests.tiny_gpt_oss import make_tiny_gpt_oss

pytestmark = pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")
CUDA = torch.device("cuda")


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0), CUDA)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_gpt_oss(tmp_path_factory.mktemp("sliding_cuda") / "m")


def plain_experts(model):  # noqa: ANN001, ANN201 - a Transformer -> the same model with plain SwiGLU experts
    layers = {i: [DenseExpert(e.gate, e.up, e.down) for e in experts]
              for i, experts in model.provider.layers.items()}
    return model.with_experts(ResidentExperts(layers))


def test_captured_step_over_rings_gives_the_eager_tokens(path):
    model = plain_experts(load_model(path, CUDA, torch.float32).model)
    eager = [generate(model, p, 20, greedy()).token_ids for p in PROMPTS]
    graphs = DecodeGraphs(model)
    assert [generate(model, p, 20, greedy(), graphs=graphs).token_ids for p in PROMPTS] == eager
    assert graphs.describe().startswith("decode: one CUDA graph per step"), graphs.describe()
    batch = generate_batch(model, PROMPTS, 20, greedy(), graphs=graphs)  # rows of different lengths
    assert [r.token_ids for r in batch.results] == eager


@torch.inference_mode()
def test_captured_step_logits_follow_eager_past_the_window(path):
    """Teacher-forced on eager's tokens, one row: every step's logits within float32 rounding of the eager
    forward's (the experts through another kernel), from inside the first window to well past it; capturing
    (which writes the cache's last position) leaves the rings as they were."""
    model = plain_experts(load_model(path, CUDA, torch.float32).model)
    prompt = LONG[:5]  # decode starts inside the first window and wraps the ring six times
    tokens = generate(model, prompt, 50, greedy()).token_ids
    graphs = DecodeGraphs(model)
    eager_cache, graph_cache = model.new_cache(1, 256), graphs.cache(1, 256)
    ids = torch.tensor([prompt], device=CUDA)
    model(ids, eager_cache, 0)
    model(ids, graph_cache, 0)
    rings = graph_cache.ring_k.clone()
    step = graphs.step(graph_cache)  # captured now, over a cache that holds the prompt
    assert torch.equal(graph_cache.ring_k, rings)
    for i, t in enumerate(tokens[:-1]):
        pos = len(prompt) + i
        token = torch.tensor([t], device=CUDA)
        a = model(token.view(1, 1), eager_cache, pos)[:, -1]
        b = step(token, [pos])
        assert ((b - a).norm() / a.norm()).item() < 1e-4 and torch.equal(a.argmax(-1), b.argmax(-1)), pos
    torch.testing.assert_close(graph_cache.ring_k, eager_cache.ring_k, rtol=1e-4, atol=1e-5)


def test_family_on_the_gpu_gives_the_cpu_tokens_past_the_window(path):
    """The GPU's tokens (captured step over the rings) equal the CPU path's in float32, which
    tests/test_sliding_window.py holds to transformers past the window (compared here with fate's CPU path, not
    with the GPU machine's transformers, which differs on this family: tests/test_gpt_oss.py)."""
    cpu_model = load_model(path, torch.device("cpu"), torch.float32).model
    cpu_greedy = Sampler(SamplingParams(temperature=0.0), torch.device("cpu"))
    model = load_model(path, CUDA, torch.float32).model
    graphs = DecodeGraphs(model)
    for p in PROMPTS:
        expected = generate(cpu_model, p, 20, cpu_greedy).token_ids
        assert generate(model, p, 20, greedy(), graphs=graphs).token_ids == expected
