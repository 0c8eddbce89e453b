"""Turn a VRAM budget into expert slots per layer: measured, Fate's shallow-favoring split, or even.

From the budget the planner subtracts what always lives on the device (non-expert weights, the KV
cache for the context, workspace). If every expert fits at the hot tier, nothing is offloaded.
Otherwise the first MoE layer is held whole at 16 bits once every other layer fits whole, and the
slots are split between the layers:
- measured: by the layers' miss curves on recorded routing (cache/allocation.py), where a model has them;
  evenly where it has none;
- shallow (Fate's rule): the shallowest layers cached fully while they fit (prediction is weakest there),
  the rest evenly over the deeper layers;
- uniform: evenly.
Every MoE layer gets at least top-k slots, so one token's experts always fit; a budget that cannot give
that is refused, naming the minimum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cache.allocation import allocate
from cache.budget import format_size
from fate_cli.errors import ResourceError

FATE_SHALLOW_LAYERS = 4  # Fate caches layers 0-3 fully (Qwen1.5-MoE, DeepSeek-MoE: 24 and 28 layers)
FATE_DEPTH = 24


@dataclass(frozen=True)
class Footprint:
    """The bytes a plan weighs, for one model at one compute dtype and tier choice."""

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    non_expert: int  # weights that always live on the device
    expert_hot: int  # one expert's buffer at the hot tier: the size of a slot
    expert_full: int  # one expert at 16 bits, for a layer held whole
    kv_cache: int
    workspace: int
    token_bytes: int = 0  # activations of one more prompt token prefilled together with others (klotski)
    group_bytes: int = 0  # the part of the workspace that holds prompt tokens' activations

    @property
    def fixed(self) -> int:
        return self.non_expert + self.kv_cache + self.workspace

    @property
    def all_hot(self) -> int:
        return len(self.moe_layers) * self.num_experts * self.expert_hot


@dataclass
class Plan:
    budget: int
    footprint: Footprint
    slots: dict[int, int]  # MoE layer -> slots of hot-tier size (layers held whole are not listed)
    full_layers: tuple[int, ...] = ()  # MoE layers held whole at 16 bits
    shallow_layers: int = 0
    notes: list[str] = field(default_factory=list)
    group_tokens: int = 0  # prompt tokens whose activations the plan holds room for at once (klotski's groups)

    @property
    def offloaded(self) -> bool:
        return any(n < self.footprint.num_experts for n in self.slots.values())

    @property
    def total_slots(self) -> int:
        return sum(self.slots.values())

    @property
    def device_bytes(self) -> int:
        fp = self.footprint
        full = len(self.full_layers) * fp.num_experts * fp.expert_full
        return fp.fixed + full + self.total_slots * fp.expert_hot

    def slots_for(self, layer: int) -> int:
        return self.footprint.num_experts if layer in self.full_layers else self.slots[layer]

    def summary(self) -> str:
        fp = self.footprint
        parts = [f"budget {format_size(self.budget)}, plan uses {format_size(self.device_bytes)}"]
        if self.full_layers and not self.slots:
            return f"{parts[0]}; every expert on the device at 16 bits, nothing offloaded"
        if self.full_layers:
            parts.append(f"layer {','.join(map(str, self.full_layers))} whole at 16 bits")
        if not self.offloaded:
            parts.append("every expert on the device (nothing offloaded)")
        else:
            runs: list[tuple[int, int, int]] = []  # (first layer, last layer, slots)
            for layer, n in self.slots.items():
                if runs and runs[-1][2] == n and runs[-1][1] == layer - 1:
                    runs[-1] = (runs[-1][0], layer, n)
                else:
                    runs.append((layer, layer, n))
            parts += [
                f"layer{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}: {n}/{fp.num_experts} slots"
                for a, b, n in runs
            ]
        if self.group_tokens:
            parts.append(f"room for {self.group_tokens} prompt tokens prefilled together")
        return "; ".join(parts)


def default_shallow_layers(num_moe_layers: int) -> int:
    """Fate's 4 of 24 layers, scaled with depth (at least the first layer)."""
    return max(1, math.ceil(num_moe_layers * FATE_SHALLOW_LAYERS / FATE_DEPTH))


def minimum_budget(fp: Footprint) -> int:
    return fp.fixed + len(fp.moe_layers) * fp.top_k * fp.expert_hot


def make_plan(
    fp: Footprint, budget: int, split: str = "shallow", shallow_layers: int | None = None, whole_first: bool = True,
    curves: Mapping[int, Sequence[float]] | None = None,
) -> Plan:
    """Slots per MoE layer for `budget` bytes. split: "measured" (by `curves`, each layer's loads for 0..experts
    slots; evenly without them), "shallow" (Fate) or "uniform" (the peers).

    whole_first=False serves the first layer from slots too (one tier for every expert)."""
    if split not in ("measured", "shallow", "uniform"):
        raise ValueError(f"unknown split {split!r}")
    minimum = minimum_budget(fp)
    if budget < minimum:
        raise ResourceError(
            f"a budget of {format_size(budget)} is below this model's minimum of {format_size(minimum)} "
            f"(non-expert weights {format_size(fp.non_expert)}, KV cache {format_size(fp.kv_cache)}, "
            f"workspace {format_size(fp.workspace)}, {fp.top_k} expert slots per layer); raise --vram"
        )
    layers, experts, k = list(fp.moe_layers), fp.num_experts, fp.top_k
    available = budget - fp.fixed
    shallow = default_shallow_layers(len(layers)) if shallow_layers is None else max(0, shallow_layers)

    first, rest = layers[0], layers[1:]
    first_bytes = experts * fp.expert_full
    full_layers: tuple[int, ...] = ()
    # The first layer at 16 bits costs 4x its hot-tier bytes: only worth it once it takes no slot from the
    # others (every other layer whole at the hot tier), so more budget never means fewer slots anywhere.
    if whole_first and available - first_bytes >= len(rest) * experts * fp.expert_hot:
        full_layers, available, layers = (first,), available - first_bytes, rest
    plan = Plan(budget, fp, {}, full_layers, shallow)
    if not layers:
        return plan
    total = min(available // fp.expert_hot, len(layers) * experts)
    slots = {layer: k for layer in layers}  # every layer can hold one token's experts
    spare = total - k * len(layers)
    if split == "measured" and curves is not None and all(layer in curves for layer in layers):
        plan.slots = allocate({layer: curves[layer] for layer in layers}, total, k, experts)
        return plan
    if split == "shallow":
        held_whole = len(full_layers)
        for layer in layers[: max(0, shallow - held_whole)]:  # shallowest first, fully while they fit
            grant = min(spare, experts - slots[layer])
            slots[layer] += grant
            spare -= grant
        deep = [layer for layer in layers if slots[layer] < experts]
    else:
        deep = list(layers)
    while spare > 0 and deep:  # even split; the remainder goes to the shallower of them
        share, extra = divmod(spare, len(deep))
        for i, layer in enumerate(deep):
            grant = min(share + (i < extra), experts - slots[layer])
            slots[layer] += grant
            spare -= grant
        deep = [layer for layer in deep if slots[layer] < experts]
    plan.slots = slots
    return plan
