"""The one narrow interface between the model and expert weights.

The MoE block routes, then asks its provider for "experts e1, e2, ... of layer l" and gets back
callables that compute each expert's FFN. Resident, quantized, cached and offloaded experts are all
providers: the model code never knows which one runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from quant.expert_act import ClampedSwiGLU
    from quant.layout import ExpertLayout
    from quant.moe_kernels import Bank, DenseBank
    from quant.store import TierStore

ExpertFn = Callable[[torch.Tensor], torch.Tensor]


class ExpertProvider(ABC):
    """Everything the model and the engine ask of expert weights, whatever holds them (resident, tiered,
    offloaded behind a cache, or a recorder wrapped around another provider).

    The eager forward (every prefill, and decode where no captured step runs) calls `gate_input` then
    `experts` for each MoE layer. A request starts with `begin_request`, and a batch's prompts are prefilled
    in the groups `prefill_groups` gives. The captured decode step (fate_cli/engine/decode_step.py) runs where
    `fused` holds: it reads each layer's experts through `bank(layer)`, and for the layers where `needs_host`
    it stops after the router to hand the host the routing: `gate_lookahead` (the next layer's top k+1,
    computed on the device through `lookahead_router`) or else `gate_input`, then `prepare`, then the layer's
    kernels, then `finish`. Hooks a provider has no use for keep the defaults below.
    """

    @abstractmethod
    def experts(
        self, layer: int, ids: Sequence[int], token_counts: Sequence[int]
    ) -> Iterable[tuple[int, ExpertFn]]:
        """(expert, FFN callable) for each of `ids` of `layer`, in the order the provider wants them run;
        token_counts[i] tokens route to ids[i]."""

    def gate_input(self, layer: int, hidden: torch.Tensor) -> None:  # noqa: B027 - a hook; by default nothing to do
        """Layer `layer`'s router input ([tokens, hidden]), seen before routing: a predictor's hook."""

    def begin_request(self) -> None:  # noqa: B027 - a hook; by default nothing to do
        """A new request starts (per-request predictors reset what they keep across steps)."""

    def prefill_groups(self, lengths: Sequence[int]) -> list[list[int]]:
        """The prompts of a batch (by their lengths) in the groups prefilled together through each layer: by
        default each prompt alone."""
        return [[i] for i in range(len(lengths))]

    # ---- the captured decode step --------------------------------------------------------------------

    @property
    def fused(self) -> bool:
        """Whether `bank` gives every MoE layer's experts, so the fused decode step can run."""
        return False

    def bank(self, layer: int) -> Bank:
        """Where layer `layer`'s experts sit for the fused kernels (quant/moe_kernels.py)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no slot table")

    def fits_step(self, pairs: int) -> bool:
        """Whether a step of `pairs` (token, choice) pairs fits the slots: every routed expert in place at once."""
        return True

    def needs_host(self, layer: int) -> bool:
        """Whether a decode step must stop after this layer's router to show the host its routing."""
        return False

    def lookahead_router(self, layer: int) -> torch.Tensor | None:
        """The next MoE layer's router weight, when the provider predicts from layer `layer`'s gate input."""
        return None

    def gate_lookahead(self, layer: int, ids: list[int], probs: list[float]) -> None:  # noqa: B027 - a hook; by default nothing to do
        """The next layer's top k+1 experts per token and their probabilities, computed on the device."""

    def prepare(self, layer: int, ids: Sequence[int], token_counts: Sequence[int]) -> None:  # noqa: B027 - a hook; by default nothing to do
        """A decode step's layer is routed to `ids`: have each in its slot before the layer's kernels run."""

    def finish(self, layer: int) -> None:  # noqa: B027 - a hook; by default nothing to do
        """The layer's kernels are queued: its slots may be reused once they complete."""

    def decode_host_time(self, seconds: float) -> None:  # noqa: B027 - a hook; by default nothing to do
        """A decode step's host part took `seconds` (every cut layer's routing to the provider, and finish)."""

    def waves(self, layer: int, ids: Sequence[int], token_counts: Sequence[int]) -> Iterator[Bank] | None:
        """A step of many tokens whose routed experts do not fit the slots at once (an offloaded prefill): the
        bookkeeping of `experts`, then banks, each naming the slots of the next wave of experts, in place by the
        time the kernels queued on it run; the next wave's copies go out as the caller queues this one's kernels.
        None where the provider has no slots to stream through (the caller serves `experts` one by one)."""
        return None

    # ---- experts computed on the host (a hybrid cache) -----------------------------------------------

    @property
    def host_computes(self) -> bool:
        """Whether some routed experts may be computed on the host (the CPU) instead of the device: a decode step
        then shows the host each cut layer's input and routing weights, and adds `host_moe`'s sum."""
        return False

    def host_pending(self, layer: int) -> bool:
        """Whether the layer's step (after `experts` or `prepare`) has experts the host computes: where it has
        none, a decode step skips gathering their input."""
        return False

    def host_moe(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """The sum of the experts of the layer's step (after `experts` or `prepare`) that the host computes, for
        x [T, H], weights and ids [T, k], all on the CPU; None where the host computes none."""
        return None

    def host_begin(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:  # noqa: B027 - a hook; by default nothing to do
        """The eager step's layer (after `experts` or `prepare`, before the device's experts are queued): the
        host's experts may start from x, weights, ids."""

    def host_end(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """The device's experts' sum `out` plus the host's experts' (started by `host_begin`)."""
        return out


class DenseExpert:
    """An expert held as three plain matrices: down(silu(gate(x)) * up(x)); or, where the family says so, with
    biases on the three projections and another activation of (gate, up) (gpt_oss's clamped SwiGLU)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 act: ClampedSwiGLU | None = None):
        self.gate, self.up, self.down = gate, up, down
        self.biases, self.act = biases, act

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.biases is None and self.act is None:
            return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)
        bg, bu, bd = self.biases or (None, None, None)
        g, u = F.linear(x, self.gate, bg), F.linear(x, self.up, bu)
        h = F.silu(g) * u if self.act is None else self.act(g, u)
        return F.linear(h, self.down, bd)

    @property
    def nbytes(self) -> int:
        extra = sum(b.nbytes for b in self.biases) if self.biases else 0
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes + extra


def dense_expert(buf: torch.Tensor, layout: ExpertLayout, dtype: torch.dtype,
                 act: ClampedSwiGLU | None = None) -> DenseExpert:
    """An expert of a store's 16-bit tier (its biases too, where the layout has them) in `dtype`."""
    from quant.kernels import dense_weights, expert_biases

    return DenseExpert(*dense_weights(buf, layout, dtype), biases=expert_biases(buf, layout, dtype), act=act)


def store_layer_experts(store: TierStore, layer: int, num_experts: int, device: torch.device | str,
                        dtype: torch.dtype, act: ClampedSwiGLU | None = None) -> list[DenseExpert]:
    """Layer `layer`'s experts from a tier store's 16-bit tier, on `device` in `dtype`."""
    lay = store.tiers["dense"].layout
    return [dense_expert(store.read("dense", layer, e).to(device), lay, dtype, act) for e in range(num_experts)]


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
    table = identity_table(len(experts), gate_up.device)
    if first.biases is None:
        return DenseBank(gate_up, down, table, act=first.act)
    gate_up_bias = torch.stack([torch.cat(e.biases[:2]) for e in experts])
    down_bias = torch.stack([e.biases[2] for e in experts])
    for e, gub, db in zip(experts, gate_up_bias, down_bias):
        e.biases = (gub[:inter], gub[inter:], db)
    return DenseBank(gate_up, down, table, gate_up_bias, down_bias, first.act)


class ResidentExperts(ExpertProvider):
    """Every expert of every MoE layer in memory on the compute device, at the model's dtype."""

    def __init__(self, layers: dict[int, list[DenseExpert]]):
        self.layers = layers
        self._banks: dict[int, DenseBank] = {}

    @property
    def fused(self) -> bool:
        return True

    def bank(self, layer: int) -> DenseBank:
        """The layer's experts stacked for the fused decode step (made on first use)."""
        if layer not in self._banks:
            self._banks[layer] = stack_experts(self.layers[layer])
        return self._banks[layer]

    def experts(
        self, layer: int, ids: Sequence[int], token_counts: Sequence[int]
    ) -> Iterable[tuple[int, ExpertFn]]:
        table = self.layers[layer]
        return [(e, table[e]) for e in ids]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for experts in self.layers.values() for e in experts)
