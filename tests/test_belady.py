"""Belady's MIN on sequences worked out by hand."""

from cache.belady import min_loads


def test_a_scan_keeps_the_experts_used_again():
    # 2 slots: 0 and 1 load; 2 loads and is dropped (0 and 1 come back first); 0 and 1 hit. LRU would load 5 times.
    assert min_loads([{0}, {1}, {2}, {0}, {1}], 2) == 3


def test_a_step_wider_than_the_slots_loads_each_expert_it_lacks():
    # 2 slots, 3 experts in one step: three loads, then 0 (used next) stays and the next step hits
    assert min_loads([{0, 1, 2}, {0}], 2) == 3
    assert min_loads([{0, 1, 2}, {0}, {2}], 2) == 3  # 0 and 2 are the two kept: both used again


def test_furthest_in_future_is_evicted():
    # 2 slots: after 0, 1 the step needing 2 evicts 1 (next used at step 5) rather than 0 (step 3)
    steps = [{0}, {1}, {2}, {0}, {2}, {1}]
    assert min_loads(steps, 2) == 4  # 0, 1, 2, then 1 again; 0 and 2 hit
    assert min_loads(steps, 3) == 3  # everything fits: one load per expert


def test_the_cache_may_start_full():
    # 2 slots holding 0 and 1: 0 hits, 2 evicts 1 (never used again), 0 hits; 3 loads evicting 2
    assert min_loads([{0}, {2}, {0}, {3}], 2, initial={0, 1}) == 2
    assert min_loads([{0}], 1, initial={0}) == 0


def test_only_the_counted_steps_are_summed():
    steps = [{0}, {1}, {0}, {2}]
    # 1 slot: 0 loads; 1 loads and is dropped again (0 comes back first); 0 hits; 2 loads
    assert min_loads(steps, 1) == 3
    assert min_loads(steps, 1, counted=[False, False, True, True]) == 1  # the warm-up's loads are not counted


def test_never_more_than_any_policy():
    """MIN is a floor: on a random sequence it loads no more than LRU with the same slots."""
    import random
    from collections import OrderedDict

    rng = random.Random(0)
    steps = [set(rng.sample(range(12), 3)) for _ in range(200)]
    for capacity in (3, 5, 8):
        lru, loads = OrderedDict(), 0
        for step in steps:
            for e in step:
                if e in lru:
                    lru.move_to_end(e)
                else:
                    loads += 1
                    lru[e] = True
            while len(lru) > capacity:
                for victim in lru:
                    if victim not in step:
                        del lru[victim]
                        break
        assert min_loads(steps, capacity) <= loads


def test_the_routing_log_counts_only_after_the_warm_up():
    from cache.floor import RoutingLog, floor_of

    log = RoutingLog()
    for ids in ([0, 1], [2]):  # the warm-up: both layers
        log.record(3, ids)
    log.record(4, [5])
    log.count_from_here({3: {1, 2}, 4: {5}})  # what the run's slots hold after its warm-up
    for ids in ([0], [2], [1]):
        log.record(3, ids)
    log.record(4, [5])
    log.record(4, [6])
    # layer 3, 2 slots holding 1 and 2: 0 loads and is dropped again (never used after), 2 and 1 hit; layer 4,
    # 1 slot holding 5: 5 hits, 6 loads
    assert log.min_loads({3: 2, 4: 1}) == 2
    assert log.min_loads({3: 2}) == 1  # a layer not listed holds every expert
    floor = floor_of(log, {3: 2, 4: 1}, {"hot": 100, "cold": 55})
    assert (floor.loads, floor.nbytes, floor.tier) == (2, 110, "cold")  # bytes at the smallest tier moved
    assert floor.over(6, 330) == (3.0, 3.0)
    assert floor_of(RoutingLog(), {}, {"hot": 100}).over(0, 0) == (None, None)


def test_miss_curves_and_the_measured_allocation():
    from cache.allocation import allocate, miss_curve

    # one expert used every step, two alternating: one slot saves 3 of 4 loads of the first kind
    steady = [{0}, {0}, {0}, {0}]
    assert miss_curve(steady, 3) == [4, 1, 1, 1]
    alternating = [{1}, {2}, {1}, {2}]
    assert miss_curve(alternating, 3) == [4, 3, 2, 2]
    # 4 slots, each layer at least 1: the third slot goes where it saves a load (layer 8); the fourth saves
    # nothing anywhere and goes to the layer with fewest, the shallower first
    assert allocate({7: [4, 1, 1, 1], 8: [4, 3, 2, 2]}, 3, 1, 3) == {7: 1, 8: 2}
    assert allocate({7: [4, 1, 1, 1], 8: [4, 3, 2, 2]}, 4, 1, 3) == {7: 2, 8: 2}
    # a curve that gains nothing from one more slot but much from two: the run of two is granted together
    assert allocate({1: [9, 9, 9, 9, 0], 2: [9, 8, 7, 6, 5]}, 4, 0, 4) == {1: 4, 2: 0}
    assert allocate({1: [2, 1, 0], 2: [2, 1, 0]}, 9, 0, 2) == {1: 2, 2: 2}  # more than fits: every layer full


def test_measured_plan_follows_the_curves():
    from cache.planner import Footprint, make_plan

    fp = Footprint((0, 1), 4, 1, 0, 10, 40, 0, 0)
    curves = {0: [8, 1, 1, 1, 0], 1: [8, 6, 4, 2, 0]}  # layer 0 needs one slot, layer 1 gains from each
    plan = make_plan(fp, 60, "measured", curves=curves)  # 6 slots: layer 1 fills first, the last goes to layer 0
    assert plan.slots == {0: 2, 1: 4}
    assert make_plan(fp, 60, "measured").slots == make_plan(fp, 60, "uniform").slots  # no curves: evenly


def test_decayed_frequency_evicts_the_least_used_recently():
    from cache.eviction import DecayedFrequency

    ev = DecayedFrequency(2, 0.5)
    for step in ([0], [0], [1]):
        ev.step(step)
    ev.admit(0, None)
    ev.admit(1, None)
    # 0: 0.25 + 0.5 = 0.75, 1: 1.0 -> 0 leaves; once pinned, 1 does
    assert ev.victim(set()) == 0 and ev.victim({0}) == 1
    ev.step([0])  # 0: 1.375, 1: 0.5
    assert ev.victim(set()) == 1
    assert ev.score(7) == 0.0  # never used
