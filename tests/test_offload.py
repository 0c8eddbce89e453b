"""The offload runtime on CPU: identical tokens across policies, and hit/miss bookkeeping worked out by hand."""

from __future__ import annotations

import json

import pytest
import torch

from cache.offload import OffloadedExperts
from cache.policies import HOT_SHARE, MIN_SHARE, PolicyContext, make_policy
from fate_cli.engine.stores import quantize_model
from fate_cli.model.loader import load_model
from predictors.cross_layer import router_probs
from quant.store import QuantParams, TierStore
from tests.helpers import fate_in_process, fixed_plan
from tests.tiny_models import make_tiny_model

POLICIES = ["fate", "ondemand", "lru", "eap", "fmoe", "klotski", "resident"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random qwen3_moe with 8 experts in 3 layers, and its tier store."""
    root = tmp_path_factory.mktemp("offload")
    model = make_tiny_model(root / "model", family="qwen3_moe", num_experts=8, num_hidden_layers=3)
    store_dir = root / "home" / "tiers" / "model"
    quantize_model(model, store_dir, QuantParams(iters=2))
    return model, store_dir, root / "home"


def fate(home, *args):
    result = fate_in_process(*args, home=home)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_offloading_never_changes_tokens(tiny):
    model, _, home = tiny
    runs = {}
    for policy in POLICIES:
        out = fate(home, "run", str(model), "hello there", "-n", "16", "--raw", "--temperature", "0", "--json",
                   "--vram", "1MB", "--policy", policy, "--transfer-bits", "4")
        runs[policy] = out
    tokens = {p: r["token_ids"] for p, r in runs.items()}
    assert all(t == tokens["resident"] for t in tokens.values()), tokens
    stats = {p: r["stats"]["cache"] for p, r in runs.items()}
    assert stats["resident"]["misses"] == 0 and stats["resident"]["hit_rate"] == 1.0
    assert stats["ondemand"]["hits"] == 0  # it keeps nothing beyond the layer
    assert stats["fate"]["prediction_recall"] is not None
    assert stats["klotski"]["prediction_recall"] is not None  # learned online: a random model has no offline counts
    assert all(set(s["bytes_moved"]) == {"hot"} for s in stats.values())  # one tier, as asked


@pytest.fixture(scope="module")
def model_and_store(tiny):
    path, store_dir, _ = tiny
    model = load_model(path, "cpu", torch.float32).model
    return model, TierStore.open(store_dir, path)


def provider_for(model, store, policy_name, slots):
    args = model.args
    hot, cold = store.tiers["hot"].layout.nbytes, store.tiers["cold"].layout.nbytes
    plan = fixed_plan(args, store, slots)
    ctx = PolicyContext.of(args, model.routers())
    return OffloadedExperts(store, plan, make_policy(policy_name, ctx), torch.device("cpu"), torch.float32), hot, cold


# capacity 3, one expert per step: two experts used twice, then a scan of five new ones, then the two again
SCAN = [[0], [1], [0], [1], [2], [3], [4], [5], [6], [0], [1]]


@pytest.mark.parametrize(
    "policy,hits,misses,tier",
    [
        ("lru", 2, 9, "hot"),  # the scan pushes 0 and 1 out
        ("fate", 4, 7, "cold"),  # ARC keeps 0 and 1 (used twice) in T2; misses move at the cold tier
        ("eap", 4, 7, "hot"),  # activation counts keep 0 and 1 (count 2) over the scan's count-1 experts
        ("ondemand", 0, 11, "hot"),  # nothing kept beyond the layer
        ("fmoe", 2, 9, "hot"),  # no gate inputs here, so no maps and no prefetch: its LRU alone
        ("klotski", 4, 7, "hot"),  # hot experts stay: 0 and 1 (used twice) outlast the scan; no prefetch here
    ],
)
def test_scripted_routing_counts(model_and_store, policy, hits, misses, tier):
    model, store = model_and_store
    provider, hot, cold = provider_for(model, store, policy, slots=3)
    layer = model.args.moe_layer_ids[1]
    x = torch.randn(1, model.args.hidden_size)
    for step in SCAN:
        for e, fn in provider.experts(layer, step, [1] * len(step)):
            assert e in step and fn(x).shape == x.shape
    s = provider.stats
    assert (s.hits, s.misses) == (hits, misses)
    assert dict(s.bytes_moved) == {tier: misses * (hot if tier == "hot" else cold)}


def test_waves_when_a_step_needs_more_experts_than_slots(model_and_store):
    model, store = model_and_store
    provider, hot, _ = provider_for(model, store, "lru", slots=2)
    layer = model.args.moe_layer_ids[0]
    served = [e for e, _ in provider.experts(layer, [0, 1, 2, 3, 4], [5, 1, 4, 2, 3])]
    assert sorted(served) == [0, 1, 2, 3, 4] and served[:2] == [0, 2]  # most tokens first
    assert provider.stats.misses == 5 and provider.stats.bytes_moved["hot"] == 5 * hot


def test_fate_prefetches_the_predicted_experts(model_and_store):
    model, store = model_and_store
    provider, _, _ = provider_for(model, store, "fate", slots=5)
    first, second = model.args.moe_layer_ids[:2]
    k = model.args.top_k
    router = provider.policy.ctx.routers[second]
    # a gate input pointing at expert 3 of the next router, with some of expert 5's direction
    hidden = (4 * router[3] / router[3].norm() ** 2 + 1.5 * router[5] / router[5].norm() ** 2).unsqueeze(0)
    provider.gate_input(first, hidden)
    predicted = provider.policy.predicted[second]
    assert len(predicted) == k + 1  # one token: its top k+1 under the next router
    assert not provider.layers[second].slot_of  # held until the routed layer's misses are queued
    list(provider.experts(first, [0], [1]))
    share = {e: float(p) * k for e, p in enumerate(router_probs(hidden, router)[0])}
    resident = provider.layers[second].tier_of
    assert 3 in resident and set(resident) <= predicted
    for e in predicted:  # decode: the router's confidence picks the tier, the weakest guesses stay on the host
        expected = "hot" if share[e] >= HOT_SHARE else "cold" if share[e] >= MIN_SHARE else None
        assert resident.get(e) == expected
    used = sorted(resident)[:1]
    list(provider.experts(second, used, [1]))
    assert provider.stats.hits == 1 and provider.stats.misses == 1  # the first layer's expert 0 was a miss
    s = provider.stats.layers[second]
    assert s.predicted == len(predicted) and s.predicted_used == 1 and s.used == 1


def test_misses_are_copied_before_the_next_layers_prefetches(model_and_store):
    """The copy stream runs in order: the routed layer's misses must not queue behind guesses."""
    model, store = model_and_store
    provider, _, _ = provider_for(model, store, "fate", slots=5)
    first, second = model.args.moe_layer_ids[:2]
    router = provider.policy.ctx.routers[second]
    copies = []
    load = provider.pool.load
    provider.pool.load = lambda layer, slot, host: (copies.append(layer), load(layer, slot, host))
    provider.gate_input(first, (8 * router[2] / router[2].norm() ** 2).unsqueeze(0))
    served = [e for e, _ in provider.experts(first, [0, 1], [1, 1])]
    assert served == [0, 1]
    assert copies[:2] == [first, first] and second in copies[2:]


def test_klotski_prefetches_what_followed_before(model_and_store):
    """Offline counts say expert 3 of the first layer is followed by 5 and 6 of the next: those are copied."""
    from predictors.coactivation import Coactivation

    model, store = model_and_store
    first, second = model.args.moe_layer_ids[:2]
    co = Coactivation(model.args.moe_layer_ids, model.args.num_experts)
    co.add_tokens(first, torch.tensor([[3, 0], [3, 1]]), torch.tensor([[5, 6], [5, 7]]))
    args = model.args
    plan = fixed_plan(args, store, 4)
    ctx = PolicyContext.of(args, model.routers(), lambda: co)
    provider = OffloadedExperts(store, plan, make_policy("klotski", ctx), torch.device("cpu"), torch.float32)
    list(provider.experts(first, [3], [2]))
    assert set(provider.layers[second].slot_of) == {5}  # as many as the layer needed: one, the likeliest
    list(provider.experts(first, [3, 0], [2, 1]))
    assert set(provider.layers[second].slot_of) == {5, 6}  # scores 5: 2 x 1/2 + 1/2, 6: 2 x 1/4 + 1/2, 7: 2 x 1/4
    list(provider.experts(second, [5, 6], [1, 1]))
    assert provider.stats.layers[second].hits == 2 and provider.stats.layers[second].recall == 1.0


def test_fmoe_finds_a_repeated_step_in_its_expert_maps(model_and_store):
    """The second time the same router inputs come, the stored map predicts every layer's experts exactly."""
    model, store = model_and_store
    provider, _, _ = provider_for(model, store, "fmoe", slots=8)
    layers = list(model.args.moe_layer_ids)
    hidden = {layer: torch.randn(1, model.args.hidden_size) for layer in layers}
    routed = {layer: torch.topk(hidden[layer] @ provider.policy.ctx.routers[layer].t(), model.args.top_k).indices[0]
              for layer in layers}
    for _ in range(2):
        provider.begin_request()
        for layer in layers:
            provider.gate_input(layer, hidden[layer])
            ids = routed[layer].tolist()
            list(provider.experts(layer, ids, [1] * len(ids)))
    assert len(provider.policy.store) == 2
    for layer in layers[1:]:
        s = provider.stats.layers[layer]
        assert s.recall == 1.0 and s.predicted == model.args.top_k  # similarity 1: exactly top-k, all used
        assert s.hits >= model.args.top_k  # the second pass found them prefetched
