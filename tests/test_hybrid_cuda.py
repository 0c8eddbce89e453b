"""Hybrid caches on a GPU, through the captured decode step: misses computed on the CPU give the tokens of misses
moved and of every expert resident, and an emulated link keeps what moves unchanged.

The model is a tiny random qwen3_moe whose widths the fused kernels take (hidden 128, experts 64 wide): the bundled
model's 160-wide hidden size does not fit their 64-wide groups and decodes eagerly."""

from __future__ import annotations

import pytest
import torch

from cache.hybrid import HybridOptions
from cache.policies import PolicyContext
from cache.setup import OffloadSetup, build_offloaded
from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.model.loader import load_model
from quant.triton_kernels import HAVE_TRITON
from tests.helpers import fixed_plan
from tests.tiny_models import make_fitting_store

pytestmark = pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")
CUDA = torch.device("cuda")
PROMPTS = [[5, 9, 14, 3, 27, 8, 61, 2, 40, 11], [40, 2, 2, 17]]


@pytest.fixture(scope="module")
def fitting(tmp_path_factory):
    return make_fitting_store(tmp_path_factory.mktemp("hybrid_fits"))


def run(fitting, policy: str, miss: str, link: float | None = None):  # noqa: ANN001, ANN201
    """Greedy tokens of both prompts through the captured step, 3 slots a layer at the hot tier."""
    path, store = fitting
    model = load_model(path, CUDA, torch.float32).model
    args = model.args
    slots = args.num_experts if policy == "resident" else 3
    setup = OffloadSetup(fixed_plan(args, store, slots), policy, 10**9, False)
    offload = build_offloaded(PolicyContext.of(args, model.routers()), store, setup, CUDA, torch.float32, 4,
                              hybrid=HybridOptions(miss, link))
    model = model.with_experts(offload)
    graphs = DecodeGraphs(model)
    sampler = Sampler(SamplingParams(temperature=0.0), CUDA)
    tokens = [generate(model, p, 20, sampler, graphs=graphs).token_ids for p in PROMPTS]
    assert "CUDA graph" in graphs.describe(), graphs.describe()
    return offload, tokens


def test_captured_step_same_tokens_with_misses_on_the_cpu(fitting):
    _, resident = run(fitting, "resident", "link")
    link_cache, link = run(fitting, "fate", "link")
    cpu_cache, cpu = run(fitting, "fate", "cpu")
    _, cpu_policy = run(fitting, "cpu", "auto")
    _, freetoken = run(fitting, "freetoken", "auto")
    assert link == cpu == cpu_policy == freetoken == resident
    stats = cpu_cache.sync_stats()
    assert stats.cpu_experts > 0 and stats.cpu_experts == stats.misses
    assert link_cache.sync_stats().cpu_experts == 0


def test_emulated_link_moves_the_same_bytes(fitting):
    plain_cache, plain = run(fitting, "fate", "link")
    slow_cache, slow = run(fitting, "fate", "link", link=1e9)
    assert slow_cache.pool.sleep_cycles_per_byte > 0 and plain_cache.pool.sleep_cycles_per_byte == 0
    assert slow == plain
    assert dict(slow_cache.stats.bytes_moved) == dict(plain_cache.stats.bytes_moved)
