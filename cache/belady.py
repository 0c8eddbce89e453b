"""Belady's MIN: the fewest expert loads any policy can make to serve a layer's routing with a fixed number of slots.

A policy's loads (misses and prefetches alike: a prefetch is a load too) can be held against this floor. The
routing is the experts each step of one layer used, in order. After each step the cache keeps, of what it held and
what the step loaded, the `capacity` experts used again soonest (furthest-in-future eviction); a step that routes to
more experts than there are slots loads each one it lacks, and keeps the soonest-needed afterwards.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

NEVER = float("inf")


def min_loads(steps: Sequence[Collection[int]], capacity: int, counted: Sequence[bool] | None = None,
              initial: Collection[int] = ()) -> int:
    """Loads MIN makes serving `steps` from a cache of `capacity` slots holding `initial` (empty by default); with
    `counted`, only the loads of the steps marked True are summed (earlier steps still warm the cache, as a bench's
    warm-up request does)."""
    uses: dict[int, list[int]] = {}
    for t, step in enumerate(steps):
        for e in step:
            uses.setdefault(e, []).append(t)
    position = {e: 0 for e in uses}  # index into uses[e] of its next use at or after the current step

    def next_use(e: int, after: int) -> float:
        if e not in uses:
            return NEVER
        times = uses[e]
        i = position[e]
        while i < len(times) and times[i] <= after:
            i += 1
        position[e] = i
        return times[i] if i < len(times) else NEVER

    cache: set[int] = set(initial)
    loads = 0
    for t, step in enumerate(steps):
        need = set(step)
        if counted is None or counted[t]:
            loads += len(need - cache)
        held = cache | need
        if len(held) > capacity:
            held = set(sorted(held, key=lambda e: (next_use(e, t), e))[:capacity])
        cache = held
    return loads
