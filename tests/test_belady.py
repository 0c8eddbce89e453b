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
