"""Hybrid expert caches on CPU: the cost model's decisions on scripted costs, the cpu and freetoken policies'
bookkeeping worked out by hand, and the same greedy tokens whether misses are moved or computed on the CPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cache.cost_model import Costs, ReuseEstimate, split_misses
from cache.hybrid import CPUExperts, FreeTokenExperts, HybridExperts, HybridOptions
from cache.planner import minimum_budget
from cache.policies import PolicyContext, make_policy
from cache.setup import footprint
from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.runtime import open_model
from fate_cli.engine.stores import quantize_model
from fate_cli.model.loader import checked_args, load_model
from quant.cpu_experts import cpu_moe
from quant.store import QuantParams, TierStore
from tests.helpers import fate_in_process, fixed_plan
from tests.tiny_gpt_oss import make_tiny_gpt_oss
from tests.tiny_models import make_tiny_model

CPU = torch.device("cpu")
# move 1 ms; CPU 0.4 ms an expert plus 0.1 ms a further token; device 0.05 ms; link 1 GB/s, host 3 GB/s
COSTS = Costs(link_bytes_per_s=1e9, host_bytes_per_s=3e9, cpu_expert_s=4e-4, cpu_token_s=1e-4,
              gpu_expert_s=5e-5, expert_bytes=10**6, measured_link=1e9)


def test_cost_model_splits_each_miss_where_the_step_ends_sooner():
    # three one-token misses, no reuse: the CPU takes two (0.4, 0.8 ms) before the link's 1.05 ms is sooner
    assert split_misses([(5, 1, 0.0), (2, 1, 0.0), (9, 1, 0.0)], COSTS) == ([2, 5], [9])
    # expected reuse credits a move with the CPU time its later uses save: 10 * 0.35 ms
    assert split_misses([(3, 1, 10.0)], COSTS) == ([], [3])
    # many tokens: 20 on the CPU take 2.3 ms, moved 1 ms + 20 * 0.05
    assert split_misses([(4, 20, 0.0)], COSTS) == ([], [4])
    assert COSTS.moving_wins_from() == 8  # 7 tokens: 1.0 ms on the CPU against 1.05 moved; 8: 1.1
    assert split_misses([(1, 1, 0.0), (2, 1, 0.0)], COSTS, "cpu") == ([1, 2], [])
    assert split_misses([(1, 1, 0.0), (2, 1, 0.0)], COSTS, "link") == ([], [1, 2])
    assert COSTS.link_share() == 0.25


def test_reuse_estimate_follows_the_routing():
    reuse = ReuseEstimate(num_experts=4, top_k=2)
    for _ in range(3):
        reuse.observe(0, [1])
    f = 1 - 0.9**3  # three steps' decayed frequency
    assert reuse.expected(0, 1, capacity=4) == pytest.approx(f * 4 / 2)
    assert reuse.expected(0, 2, capacity=4) == 0.0 and reuse.expected(1, 1, capacity=4) == 0.0


@pytest.fixture(scope="module")
def model_and_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    path = make_tiny_model(root / "model", family="qwen3_moe", num_experts=8, num_hidden_layers=3)
    store_dir = root / "tiers"
    quantize_model(path, store_dir, QuantParams(iters=2))
    return load_model(path, CPU, torch.float32).model, TierStore.open(store_dir, path)


def provider_for(model, store, kind, policy, slots, miss="auto", costs=COSTS):  # noqa: ANN001, ANN201
    args = model.args
    plan = fixed_plan(args, store, slots)
    ctx = PolicyContext.of(args, model.routers())
    return kind(store, plan, make_policy(policy, ctx), CPU, torch.float32, "hot",
                options=HybridOptions(miss), costs=costs)


def step(provider, layer, ids, counts=None):  # noqa: ANN001, ANN201
    """One step through a layer: the experts the device computes, and those the CPU does."""
    served = [e for e, _ in provider.experts(layer, ids, counts or [1] * len(ids))]
    return served, list(provider.host_now.get(layer, []))


def test_hybrid_fate_sends_misses_where_the_costs_say(model_and_store):
    model, store = model_and_store
    layer = model.args.moe_layer_ids[1]
    hot = store.tiers["hot"].layout.nbytes
    provider = provider_for(model, store, HybridExperts, "fate", slots=4)
    assert step(provider, layer, [0, 1, 2]) == ([2], [0, 1])  # as the cost model test: two on the CPU, one moved
    assert step(provider, layer, [2, 3]) == ([2], [3])  # 2 is a hit; the one miss is sooner on the CPU
    s = provider.stats
    assert (s.hits, s.misses, dict(s.bytes_moved)) == (1, 4, {"hot": hot})
    assert s.layers[layer].bytes_moved == hot
    cpu = provider_for(model, store, HybridExperts, "fate", slots=4, miss="cpu")
    assert step(cpu, layer, [0, 1, 2]) == ([], [0, 1, 2]) and not cpu.stats.bytes_moved
    link = provider_for(model, store, HybridExperts, "fate", slots=4, miss="link")
    assert step(link, layer, [0, 1, 2]) == ([0, 1, 2], [])


def test_host_moe_is_the_cpu_experts_weighted_sum(model_and_store):
    model, store = model_and_store
    layer = model.args.moe_layer_ids[1]
    provider = provider_for(model, store, HybridExperts, "fate", slots=4, miss="cpu")
    step(provider, layer, [1, 6], [2, 1])
    x = torch.randn(2, model.args.hidden_size)
    ids = torch.tensor([[1, 6], [1, 3]])  # expert 3 is not the CPU's: it adds nothing here
    weights = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    y = provider.host_moe(layer, x, weights, ids)
    lay = store.tiers["hot"].layout
    bufs = [(store.read("hot", layer, e), lay) for e in (1, 6)]
    expected = cpu_moe(x, bufs, torch.tensor([[0.7, 0.3], [0.4, 0.0]]))
    assert torch.equal(y, expected)
    s = provider.stats.layers[layer]
    assert s.cpu_experts == 2 and s.cpu_seconds > 0
    assert provider.host_moe(layer, x, weights, ids) is None  # a step's CPU experts are computed once


def test_measured_costs_follow_the_cpu_time_seen_in_the_run(model_and_store):
    """Measured costs take each CPU call's time per expert into the running estimate (the startup measurement
    runs warm, back to back); scripted costs stay as given."""
    model, store = model_and_store
    layer = model.args.moe_layer_ids[1]
    x, ids, weights = torch.randn(1, model.args.hidden_size), torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]])
    measured = provider_for(model, store, HybridExperts, "fate", slots=4, costs=None)
    assert measured.calibrating
    measured.costs = dataclasses.replace(measured.costs, cpu_expert_s=1e-12)  # "the CPU is free": every miss to it
    assert step(measured, layer, [0, 1])[1] == [0, 1]
    measured.host_moe(layer, x, weights, ids)
    seen = measured.stats.layers[layer].cpu_seconds / 2
    assert measured.costs.cpu_expert_s == pytest.approx(seen) and seen > 1e-12
    # a prompt's call (two tokens through one expert): both CPU costs scale by the time seen over the predicted
    startup, before = measured._measured, measured._cpu_ratio
    measured.costs = dataclasses.replace(measured.costs, cpu_expert_s=1e-12, cpu_token_s=1e-12)
    assert step(measured, layer, [0, 1], counts=[2, 1])[1] == [0, 1]
    measured.host_moe(layer, torch.randn(2, model.args.hidden_size), torch.tensor([[1.0, 0.0], [0.5, 0.5]]),
                      torch.tensor([[0, 2], [0, 1]]))
    took = measured.stats.layers[layer].cpu_seconds - 2 * seen
    ratio = 0.8 * before + 0.2 * took / (startup.cpu_s(2) + startup.cpu_s(1))
    assert measured.costs.cpu_expert_s == pytest.approx(startup.cpu_expert_s * ratio)
    assert measured.costs.cpu_token_s == pytest.approx(startup.cpu_token_s * ratio)
    scripted = provider_for(model, store, HybridExperts, "fate", slots=4)
    step(scripted, layer, [0, 1])
    scripted.host_moe(layer, x, weights, ids)
    assert not scripted.calibrating and scripted.costs == COSTS


def test_cpu_policy_fixes_its_experts_once_and_moves_nothing_after(model_and_store):
    model, store = model_and_store
    layer = model.args.moe_layer_ids[1]
    hot = store.tiers["hot"].layout.nbytes
    provider = provider_for(model, store, CPUExperts, "cpu", slots=3)
    # the first request's step: its three most used experts (0, then 1 and 2 by id) fill the slots
    assert step(provider, layer, [0, 1, 2, 3], [3, 2, 2, 1]) == ([0, 1, 2], [3])
    assert step(provider, layer, [0]) == ([0], [])
    assert step(provider, layer, [4]) == ([], [4])
    assert step(provider, layer, [1, 3]) == ([1], [3])
    s = provider.stats
    assert (s.hits, s.misses) == (5, 3)
    assert dict(s.bytes_moved) == {"hot": 3 * hot}  # the fixed set, once
    assert sorted(provider.layers[layer].slot_of) == [0, 1, 2]


def test_freetoken_splits_misses_by_bandwidth_share(model_and_store):
    model, store = model_and_store
    a, b = model.args.moe_layer_ids[1:3]
    provider = provider_for(model, store, FreeTokenExperts, "freetoken", slots=4)  # 12 slots shared by 3 layers
    # a quarter of the misses move (link 1 GB/s, host 3 GB/s), those with most tokens first
    assert step(provider, a, [0, 1, 2, 3], [1, 1, 2, 1]) == ([2], [0, 1, 3])  # credit 1.0: one moved
    assert step(provider, b, [0, 1]) == ([], [0, 1])  # credit 0.5: none
    assert step(provider, b, [2, 3]) == ([2], [3])  # credit 1.0: one
    assert step(provider, a, [2, 5]) == ([2], [5])  # a hit, and credit 0.25: none
    assert provider.stats.misses == 9 and provider.stats.hits == 1


def test_freetoken_evicts_the_least_recent_expert_of_any_layer(model_and_store):
    model, store = model_and_store
    assert len(model.args.moe_layer_ids) == 3
    a, b, c = model.args.moe_layer_ids
    everything_moves = Costs(1e9, 1e-9, 4e-4, 1e-4, 5e-5, 10**6, measured_link=1e9)
    provider = provider_for(model, store, FreeTokenExperts, "freetoken", slots=2, costs=everything_moves)
    for layer in (a, b, c):
        step(provider, layer, [0, 1])  # the 6 shared slots are full
    step(provider, a, [0])  # a hit: layer a's expert 1 is now the least recent, then b's
    assert step(provider, c, [2]) == ([2], [])
    assert step(provider, c, [3]) == ([3], [])
    assert sorted(provider.layers[a].slot_of) == [0] and sorted(provider.layers[b].slot_of) == [1]
    assert sorted(provider.layers[c].slot_of) == [0, 1, 2, 3]
    assert provider.layers[a].host_table[0, 1] == -1  # its device table forgets it
    used = [slot for s in provider.layers.values() for slot in s.slot_of.values()]
    assert len(used) == len(set(used)) == 6  # one buffer, no slot given twice
    assert provider.stats.hits == 1 and provider.stats.misses == 8


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0), CPU)


@pytest.mark.parametrize("static", [False, True])
def test_bundled_model_same_tokens_wherever_misses_run(static):
    """float32, every tier at INT4 (--transfer-bits 4): the CPU and the device compute the same experts, so the
    eager forward and the (uncaptured) decode step give resident's tokens with misses on the CPU or moved."""
    ids = None
    runs = {}
    scripted = {"hot": COSTS}  # freetoken's share, without measuring this machine
    for name, policy, miss in [("resident", "resident", "link"), ("link", "fate", "link"), ("cpu", "fate", "cpu"),
                               ("cpu policy", "cpu", "auto"), ("freetoken", "freetoken", "auto")]:
        rt = open_model("tiny", "cpu", "float32", policy, "16MB", 4, hybrid=HybridOptions(miss, costs=scripted))
        ids = ids or rt.tokenizer.encode("The hacker ethic")
        graphs = DecodeGraphs(rt.model, capture=False) if static else None
        runs[name] = (generate(rt.model, ids, 20, greedy(), graphs=graphs).token_ids, rt.offload.stats)
        if static:
            assert graphs.describe() == "decode: static, uncaptured"
    tokens = {k: v[0] for k, v in runs.items()}
    assert all(t == tokens["resident"] for t in tokens.values()), tokens
    assert runs["link"][1].cpu_experts == 0 and runs["cpu"][1].cpu_experts == runs["cpu"][1].misses > 0
    assert runs["cpu policy"][1].cpu_experts > 0 and runs["freetoken"][1].cpu_experts > 0


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen3_5_moe", "gpt_oss"])
def test_tiny_config_same_tokens_and_stats_in_json(tmp_path, family):
    if family == "gpt_oss":
        path = make_tiny_gpt_oss(tmp_path / "model")
    else:
        layers = 4 if family == "qwen3_5_moe" else 3  # one full-attention layer after three linear ones
        experts = {"mixtral": {"num_local_experts": 8}}.get(family, {"num_experts": 8})
        path = make_tiny_model(tmp_path / "model", family=family, num_hidden_layers=layers, **experts)
    params = QuantParams(iters=2)
    quantize_model(path, tmp_path / "home" / "tiers" / "model", params)
    args = checked_args(path)
    fp = footprint(args, torch.float32, min(4096, args.max_position_embeddings), params, False)
    vram = str(minimum_budget(fp) + len(fp.moe_layers) * fp.expert_hot)  # one slot a layer above the top-k
    runs = {}
    for policy, miss in [("resident", "link"), ("fate", "link"), ("fate", "cpu")]:
        result = fate_in_process("run", str(path), "hello there", "-n", "12", "--raw", "--temperature", "0", "--json",
                                 "--vram", vram, "--policy", policy, "--transfer-bits", "4", "--miss", miss,
                                 "--cpu-threads", "1", home=tmp_path / "home")
        assert result.returncode == 0, result.stderr
        runs[(policy, miss)] = json.loads(result.stdout)
    tokens = {k: r["token_ids"] for k, r in runs.items()}
    assert len(set(map(tuple, tokens.values()))) == 1, tokens
    cpu = runs[("fate", "cpu")]["stats"]["cache"]
    link = runs[("fate", "link")]["stats"]["cache"]
    assert cpu["cpu_experts"] == cpu["misses"] > 0 and link["cpu_experts"] == 0
    assert sum(int(v["cpu_experts"]) for v in cpu["per_layer"].values()) == cpu["cpu_experts"]
    assert sum(v["bytes_moved"] for v in link["per_layer"].values()) == sum(link["bytes_moved"].values())
    assert "link_wait_seconds" in link and "cpu_seconds" in cpu


def test_bad_miss_and_link_are_one_line_errors(tmp_path):
    bad = fate_in_process("run", "tiny", "hi", "--miss", "gpu", home=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown --miss 'gpu'; use auto, cpu or link"
    if not torch.cuda.is_available():
        link = fate_in_process("run", "tiny", "hi", "--link", "12GB", home=tmp_path)
        assert link.returncode == 2 and "--link" in link.stderr and len(link.stderr.strip().splitlines()) == 1
