"""Hybrid expert caches: a miss is either moved over the link into a slot or computed on the CPU from the host tier.

- HybridExperts (the `fate` policy's --miss auto|cpu): hits and arrived prefetches are computed on the device as
  in OffloadedExperts; each miss goes where cache/cost_model.py says (auto), or always to the CPU (cpu).
  Prefetches still move while the link has room.
- CPUExperts (`cpu`, llama.cpp's --n-cpu-moe): each layer's slots filled once with its most used experts
  (offline counts, else the first request's routing); every other expert computed on the CPU, nothing moved.
- FreeTokenExperts (`freetoken`): one LRU over every layer's slots; each step's misses split, the link's share
  of the link and host bandwidths moved (those with most tokens), the rest computed on the CPU; experts with
  so many tokens that moving wins outright (a prompt) always move.

The CPU's experts of a layer are one `cpu_moe` call (quant/cpu_experts.py) on the layer input brought to the
host; their sum goes back as one small pinned copy and is added after the device's experts' sum. In an eager
step the input is copied to the host before the device's experts are queued, so the CPU computes while the
device does; in a captured step (fate_cli/engine/decode_step.py) the host computes at the layer's cut while the
copy stream moves the layer's other misses.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from cache.cost_model import Costs, ReuseEstimate, clock_hz, measure_costs, measure_link, split_misses
from cache.host_tier import HostTier
from cache.offload import LayerSlots, OffloadedExperts
from cache.slots import SlotPool
from quant import cpu_kernels
from quant.cpu_experts import cpu_moe
from quant.expert_act import ClampedSwiGLU
from quant.kernels import QuantExpert
from quant.layout import ExpertLayout

HYBRID_POLICIES = ("cpu", "freetoken")  # policies that compute misses on the CPU whatever --miss says
CALIBRATION = 0.2  # the weight of each CPU call's time in the cost model's running estimate


@dataclass
class HybridOptions:
    """--miss, --link (bytes/s), --cpu-threads; the measured costs per tier, kept for later caches (a bench)."""

    miss: str = "auto"
    link: float | None = None
    cpu_threads: int | None = None
    costs: dict[str, Costs] = field(default_factory=dict)


def is_hybrid(policy: str, miss: str) -> bool:
    return policy in HYBRID_POLICIES or (policy == "fate" and miss != "link")


def costs_for(host: HostTier, layout: ExpertLayout, tier: str, layer: int, top_k: int, device: torch.device,
              dtype: torch.dtype, act: ClampedSwiGLU | None, options: HybridOptions) -> Costs:
    """The cost model's numbers for misses at `tier` (measured on `top_k` experts of `layer` in the host tier),
    measured once per tier and kept in `options`."""
    if tier not in options.costs:
        experts = [(host.get(tier, layer, e), layout) for e in range(top_k)]
        on_device = QuantExpert(experts[0][0].to(device), layout, None, act)
        # the threads the run's calls use: --cpu-threads, else cpu_moe's own rule (one for a small call)
        options.costs[tier] = measure_costs(experts, on_device, layout.hidden, device, dtype,
                                            lambda x, ex, w: cpu_moe(x, ex, w, act, threads=options.cpu_threads),
                                            options.cpu_threads or cpu_kernels.configured_threads(), options.link)
    return options.costs[tier]


def emulate_link(off: OffloadedExperts, options: HybridOptions) -> None:
    """--link: the copy stream held busy after each copy so copies end when the slower link's would (CUDA)."""
    if options.link is None or not off.pool.cuda or not off.layers:
        return
    tier = off.transfer_tier or off.policy.miss_tier()
    measured = (options.costs[tier].measured_link if tier in options.costs
                else measure_link(off.host.get(tier, next(iter(off.layers)), 0), off.device))
    off.pool.emulate_link(options.link, measured, clock_hz(off.device))


