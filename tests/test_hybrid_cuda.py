"""Hybrid caches on a GPU: the captured step with misses on the CPU gives the tokens of misses moved, and an
emulated link keeps what moves unchanged."""

from __future__ import annotations

import pytest
import torch

from cache.hybrid import HybridOptions
from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.runtime import open_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run(policy: str, miss: str, link: float | None = None):  # noqa: ANN201
    rt = open_model("tiny", "cuda", "float32", policy, "16MB", 4, hybrid=HybridOptions(miss, link))
    ids = rt.tokenizer.encode("The hacker ethic")
    out = generate(rt.model, ids, 24, Sampler(SamplingParams(temperature=0.0), torch.device("cuda")),
                   graphs=rt.graphs)
    return rt, out.token_ids


def test_captured_step_same_tokens_with_misses_on_the_cpu():
    _, resident = run("resident", "link")
    link_rt, link = run("fate", "link")
    cpu_rt, cpu = run("fate", "cpu")
    _, cpu_policy = run("cpu", "auto")
    assert "CUDA graphs" in cpu_rt.graphs.describe()
    assert link == cpu == cpu_policy == resident
    assert cpu_rt.offload.sync_stats().cpu_experts == cpu_rt.offload.stats.misses > 0
    assert link_rt.offload.sync_stats().cpu_experts == 0


def test_emulated_link_moves_the_same_bytes():
    plain_rt, plain = run("fate", "link")
    slow_rt, slow = run("fate", "link", link=1e9)
    assert slow_rt.offload.pool.sleep_cycles_per_byte > 0 and plain_rt.offload.pool.sleep_cycles_per_byte == 0
    assert slow == plain
    assert dict(slow_rt.offload.stats.bytes_moved) == dict(plain_rt.offload.stats.bytes_moved)
