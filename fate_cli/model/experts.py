"""The one narrow interface between the model and expert weights.

The MoE block routes, then asks its provider for "experts e1, e2, ... of layer l" and gets back
callables that compute each expert's FFN. Resident, quantized, cached and offloaded experts are all
providers: the model code never knows which one runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

ExpertFn = Callable[[torch.Tensor], torch.Tensor]


class ExpertProvider(Protocol):
    def gate_input(self, layer: int, hidden: torch.Tensor) -> None:
        """Layer `layer`'s router input ([tokens, hidden]), seen before routing: a predictor's hook."""

    def experts(
        self, layer: int, ids: Sequence[int], token_counts: Sequence[int]
    ) -> Iterable[tuple[int, ExpertFn]]:
        """(expert, FFN callable) for each of `ids` of `layer`, in the order the provider wants them run;
        token_counts[i] tokens route to ids[i]."""


class DenseExpert:
    """An expert held as three plain matrices: down(silu(gate(x)) * up(x))."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        self.gate, self.up, self.down = gate, up, down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


class ResidentExperts:
    """Every expert of every MoE layer in memory on the compute device, at the model's dtype."""

    def __init__(self, layers: dict[int, list[DenseExpert]]):
        self.layers = layers

    def gate_input(self, layer: int, hidden: torch.Tensor) -> None:
        pass

    def experts(
        self, layer: int, ids: Sequence[int], token_counts: Sequence[int]
    ) -> Iterable[tuple[int, ExpertFn]]:
        table = self.layers[layer]
        return [(e, table[e]) for e in ids]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for experts in self.layers.values() for e in experts)
