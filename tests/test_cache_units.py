"""Planner, sizes and eviction policies, against results worked out by hand."""

from __future__ import annotations

import pytest
import torch

from cache.budget import parse_size
from cache.eviction import ARC, LRU, ByPriority
from cache.planner import Footprint, default_shallow_layers, make_plan, minimum_budget
from fate_cli.errors import ResourceError, UsageError


@pytest.mark.parametrize(
    "text,expected",
    [("8GB", 8 * 10**9), ("8GiB", 8 * 2**30), ("7.5G", 75 * 10**8), ("800MB", 800 * 10**6), ("512", 512)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["8XB", "-1", "0", "", "GB", "1.2.3GB"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(UsageError):
        parse_size(text)


def run_steps(policy, steps):
    """Feed per-step expert lists through an eviction policy as the cache does; count hits and misses."""
    hits = misses = 0
    resident = set(policy.resident())
    for step in steps:
        pinned = set(step)
        for e in step:
            if e in policy:
                hits += 1
                policy.touch(e)
        for e in step:
            if e not in policy:
                misses += 1
                victim = policy.victim(pinned, e) if len(resident) >= policy.capacity else None
                policy.admit(e, victim)
                resident.discard(victim)
                resident.add(e)
        assert set(policy.resident()) == resident
    return hits, misses


def test_lru_by_hand():
    # capacity 2: [A,B] 2 misses; [A,C] A hit, C evicts B; [B,C] B evicts A, C hit; [A,B] A evicts C, B hit
    assert run_steps(LRU(2), [[0, 1], [0, 2], [1, 2], [0, 1]]) == (3, 5)


def test_lru_never_evicts_this_steps_experts():
    lru = LRU(3)
    run_steps(lru, [[0, 1, 2]])
    lru.touch(0)
    lru.touch(1)
    assert lru.victim(pinned={2}) == 0  # 2 is least recent but pinned


def test_arc_keeps_frequent_experts_through_a_scan():
    # capacity 3. Experts 0 and 1 are used twice (T2). A scan of new experts 2..6 must churn only T1.
    arc = ARC(3)
    hits, misses = run_steps(arc, [[0], [1], [0], [1], [2], [3], [4], [5], [6], [0], [1]])
    assert (hits, misses) == (4, 7)  # 0 and 1 hit twice each; LRU would have lost them in the scan
    lru_hits, _ = run_steps(LRU(3), [[0], [1], [0], [1], [2], [3], [4], [5], [6], [0], [1]])
    assert lru_hits == 2


def test_arc_ghost_hit_grows_recency_target():
    arc = ARC(2)
    run_steps(arc, [[0], [1], [2]])  # 0 evicted from T1 into B1
    assert 0 in arc.b1 and arc.p == 0
    run_steps(arc, [[0]])  # a B1 ghost hit: recency was undervalued
    assert arc.p == 1 and 0 in arc.t2


def test_priority_evicts_lowest_count():
    counts = {0: 5, 1: 1, 2: 3, 3: 9}
    cache = ByPriority(2, counts.__getitem__)
    run_steps(cache, [[0, 1], [2]])
    assert set(cache.resident()) == {0, 2}  # 1 had the lowest count


def fp(layers=8, experts=32, k=4, hot=10_000, full=40_000):
    return Footprint(tuple(range(layers)), experts, k, non_expert=2_000_000, expert_hot=hot, expert_full=full,
                     kv_cache=500_000, workspace=100_000)


def test_plan_refuses_below_minimum_and_names_it():
    f = fp()
    assert minimum_budget(f) == 2_600_000 + 8 * 4 * 10_000
    with pytest.raises(ResourceError, match="minimum of 2.92 MB"):
        make_plan(f, 2_919_999)
    plan = make_plan(f, 2_920_000)
    assert plan.slots == {layer: 4 for layer in range(8)} and plan.device_bytes == 2_920_000


def test_plan_everything_fits():
    plan = make_plan(fp(), 10**8)
    assert not plan.offloaded and plan.full_layers == (0,)
    assert all(n == 32 for n in plan.slots.values())


def test_plan_shallow_favoring_split():
    f = fp()
    plan = make_plan(f, 2_600_000 + 150 * 10_000)  # 150 slots of 256
    assert plan.full_layers == ()  # layer 0 at 16 bits would take slots from the others
    assert default_shallow_layers(8) == 2
    assert plan.slots[0] == plan.slots[1] == 32  # the shallow layers are cached whole
    deep = [plan.slots[layer] for layer in range(2, 8)]
    assert sum(deep) == 150 - 64 and max(deep) - min(deep) <= 1 and deep == sorted(deep, reverse=True)
    assert plan.device_bytes <= plan.budget
    # layer 0 goes to 16 bits only once every other layer is whole at the hot tier
    assert make_plan(f, 2_600_000 + 32 * 40_000 + 7 * 32 * 10_000).full_layers == (0,)
    assert make_plan(f, 2_600_000 + 32 * 40_000 + 7 * 32 * 10_000 - 1).full_layers == ()
    uniform = make_plan(f, plan.budget, split="uniform")
    assert max(uniform.slots.values()) - min(uniform.slots.values()) <= 1
    assert uniform.total_slots == plan.total_slots


def test_experts_by_mass():
    from predictors.expert_map import experts_by_mass

    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    assert experts_by_mass(probs, similarity=1.0, top_k=2) == [1, 3]  # a perfect match: top-k only
    assert experts_by_mass(probs, similarity=0.2, top_k=1) == [1, 3, 4]  # 0.85 >= 0.8
    assert experts_by_mass(probs, similarity=0.0, top_k=1) == [1, 3, 4, 2, 0]


def test_expert_map_store_matches_and_is_bounded():
    from predictors.expert_map import ExpertMapStore

    store = ExpertMapStore(num_layers=2, num_experts=3, capacity=2)
    a, b = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.tensor([[0, 0, 1.0], [1.0, 0, 0]])
    store.add(torch.tensor([1.0, 0.0]), a)
    store.add(torch.tensor([0.0, 1.0]), b)
    assert torch.equal(store.semantic_match(torch.tensor([0.1, 2.0]))[0], b)
    got, sim = store.trajectory_match({0: torch.tensor([0.9, 0.1, 0.0])})
    assert torch.equal(got, a) and 0.9 < sim <= 1.0
    store.add(torch.tensor([1.0, 1.0]), a)
    assert len(store) == 2 and torch.equal(store.maps[0], b)  # the oldest went


def test_coactivation_counts_and_scores():
    from predictors.coactivation import Coactivation

    co = Coactivation([0, 2, 3], num_experts=4)
    co.add_tokens(0, torch.tensor([[0, 1], [0, 2]]), torch.tensor([[3, 1], [3, 2]]))
    assert co.counts[0].tolist() == [[0, 1, 1, 2], [0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert co.predict(0, [0], [1], 4) == [3, 1, 2]  # P(3|0) = 1/2, P(1|0) = P(2|0) = 1/4, nothing for 0
    assert co.predict(0, [1, 2], [3, 1], 2) == [3, 1]  # 3 * (1/2, 1/2) + 1 * (0, 1/2 for 2, 1/2 for 3)
    assert co.predict(3, [0], [1], 4) == []  # the last MoE layer has no next
    assert co.predict(0, [1, 2], [3, 1], 4, min_score=1.0) == [3, 1]  # scores 2, 1.5, 0.5: two reach a token
    assert co.popularity(0).tolist() == [4, 2, 2, 0]  # tokens x next choices through each expert of layer 0
    assert co.popularity(2).tolist() == [0, 2, 2, 4]  # layer 2 (after 0): its column sums
    assert co.popularity(3).tolist() == [0, 0, 0, 0]  # nothing gathered between 2 and 3 yet
    co.add_counts(2, [1, 2], [2, 1], [0], [3])  # online: 2 and 1 tokens here, 3 tokens to expert 0 next
    assert co.counts[2][1, 0] == 2.0 and co.counts[2][2, 0] == 1.0


def test_coactivation_gathered_from_a_model(tmp_path):
    from fate_cli.engine.coactivation import gather
    from fate_cli.model.loader import load_model
    from tests.tiny_models import make_tiny_model

    path = make_tiny_model(tmp_path / "m", family="mixtral")
    model = load_model(path, torch.device("cpu"), torch.float32).model
    a = model.args
    co = gather(model, list(range(5, 5 + 3 * 16)), window=16)  # three windows of 16 tokens
    moe = list(a.moe_layer_ids)
    for layer in moe[:-1]:  # every token gives top_k x top_k pairs between consecutive MoE layers
        assert co.counts[layer].sum() == 3 * 16 * a.top_k * a.top_k


def test_group_size_covers_copies_within_memory():
    from cache.microbatch import LayerTimes, plan_groups

    def groups(times, lengths=(100,) * 8, copies=10, max_tokens=10_000):  # noqa: ANN001, ANN202
        return plan_groups(list(lengths), LayerTimes(*times), copies, 32, 2, max_tokens)

    # 10 copies: 10 ms a layer; a 100-token prompt computes 0.1 ms: 100 prompts would cover, 8 is the most
    assert groups((1e-3, 0.0, 5e-7)) == [list(range(8))]
    assert groups((1e-3, 0.0, 5e-7), max_tokens=350) == [[0, 1, 2], [3, 4, 5], [6, 7]]  # memory for 3
    assert groups((1e-3, 0.0, 1.25e-5)) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 4 prompts' compute covers the copies
    assert groups((0.0, 0.0, 1e-6)) == [[i] for i in range(8)]  # nothing to cover, no fixed cost: alone
    assert groups((0.0, 1e-4, 0.0), lengths=(100,) * 3) == [[0, 1, 2]]  # launch-bound calls: one call for all
    assert groups((1e-3, 0.0, 5e-7), lengths=(10, 500, 20), max_tokens=600) == [[0], [1], [2]]  # 2 do not fit


def test_klotski_plan_sizes_groups_from_the_workspace_and_spare_budget():
    from cache.setup import plan_slots

    f = Footprint(tuple(range(8)), 32, 4, non_expert=2_000_000, expert_hot=10_000, expert_full=40_000,
                  kv_cache=500_000, workspace=100_000, token_bytes=100, group_bytes=60_000)
    budget = f.fixed + 1_600_000 + 5_000  # 160 slots of hot-tier size and half a slot to spare
    lru, klotski = plan_slots(f, "lru", budget, False), plan_slots(f, "klotski", budget, False)
    assert lru.group_tokens == 0 and lru.total_slots == klotski.total_slots == 160  # no slot given up
    assert klotski.group_tokens == (60_000 + 5_000) // 100
