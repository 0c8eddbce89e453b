"""The one narrow interface between the model and expert weights.

The MoE block routes, then asks its provider for "experts e1, e2, ... of layer l" and gets back
callables that compute each expert's FFN. Resident, quantized, cached and offloaded experts are all
providers: the model code never knows which one runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from quant.moe_kernels import DenseBank

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


def stack_experts(experts: list[DenseExpert]) -> DenseBank:
    """One layer's experts as one bank (quant/moe_kernels.py) for the fused decode kernels; each DenseExpert
    then holds views into the bank, so the layer is not held twice."""
    from quant.moe_kernels import DenseBank, identity_table

    first = experts[0]
    gate_up = torch.stack([torch.cat((e.gate, e.up)) for e in experts])
    down = torch.stack([e.down for e in experts])
    inter = first.gate.shape[0]
    for e, gu, d in zip(experts, gate_up, down):
        e.gate, e.up, e.down = gu[:inter], gu[inter:], d
    return DenseBank(gate_up, down, identity_table(len(experts), gate_up.device))


class ResidentExperts:
    """Every expert of every MoE layer in memory on the compute device, at the model's dtype."""

    def __init__(self, layers: dict[int, list[DenseExpert]]):
        self.layers = layers
        self._banks: dict[int, DenseBank] = {}

    def bank(self, layer: int) -> DenseBank:
        """The layer's experts stacked for the fused decode step (made on first use)."""
        if layer not in self._banks:
            self._banks[layer] = stack_experts(self.layers[layer])
        return self._banks[layer]

    def needs_host(self, layer: int) -> bool:
        """Whether a decode step must show the host this layer's routing: never, every expert is here."""
        return False

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
