"""Loads an online eviction rule makes on recorded routing, without prefetch: what Belady's MIN (cache/belady.py)
is held against when the question is the eviction alone.

A layer's routing is replayed through one of cache/eviction.py's rules in the expert cache's own order
(cache/offload.py `_take_routing`, `_admit`, `_serve`): the rule observes the step's routing, hits are touched,
misses (most tokens first) load while a slot is free or held by an expert the step does not use, and a step wider
than the slots loads the rest as the step's earlier experts are served. Every load is a miss.

`ahead_loads` replays the same routing with the step's experts known before the step (a perfect predictor of the
current token's routing, blind to later tokens): they are loaded ahead, never evicting one the step uses, and the
step itself then misses only where the step is wider than the slots. The loads are the same: prediction moves a
load earlier, it does not remove one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol


class Eviction(Protocol):
    """cache/eviction.py's interface: residency, a hit, the victim for an incoming expert, an admission."""

    def __contains__(self, expert: int) -> bool: ...

    def touch(self, expert: int) -> None: ...

    def victim(self, pinned: Collection[int], incoming: int | None = None) -> int: ...

    def admit(self, expert: int, victim: int | None) -> None: ...


Observe = Callable[[Sequence[int]], None]  # told every step's routed experts, resident or not (a rule's history)


class _Slots:
    """One layer's resident experts under a rule, counting loads."""

    def __init__(self, eviction: Eviction, capacity: int):
        self.eviction, self.capacity = eviction, capacity
        self.resident: set[int] = set()
        self.loads = 0

    def room(self, pinned: Collection[int]) -> bool:
        return len(self.resident) < self.capacity or any(e not in pinned for e in self.resident)

    def load(self, expert: int, pinned: Collection[int]) -> None:
        victim = None
        if len(self.resident) >= self.capacity:
            victim = self.eviction.victim(pinned, expert)
            self.resident.remove(victim)
        self.eviction.admit(expert, victim)
        self.resident.add(expert)
        self.loads += 1


def _order(step: Sequence[int], counts: Sequence[int] | None) -> list[int]:
    """The step's experts, most tokens first (stable), as the cache queues its misses."""
    ids = list(step)
    if counts is None:
        return ids
    return [e for e, _ in sorted(zip(ids, counts), key=lambda ec: -ec[1])]


def demand_loads(steps: Sequence[Sequence[int]], eviction: Eviction, capacity: int,
                 counted: Sequence[bool] | None = None, observe: Observe | None = None,
                 counts: Sequence[Sequence[int]] | None = None) -> int:
    """Loads of `eviction` over `capacity` slots (empty at first) serving `steps` (one layer's routed experts per
    step), loading only what a step misses. counted: only the marked steps' loads are summed. counts: tokens per
    routed expert of each step (the order misses are loaded in when the step is wider than the slots)."""
    slots = _Slots(eviction, capacity)
    total = 0
    for t, step in enumerate(steps):
        before = slots.loads
        if observe is not None:
            observe(step)
        hits = [e for e in step if e in slots.resident]
        misses = [e for e in _order(step, counts[t] if counts else None) if e not in slots.resident]
        for e in hits:
            eviction.touch(e)
        pinned = set(step)
        for e in misses:
            if slots.room(pinned):
                slots.load(e, pinned)
        for e in hits + misses:  # served in this order; a served expert may make room for the rest
            if e not in slots.resident:
                slots.load(e, pinned)
            pinned.discard(e)
        if counted is None or counted[t]:
            total += slots.loads - before
    return total


def ahead_loads(steps: Sequence[Sequence[int]], eviction: Eviction, capacity: int,
                counted: Sequence[bool] | None = None, observe: Observe | None = None,
                counts: Sequence[Sequence[int]] | None = None) -> tuple[int, int]:
    """(loads, misses) of `eviction` when each step's experts are known before it: they are loaded ahead while
    there is room without evicting any of them, then the step is served and misses only what did not fit.
    Summed over the counted steps."""
    slots = _Slots(eviction, capacity)
    loads = misses = 0
    for t, step in enumerate(steps):
        before = slots.loads
        if observe is not None:
            observe(step)
        need = set(step)
        for e in step:  # experts already resident are used by this step: a hit, ahead of it
            if e in slots.resident:
                eviction.touch(e)
        order = _order(step, counts[t] if counts else None)
        for e in order:  # ahead: never evicting what the step uses
            if e not in slots.resident and slots.room(need):
                slots.load(e, need)
        missed = 0
        pinned = set(step)
        ready = [e for e in step if e in slots.resident]
        for e in ready + [e for e in order if e not in slots.resident]:  # the step: what was loaded ahead is a hit
            if e not in slots.resident:
                missed += 1
                slots.load(e, pinned)
            pinned.discard(e)
        if counted is None or counted[t]:
            loads += slots.loads - before
            misses += missed
    return loads, misses
