"""Demand loads of online eviction rules (cache/online.py) on sequences worked out by hand, held against MIN."""

import random
from collections.abc import Callable, Sequence

from cache.belady import min_loads
from cache.eviction import ARC, LRU, DecayedFrequency
from cache.online import ahead_loads, demand_loads

STEPS = [(0,), (1,), (0,), (2,), (1,), (0,)]


def decayed(capacity: int, decay: float) -> tuple[DecayedFrequency, Callable[[Sequence[int]], None]]:
    ev = DecayedFrequency(capacity, decay)
    return ev, ev.step


def test_lru_on_a_hand_worked_sequence():
    # 2 slots: 0, 1 load; 0 hits; 2 evicts 1 (least recent); 1 evicts 0; 0 evicts 2: five loads
    assert demand_loads(STEPS, LRU(2), 2) == 5
    assert demand_loads(STEPS, LRU(2), 2, counted=[False, False, False, True, True, True]) == 3


def test_decayed_counts_on_a_hand_worked_sequence():
    # decay 0.9, scores at the step of each load: 2 arrives with 0 at 1.81*0.9 = 1.63 and 1 at 0.81: 1 leaves;
    # 1 comes back with 0 at 1.81*0.81 = 1.47 and 2 at 0.9: 2 leaves; 0 hits. Four loads.
    ev, observe = decayed(2, 0.9)
    assert demand_loads(STEPS, ev, 2, observe=observe) == 4
    # decay 0.5 forgets fast: 1 returns scored 1.125 against 0's 0.3125 and 2's 0.5, so 0 leaves, then 2 for 0
    ev, observe = decayed(2, 0.5)
    assert demand_loads(STEPS, ev, 2, observe=observe) == 5


def test_min_is_below_each_rule_and_may_drop_what_it_just_loaded():
    # MIN serves 2 without keeping it (0 and 1 are used again first): three loads. A cache where each load takes
    # a slot evicts 0 or 1 for it and loads one of them again: four at best.
    assert min_loads([set(s) for s in STEPS], 2) == 3
    ev, observe = decayed(2, 0.9)
    assert min_loads([set(s) for s in STEPS], 2) <= demand_loads(STEPS, ev, 2, observe=observe)


def test_a_step_wider_than_the_slots_loads_its_most_used_experts_first():
    # 2 slots, step (0, 1, 2) then (0,): with equal counts 0 and 1 take the free slots, 2 waits for 0 to be served
    # and evicts it, so the next step loads 0 again (4 loads); with 2 the most used, 2 and 0 load first and 1
    # evicts 2 once it is served, so 0 hits (3 loads, MIN's count)
    steps = [(0, 1, 2), (0,)]
    assert demand_loads(steps, LRU(2), 2, counts=[[1, 1, 1], [1]]) == 4
    assert demand_loads(steps, LRU(2), 2, counts=[[1, 1, 5], [1]]) == 3
    assert min_loads([set(s) for s in steps], 2) == 3


def test_knowing_the_step_ahead_loads_the_same_experts_without_a_miss():
    rng = random.Random(1)
    steps = [tuple(rng.sample(range(16), 4)) for _ in range(300)]
    for capacity in (4, 8, 12):
        for make in (lambda c: (LRU(c), None), lambda c: (ARC(c), None), lambda c: decayed(c, 0.95)):
            ev, observe = make(capacity)
            demand = demand_loads(steps, ev, capacity, observe=observe)
            ev, observe = make(capacity)
            assert ahead_loads(steps, ev, capacity, observe=observe) == (demand, 0)


def test_min_is_a_floor_for_every_rule():
    rng = random.Random(0)
    steps = [tuple(rng.sample(range(12), 3)) for _ in range(200)]
    for capacity in (3, 5, 8):
        floor = min_loads([set(s) for s in steps], capacity)
        for make in (lambda c: (LRU(c), None), lambda c: (ARC(c), None), lambda c: decayed(c, 0.5),
                     lambda c: decayed(c, 0.99)):
            ev, observe = make(capacity)
            assert floor <= demand_loads(steps, ev, capacity, observe=observe)