class HybridExperts(OffloadedExperts):
    def __init__(self, *args, options: HybridOptions, costs: Costs | None = None, **kwargs):
        """costs: scripted numbers in place of measured ones (tests)."""
        super().__init__(*args, **kwargs)
        self.options, self.miss = options, options.miss
        self.cpu_tier = self.transfer_tier or self.policy.miss_tier()  # the CPU computes what a miss would move
        self.costs = costs
        self.calibrating = costs is None and self.needs_costs  # scripted costs (tests) stay as given
        self._cpu_ratio: float | None = None  # the CPU time seen in the run over what the measured costs predict
        if costs is None and self.needs_costs and self.layers:
            self.costs = costs_for(self.host, self.layouts[self.cpu_tier], self.cpu_tier, next(iter(self.layers)),
                                   self.policy.ctx.top_k, self.device, self.dtype, self.act, options)
        self.stats.costs = self.costs.as_dict() if self.costs else None
        self._measured = self.costs  # the startup measurement, which the running ratio scales
        self.reuse = ReuseEstimate(self.num_experts, self.policy.ctx.top_k)
        self.host_now: dict[int, list[int]] = {}  # layer -> the experts the CPU computes in its current step
        self._staged: tuple | None = None
        self._pinned: dict[tuple, torch.Tensor] = {}

    @property
    def needs_costs(self) -> bool:
        return self.miss == "auto"

    @property
    def host_computes(self) -> bool:
        return True

    def split(self, layer: int, misses: list[tuple[int, int]]) -> list[int]:
        """The misses (expert, tokens) of a layer's step the CPU computes; the rest move."""
        if self.miss == "cpu":
            return [e for e, _ in misses]
        capacity = self.layers[layer].capacity
        host, _ = split_misses([(e, n, self.reuse.expected(layer, e, capacity)) for e, n in misses], self.costs,
                               self.miss)
        return host

    def _admit(self, layer: int, ids: list[int], counts: list[int]) -> tuple[list[int], set[int], str]:
        state = self.layers[layer]
        self.reuse.observe(layer, ids)
        host = set(self.split(layer, [(e, c) for e, c in zip(ids, counts) if e not in state.slot_of]))
        self.host_now[layer] = sorted(host)
        for _ in host:
            self.stats.miss(layer)
        kept = [(e, c) for e, c in zip(ids, counts) if e not in host]
        return super()._admit(layer, [e for e, _ in kept], [c for _, c in kept])

    # ---- the CPU's experts ----------------------------------------------------------------------------

    def host_pending(self, layer: int) -> bool:
        return bool(self.host_now.get(layer))

    def host_moe(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        experts = self.host_now.pop(layer, None)
        if not experts:
            return None
        start = time.perf_counter()
        # [T, n]: each token's weight for each of the CPU's experts (numpy: a decode step's arrays are tiny)
        ids_n, w_n = ids.numpy(), weights.float().numpy()
        w = torch.from_numpy((w_n[:, :, None] * (ids_n[:, :, None] == np.array(experts))).sum(1, dtype=np.float32))
        layout = self.layouts[self.cpu_tier]
        bufs = [(self.host.get(self.cpu_tier, layer, e), layout) for e in experts]
        # the kernels' own threads only: switching torch's pool every layer costs more than the experts' small
        # torch ops gain from it
        y = cpu_moe(x, bufs, w, self.act, threads=self.options.cpu_threads)
        if self.pool.cuda:  # one pinned buffer per layer and shape: the copy back is asynchronous
            out = self._pinned_buffer(("out", layer, *y.shape), y.dtype)
            out.copy_(y)
            y = out
        seconds = time.perf_counter() - start
        self.stats.on_cpu(layer, len(experts), seconds)
        self._calibrate(seconds, (w.numpy() != 0).sum(0).tolist())
        return y

    def _calibrate(self, seconds: float, tokens: list[int]) -> None:
        """The CPU's costs as seen in the run itself, for measured costs: the startup measurement runs the kernels
        back to back, warm, while between a step's layers their threads have gone idle and each call carries its
        own overhead. Each call's time over what the startup costs predict for its experts (tokens: each one's
        token count), a running average, scales both CPU costs: decode's one-token calls and prefill's."""
        if not self.calibrating:
            return
        ratio = seconds / sum(self._measured.cpu_s(n) for n in tokens)
        seen = self._cpu_ratio
        self._cpu_ratio = ratio if seen is None else (1 - CALIBRATION) * seen + CALIBRATION * ratio
        self.costs = dataclasses.replace(self.costs, cpu_expert_s=self._measured.cpu_expert_s * self._cpu_ratio,
                                         cpu_token_s=self._measured.cpu_token_s * self._cpu_ratio)

    def _pinned_buffer(self, key: tuple, dtype: torch.dtype) -> torch.Tensor:
        shape = key[2:]
        buf = self._pinned.get(key)
        if buf is None or buf.dtype != dtype:
            buf = self._pinned[key] = torch.empty(shape, dtype=dtype, pin_memory=True)
        return buf

    def host_begin(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
        self._staged = None
        if not self.host_now.get(layer):
            return
        if not x.is_cuda:
            self._staged = (layer, x, weights, ids, None)
            return
        staged = []
        for name, t in (("x", x), ("w", weights), ("ids", ids)):
            buf = self._pinned_buffer((name, layer, *t.shape), t.dtype)
            buf.copy_(t, non_blocking=True)
            staged.append(buf)
        event = torch.cuda.Event()
        event.record()  # queued before the device's experts: the host waits for the input alone
        self._staged = (layer, *staged, event)

    def host_end(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        staged, self._staged = self._staged, None
        if staged is None or staged[0] != layer:
            return out
        _, x, weights, ids, event = staged
        if event is not None:
            event.synchronize()
        y = self.host_moe(layer, x, weights, ids)
        return out if y is None else out + y.to(out.device, non_blocking=True)

    def reset_stats(self) -> None:
        super().reset_stats()
        self.stats.costs = self.costs.as_dict() if self.costs else None


class CPUExperts(HybridExperts):
    """llama.cpp's --n-cpu-moe: fixed experts on the device, the rest on the CPU, nothing moved at run time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chosen: set[int] = set()
        if self.policy.ctx.coactivation is not None:  # offline counts: the most used experts of each layer
            co = self.policy.ctx.coactivation()
            for layer, state in self.layers.items():
                use = co.popularity(layer).tolist()
                for e in sorted(range(self.num_experts), key=lambda e: (-use[e], e))[: state.capacity]:
                    self._load(layer, e, self.cpu_tier, set())
                self.chosen.add(layer)

    @property
    def needs_costs(self) -> bool:
        return False

    def split(self, layer: int, misses: list[tuple[int, int]]) -> list[int]:
        return [e for e, _ in misses]

    def _admit(self, layer: int, ids: list[int], counts: list[int]) -> tuple[list[int], set[int], str]:
        if layer not in self.chosen:  # the first request: its most used experts, moved once
            self.chosen.add(layer)
            ranked = sorted(zip(ids, counts), key=lambda ec: (-ec[1], ec[0]))
            for e, _ in ranked[: self.layers[layer].capacity]:
                self._load(layer, e, self.cpu_tier, set(ids))
        return super()._admit(layer, ids, counts)


class _SharedView:
    """One layer's face of the LRU shared by every layer (what OffloadedExperts asks of a layer's eviction)."""

    def __init__(self, lru: OrderedDict, layer: int):
        self.lru, self.layer = lru, layer

    def __contains__(self, expert: int) -> bool:
        return (self.layer, expert) in self.lru

    def touch(self, expert: int) -> None:
        self.lru.move_to_end((self.layer, expert))

    def admit(self, expert: int, victim: int | None) -> None:
        self.lru[(self.layer, expert)] = None

    def remove(self, expert: int) -> None:
        self.lru.pop((self.layer, expert), None)

    def resident(self) -> list[int]:
        return [e for (layer, e) in self.lru if layer == self.layer]


class FreeTokenExperts(HybridExperts):
    """FreeToken: a cache shared by every layer, misses split between the link and the CPU by bandwidth."""

    def __init__(self, store, plan, policy, device, dtype, *args, **kwargs):  # noqa: ANN001 - as OffloadedExperts
        shared = sum(plan.slots.values())
        super().__init__(store, dataclasses.replace(plan, slots=dict.fromkeys(plan.slots, 0)), policy, device,
                         dtype, *args, **kwargs)
        self.plan = plan
        self.lru: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.pool = SlotPool(device, self.layouts["hot"].nbytes, {-1: shared})
        self.pool.first = dict.fromkeys(self.layers, 0)  # every layer's table names rows of the one buffer
        if self.pool.cuda:
            self.pool.layer_free = {layer: torch.cuda.Event() for layer in self.layers}
        free = list(range(shared))
        for layer in self.layers:
            state = LayerSlots(shared, _SharedView(self.lru, layer), self.num_experts, device)
            state.free = free  # one free list for every layer
            self.layers[layer] = state
        self.credit = 0.0  # the link's share of misses not yet moved (a fraction of one)
        self._layer_now: int | None = None

    @property
    def needs_costs(self) -> bool:
        return True

    def split(self, layer: int, misses: list[tuple[int, int]]) -> list[int]:
        """Misses with most tokens move first: those whose tokens make moving win, then the link's share."""
        ranked = sorted(misses, key=lambda m: (-m[1], m[0]))
        rest = [e for e, n in ranked if n < self.costs.moving_wins_from()]  # the others move
        self.credit += self.costs.link_share() * len(rest)
        moved = int(self.credit + 1e-9)
        self.credit -= moved
        return rest[moved:]

    def _admit(self, layer: int, ids: list[int], counts: list[int]) -> tuple[list[int], set[int], str]:
        self._layer_now = layer
        return super()._admit(layer, ids, counts)

    def _room(self, state: LayerSlots, pinned: set[int]) -> bool:
        return bool(state.free) or any(k[0] != self._layer_now or k[1] not in pinned for k in self.lru)

    def _load(self, layer: int, expert: int, tier: str, pinned: set[int]) -> None:
        state = self.layers[layer]
        if state.free:
            slot = state.free.pop()
        else:  # the least recently used expert of any layer, but none this step needs
            key = next(k for k in self.lru if k[0] != layer or k[1] not in pinned)
            del self.lru[key]
            slot = self.layers[key[0]].remove(key[1])
        self.lru[(layer, expert)] = None
        state.place(expert, slot, tier)
        host = self.host.get(tier, layer, expert)
        start = time.perf_counter()
        self.pool.load(layer, slot, host)
        if not self.pool.cuda:
            waited = time.perf_counter() - start
            self.stats.stall_seconds += waited
            self.stats.layers[layer].stall_seconds += waited
        self.stats.moved(tier, host.numel(), layer)

    def occupancy(self) -> dict[int, int]:
        return {layer: len(s.slot_of) for layer, s in self.layers.items()}


PROVIDERS = {"cpu": CPUExperts, "freetoken": FreeTokenExperts, "fate": HybridExperts}
