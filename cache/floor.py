"""Belady's MIN beside a run: the routing a cache served, recorded per layer, and the fewest loads (and bytes)
any policy could have served it with, given the run's own slots.

A bench row records its requests' routing (`RoutingLog`), counts only what follows its warm-up (the floor
starting from the experts the run's slots held then, as the run itself does), and afterwards holds the policy's
loads against `floor_of`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from cache.belady import min_loads


class RoutingLog:
    """Per cached layer, the experts each step routed to, in order. `count_from_here` starts counting from the
    cache as the run holds it then (what its warm-up left): the floor is for the counted steps from that state."""

    def __init__(self) -> None:
        self.steps: dict[int, list[tuple[int, ...]]] = {}
        self.start: dict[int, int] = {}
        self.held: dict[int, frozenset[int]] = {}

    def record(self, layer: int, ids: Sequence[int]) -> None:
        self.steps.setdefault(layer, []).append(tuple(ids))

    def count_from_here(self, held: Mapping[int, Collection[int]]) -> None:
        """held: the experts each layer's slots hold now."""
        self.start = {layer: len(steps) for layer, steps in self.steps.items()}
        self.held = {layer: frozenset(experts) for layer, experts in held.items()}

    def min_loads(self, capacities: Mapping[int, int]) -> int:
        """MIN's loads over the counted steps, each layer with its own slots (a layer not listed holds every
        expert and loads nothing)."""
        return sum(min_loads(self.steps[layer][self.start.get(layer, 0):], capacities[layer],
                             initial=self.held.get(layer, ()))
                   for layer in self.steps if layer in capacities)


@dataclass(frozen=True)
class Floor:
    loads: int  # the fewest expert loads any policy could have made
    nbytes: int  # those loads at the smallest tier the policy's transfers may use
    tier: str

    def over(self, loads: int, nbytes: int) -> tuple[float | None, float | None]:
        """A policy's loads and bytes over the floor's (None where the floor is zero)."""
        return (loads / self.loads if self.loads else None, nbytes / self.nbytes if self.nbytes else None)


def floor_of(log: RoutingLog, capacities: Mapping[int, int], tier_bytes: Mapping[str, int]) -> Floor:
    """The floor for a run's slots; tier_bytes: one expert's bytes at each tier the policy may move."""
    tier = min(tier_bytes, key=tier_bytes.__getitem__)
    loads = log.min_loads(capacities)
    return Floor(loads, loads * tier_bytes[tier], tier)
