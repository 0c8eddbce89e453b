"""Slots per layer by measurement: each layer's miss curve (loads as a function of its slots, Belady's MIN on
recorded routing) and a greedy share of the total to the layers where a slot saves the most loads.

MIN curves need not be convex (a layer may gain nothing from one more slot and much from three), so each grant
is the run of slots with the best saving per slot at some layer (the lookahead of utility-based cache
partitioning, Qureshi & Patt 2006), not the best single slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cache.belady import min_loads


def miss_curve(steps: Sequence[Sequence[int]], num_experts: int, counted: Sequence[bool] | None = None) -> list[int]:
    """MIN's loads on a layer's routing for 0..num_experts slots."""
    return [min_loads(steps, c, counted) for c in range(num_experts + 1)]


def allocate(curves: Mapping[int, Sequence[float]], total: int, least: int, most: int) -> dict[int, int]:
    """Slots per layer summing to `total` (or every layer at `most`): each at least `least`, at most `most`,
    the rest granted where the curve falls fastest; ties go to the shallower layer."""
    slots = {layer: least for layer in curves}
    spare = total - least * len(curves)

    def best_run(layer: int) -> tuple[float, int]:
        """The best saving per slot over a run of more slots at `layer`, and the run's length (0: full)."""
        curve, have = curves[layer], slots[layer]
        best = (0.0, 0)
        for extra in range(1, most - have + 1):
            rate = (curve[have] - curve[have + extra]) / extra
            if best[1] == 0 or rate > best[0]:
                best = (rate, extra)
        return best

    runs = {layer: best_run(layer) for layer in curves}
    while spare > 0:
        open_layers = [layer for layer in curves if runs[layer][1]]
        if not open_layers:  # every layer full
            break
        layer = max(open_layers, key=lambda lay: (runs[lay][0], -lay))
        rate, extra = runs[layer]
        if rate <= 0:  # no layer gains from more: one slot at a time to the layer with fewest, shallowest first
            layer, extra = min(open_layers, key=lambda lay: (slots[lay], lay)), 1
        extra = min(extra, spare)
        slots[layer] += extra
        spare -= extra
        runs[layer] = best_run(layer)
    return slots
