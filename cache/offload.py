"""OffloadedExperts: the ExpertProvider that runs a policy over the host tier and the GPU slots.

One step through MoE layer l:
    gate_input(l, x)       -> policy predicts layer l+1's experts (held until layer l's misses are queued)
    experts(l, ids, counts) -> hits served from slots; misses loaded now (most tokens first), then the
                              prefetch copies for l+1 behind them on the same copy stream;
                              compute waits only for the slots it reads
Layers the plan holds whole (layer 0, at 16 bits) are on the device from the start.

The graph-captured decode step (fate_cli/engine/decode_step.py) reads experts through each layer's device table
(expert -> slot, tier; quant/moe_kernels.py) instead of callables: after the router it calls
`prepare(l, ids, counts)` (the same bookkeeping as `experts`, then the table and the slots' ready events),
replays the layer's kernels, then `finish(l)`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import torch

from cache.floor import RoutingLog
from cache.host_tier import HostTier
from cache.microbatch import LayerTimes, measure_layer_times, most_together, plan_groups
from cache.planner import Plan
from cache.policies import Policy, Prefetch
from cache.slots import SlotPool
from cache.stats import CacheStats
from fate_cli.model.experts import ExpertFn, ExpertProvider, stack_experts, store_layer_experts
from quant.expert_act import ClampedSwiGLU
from quant.kernels import QuantExpert, select_backend
from quant.moe_kernels import Bank, PackedBank
from quant.store import TierStore

TIER_CODES = {"hot": 0, "cold": 1}  # the tier row of a device table
WAVE_RING = 8  # staged wave tables in flight: the host runs at most this many waves ahead of the device


class LayerSlots:
    """Which expert sits in which slot of one layer, at which tier, and the layer's eviction order.

    `table` mirrors slot_of and tier_of on the device for the fused decode kernels: row 0 the slot of each
    expert (-1: none), row 1 its tier code; edits go to a host copy and reach the device in `sync_table`."""

    def __init__(self, capacity: int, eviction, num_experts: int, device: torch.device):  # noqa: ANN001
        self.capacity = capacity
        self.eviction = eviction
        self.slot_of: dict[int, int] = {}
        self.tier_of: dict[int, str] = {}
        self.free = list(range(capacity))
        cuda = device.type == "cuda"
        self.host_table = torch.full((2, num_experts), -1, dtype=torch.int32, pin_memory=cuda)
        self.rows = self.host_table.numpy()  # the same memory: numpy's element writes cost the host far less
        self.table = self.host_table.to(device) if cuda else self.host_table
        self.dirty = False

    def place(self, expert: int, slot: int, tier: str) -> None:
        self.slot_of[expert], self.tier_of[expert] = slot, tier
        self.rows[0, expert], self.rows[1, expert] = slot, TIER_CODES.get(tier, 0)
        self.dirty = True

    def remove(self, expert: int) -> int:
        """Forget where the expert is; return the slot it held."""
        del self.tier_of[expert]
        self.rows[0, expert] = self.rows[1, expert] = -1
        self.dirty = True
        return self.slot_of.pop(expert)

    def clear(self) -> None:
        for e in list(self.slot_of):
            self.eviction.remove(e)
            self.free.append(self.remove(e))

    def sync_table(self) -> None:
        """Queue the host copy's edits to the device table on the compute stream (before the kernels that read
        it). The host copy is edited again only after the host has read a later step's routing, which
        synchronises past this copy."""
        if self.dirty and self.table is not self.host_table:
            self.table.copy_(self.host_table, non_blocking=True)
        self.dirty = False


class OffloadedExperts(ExpertProvider):
    def __init__(
        self,
        store: TierStore,
        plan: Plan,
        policy: Policy,
        device: torch.device,
        dtype: torch.dtype,
        transfer_tier: str | None = None,
        backend: str | None = None,
        ram_limit: int | None = None,
        host: HostTier | None = None,
        act: ClampedSwiGLU | None = None,
    ):
        """host: a HostTier built earlier for the same store and layers (a benchmark shares one across runs).
        act: the model's expert activation (ModelArgs.expert_act); the biases, if any, travel in each expert's
        buffer (quant/layout.py)."""
        self.store, self.plan, self.policy, self.act = store, plan, policy, act
        self.device, self.dtype, self.transfer_tier = device, dtype, transfer_tier
        self.stats = CacheStats()
        ctx = policy.ctx
        self.num_experts = ctx.num_experts
        self.layouts = {t: info.layout for t, info in store.tiers.items()}
        self.backends = {
            t: (backend or select_backend(device, lay)) for t, lay in self.layouts.items() if lay.kind == "quantized"
        }
        cached = [layer for layer in ctx.moe_layers if layer not in plan.full_layers]
        tiers = [transfer_tier] if transfer_tier else list(policy.tiers)
        self.host = host or HostTier(store, cached, ctx.num_experts, tiers, device.type == "cuda", ram_limit)
        self.full: dict[int, list[ExpertFn]] = {}
        for layer in plan.full_layers:
            self.full[layer] = store_layer_experts(store, layer, ctx.num_experts, device, dtype, act)
        slots = {layer: plan.slots[layer] for layer in cached}
        self.pool = SlotPool(device, self.layouts["hot"].nbytes, slots)
        self._slot_fns: dict[tuple[int, int, str], ExpertFn] = {}
        self.layers = {layer: LayerSlots(n, policy.eviction(layer, n), ctx.num_experts, device)
                       for layer, n in slots.items()}
        self._stall_base, self._waits_base = 0.0, 0
        self._layer_stall_base: dict[int, float] = {}
        self._pending: list[Prefetch] = []
        self._banks: dict[int, Bank] = {}
        self._in_use: list[int] = []  # slots the layer being computed by a decode step reads
        self.layer_times: LayerTimes | None = None  # measured for a pipelining policy's groups, once
        self.last_groups: list[list[int]] = []
        self.routing: RoutingLog | None = None  # set to record the routing the slots serve (a bench's floor)
        self._wave_ring: list[tuple[torch.Tensor, torch.cuda.Event | None]] | None = None
        self._wave_tables: list[torch.Tensor] = []
        self._wave_next = 0
        if policy.name == "resident":
            for layer in cached:
                for e in range(ctx.num_experts):
                    self._load(layer, e, "hot", pinned=set())

    # ---- the ExpertProvider interface -------------------------------------------------------------

    def begin_request(self) -> None:
        self.policy.begin_request()

    def gate_input(self, layer: int, hidden: torch.Tensor) -> None:
        # Queued after this layer's misses: the copy stream runs in order, and a guess for the next
        # layer must not delay an expert this layer needs now.
        self._pending = self.policy.on_gate_input(layer, hidden)

    def _issue_prefetches(self, routed_layer: int) -> None:
        pending, self._pending = self._pending, []
        with self.pool.copying():
            for p in pending:
                if p.layer != routed_layer:  # a guess for the layer just routed comes too late to help
                    self._prefetch(p)

    def experts(
        self, layer: int, ids: Sequence[int], token_counts: Sequence[int]
    ) -> Iterator[tuple[int, ExpertFn]]:
        admitted = self._take_routing(layer, list(ids), list(token_counts))
        if admitted is None:
            table = self.full[layer]
            return iter([(e, table[e]) for e in ids])
        return self._serve(layer, *admitted)

    def _take_routing(self, layer: int, ids: list[int], counts: list[int]) -> tuple[list[int], set[int], str] | None:
        """What `experts` and `prepare` both do first: the policy sees the routing, the prediction made for
        this layer is scored, hits and misses are counted and the misses queued (`_admit`), then the held
        prefetches. Returns _admit's (order, pinned, tier); None for a layer held whole."""
        self._pending += self.policy.on_route(layer, ids, counts)
        predicted = self.policy.predicted.pop(layer, None)
        if predicted is not None:
            one_token = sum(counts) == self.policy.ctx.top_k and len(ids) == self.policy.ctx.top_k
            self.stats.prediction(layer, predicted, set(ids), one_token)
        admitted = None if layer in self.full else self._admit(layer, ids, counts)
        if self.routing is not None and admitted is not None:
            self.routing.record(layer, ids)
        self._issue_prefetches(layer)
        return admitted

    def prefill_groups(self, lengths: Sequence[int]) -> list[list[int]]:
        """The prompts of a batch (their lengths) in groups prefilled together: one prompt a group, unless the
        policy pipelines (klotski), whose groups cache/microbatch.py sizes from measured times."""
        groups = [[i] for i in range(len(lengths))]
        if self.policy.pipeline and most_together(lengths, self.plan.group_tokens) > 1 and self.layers:
            if self.layer_times is None:
                tier = self.transfer_tier or self.policy.miss_tier()
                host = self.host.get(tier, next(iter(self.layers)), 0)
                self.layer_times = measure_layer_times(
                    host, lambda buf: QuantExpert(buf, self.layouts[tier], self.backends[tier], self.act), self.device,
                    self.layouts[tier].hidden, self.dtype)
            lacking = [max(0, self.num_experts - s.capacity) for s in self.layers.values()]
            groups = plan_groups(lengths, self.layer_times, sum(lacking) / len(lacking), self.num_experts,
                                 self.policy.ctx.top_k, self.plan.group_tokens)
        self.last_groups = groups
        return groups

    # ---- the fused decode step (fate_cli/engine/decode_step.py) ------------------------------------------

    @property
    def fused(self) -> bool:
        return True

    def bank(self, layer: int) -> Bank:
        """Where the layer's experts sit for the fused kernels: the stacked 16-bit experts of a layer held
        whole, or the layer's slots with their device table."""
        if layer not in self._banks:
            if layer in self.full:
                self._banks[layer] = stack_experts(self.full[layer])
            else:
                state, first = self.layers[layer], self.pool.first[layer]
                hot = self.layouts["hot"]
                cold = self.layouts.get("cold", hot)
                # only the tiers this cache moves need the fused kernels (--transfer-bits moves one)
                layouts = {"hot": (hot, hot), "cold": (cold, cold)}.get(self.transfer_tier, (hot, cold))
                self._banks[layer] = PackedBank(self.pool.buf[first : first + state.capacity], layouts, state.table,
                                                self.act)
                state.sync_table()
        return self._banks[layer]

    def lookahead_router(self, layer: int) -> torch.Tensor | None:
        """The next MoE layer's router, when the policy predicts from it (a decode step computes the top k+1
        on the device and hands them to `gate_lookahead` in place of calling `gate_input`)."""
        nxt = self.policy.ctx.next_moe(layer)
        return self.policy.ctx.routers[nxt] if self.policy.lookahead and nxt is not None else None

    def gate_lookahead(self, layer: int, ids: list[int], probs: list[float]) -> None:
        self._pending = self.policy.on_lookahead(layer, ids, probs)

    def needs_host(self, layer: int) -> bool:
        """Whether a decode step must stop for this layer's routing (misses, prefetches, statistics): always,
        unless the policy is `resident` and the layer holds every expert (or is held whole)."""
        if layer in self.full:
            return self.policy.name != "resident"
        return self.policy.name != "resident" or self.layers[layer].capacity < self.num_experts

    def fits_step(self, pairs: int) -> bool:
        """Whether every layer has a slot for each expert `pairs` (token, choice) pairs can route to: a decode
        step's kernels read only slots, so all of a layer's experts must be in place at once."""
        need = min(pairs, self.num_experts)
        return all(state.capacity >= need for state in self.layers.values())

    def prepare(self, layer: int, ids: Sequence[int], token_counts: Sequence[int]) -> None:
        """A decode step's layer: the bookkeeping of `experts`, every routed expert in a slot, the device
        table current, and the compute stream waiting for those slots' copies."""
        admitted = self._take_routing(layer, list(ids), list(token_counts))
        if admitted is None:
            return
        order = admitted[0]
        state = self.layers[layer]
        missing = [e for e in order if e not in state.slot_of]
        if missing:
            raise RuntimeError(f"layer {layer} has {state.capacity} slots for {len(order)} experts")
        self._in_use = [state.slot_of[e] for e in order]
        self.pool.wait_ready(layer, self._in_use)
        state.sync_table()

    def decode_host_time(self, seconds: float) -> None:
        self.stats.decode_host(seconds)

    def finish(self, layer: int) -> None:
        """The layer's kernels are queued: its slots may be reused once they complete."""
        if layer in self.full:
            return
        self.pool.release_layer(layer, self._in_use)
        self._in_use = []
        if not self.policy.keep_after_layer:
            self.layers[layer].clear()

    def waves(self, layer: int, ids: Sequence[int], token_counts: Sequence[int]) -> Iterator[Bank]:
        """`experts`' bookkeeping, then the layer's routed experts in waves through its slots (WAVE_RING pinned
        tables staged in turn): first those already in place (hits, and misses admitted into free room), then the
        rest, half the layer's slots a wave, so one half fills while the other's kernels run. A layer held whole
        is one wave of its stacked experts."""
        admitted = self._take_routing(layer, list(ids), list(token_counts))
        if admitted is None:
            return iter([self.bank(layer)])
        return self._waves(layer, *admitted)

    def _waves(self, layer: int, order: list[int], pinned: set[int], tier: str) -> Iterator[Bank]:
        state = self.layers[layer]
        placed = [e for e in order if e in state.slot_of]
        rest = [e for e in order if e not in state.slot_of]
        width = max(1, state.capacity // 2)
        for wave in ([placed] if placed else []) + [rest[i : i + width] for i in range(0, len(rest), width)]:
            with self.pool.copying():
                for e in wave:
                    if e not in state.slot_of:
                        self._load(layer, e, tier, pinned)
            slots = [state.slot_of[e] for e in wave]
            self.pool.wait_ready(layer, slots)
            yield self._wave_bank(layer, wave)
            for slot in slots:  # the wave's kernels are queued: a later copy into these slots waits for them
                self.pool.release(layer, slot)
            pinned.difference_update(wave)
        if not self.policy.keep_after_layer:
            state.clear()

    def _wave_bank(self, layer: int, wave: list[int]) -> PackedBank:
        """The layer's bank with a table naming only the wave's experts. The table is staged through a ring of
        pinned buffers: the host fills the next while earlier copies may still be queued, and waits only when the
        device is WAVE_RING waves behind."""
        state = self.layers[layer]
        if self._wave_ring is None:
            cuda = self.pool.cuda
            self._wave_ring = [(torch.full((2, self.num_experts), -1, dtype=torch.int32, pin_memory=cuda),
                                torch.cuda.Event() if cuda else None) for _ in range(WAVE_RING)]
            self._wave_tables = [torch.empty((2, self.num_experts), dtype=torch.int32, device=self.device)
                                 for _ in range(WAVE_RING)]
        i = self._wave_next = (self._wave_next + 1) % WAVE_RING
        staged, copied = self._wave_ring[i]
        if copied is not None:
            copied.synchronize()
        staged.fill_(-1)
        experts = torch.tensor(wave, dtype=torch.long)
        staged[0, experts] = torch.tensor([state.slot_of[e] for e in wave], dtype=torch.int32)
        staged[1, experts] = torch.tensor([TIER_CODES.get(state.tier_of[e], 0) for e in wave], dtype=torch.int32)
        table = self._wave_tables[i]
        table.copy_(staged, non_blocking=True)
        if copied is not None:
            copied.record()
        return dataclasses.replace(self.bank(layer), table=table)

    # ---- slots ------------------------------------------------------------------------------------

    def _admit(self, layer: int, ids: list[int], counts: list[int]) -> tuple[list[int], set[int], str]:
        """Count hits and misses and queue the misses' copies (most tokens first) as far as the layer has room."""
        state = self.layers[layer]
        resident = state.slot_of
        hits = [e for e in ids if e in resident]
        misses = [e for e, _ in sorted(zip(ids, counts), key=lambda ec: -ec[1]) if e not in resident]
        touch = state.eviction.touch
        for e in hits:
            touch(e)
        if ids:
            counted = self.stats.layers[layer]
            counted.hits += len(hits)
            counted.misses += len(misses)
        pinned = set(ids)
        tier = self.transfer_tier or self.policy.miss_tier()
        with self.pool.copying():
            for e in misses:
                if self._room(state, pinned):  # as far as the layer has room without evicting this step's experts
                    self._load(layer, e, tier, pinned)
        return hits + misses, pinned, tier

    def _serve(self, layer: int, order: list[int], pinned: set[int], tier: str) -> Iterator[tuple[int, ExpertFn]]:
        """Resident experts first (no wait), then misses; those without a slot yet loaded in waves."""
        state = self.layers[layer]
        for e in order:
            if e not in state.slot_of:  # more experts than slots (a long prompt): this one waits for a slot
                self._load(layer, e, tier, pinned)
            slot = state.slot_of[e]
            self.pool.wait_ready(layer, [slot])
            yield e, self._expert_fn(layer, slot, state.tier_of[e])
            self.pool.release(layer, slot)
            pinned.discard(e)
        if not self.policy.keep_after_layer:
            state.clear()

    def _room(self, state: LayerSlots, pinned: set[int]) -> bool:
        return bool(state.free) or any(e not in pinned for e in state.slot_of)

    def _prefetch(self, p: Prefetch) -> None:
        state = self.layers.get(p.layer)
        if state is None or p.expert in state.slot_of:
            return
        tier = self.transfer_tier or p.tier
        predicted = self.policy.predicted.get(p.layer, ())
        if not state.free and all(e in predicted for e in state.slot_of):
            return  # every resident expert is itself predicted: keep them
        self._load(p.layer, p.expert, tier, predicted or set())
        self.stats.prefetches += 1

    def _load(self, layer: int, expert: int, tier: str, pinned: set[int]) -> None:
        state = self.layers[layer]
        victim = None
        if state.free:
            slot = state.free.pop()
        else:
            victim = state.eviction.victim(pinned, expert)
            slot = state.remove(victim)
        state.eviction.admit(expert, victim)
        state.place(expert, slot, tier)
        host = self.host.get(tier, layer, expert)
        if self.pool.cuda:
            self.pool.load(layer, slot, host)
        else:  # the copy is synchronous: its time is the stall
            start = time.perf_counter()
            self.pool.load(layer, slot, host)
            waited = time.perf_counter() - start
            self.stats.stall_seconds += waited
            self.stats.layers[layer].stall_seconds += waited
        self.stats.moved(tier, host.numel(), layer)

    def _expert_fn(self, layer: int, slot: int, tier: str) -> ExpertFn:
        """The expert in a slot at a tier: made once per (layer, slot, tier) and kept, since a slot's buffer never
        moves (only its contents change), and building one costs the host more than computing it on a CPU."""
        key = (layer, slot, tier)
        fn = self._slot_fns.get(key)
        if fn is None:
            layout = self.layouts[tier]
            fn = self._slot_fns[key] = QuantExpert(self.pool.view(layer, slot, layout.nbytes), layout,
                                                   self.backends[tier], self.act)
        return fn

    # ---- reporting --------------------------------------------------------------------------------

    def sync_stats(self) -> CacheStats:
        """The stats with the GPU's stall timings read back (one synchronisation; not for the decode loop)."""
        if self.pool.cuda:
            self.stats.stall_seconds = self.pool.stalls.collect() - self._stall_base
            self.stats.stall_waits = self.pool.stalls.waits - self._waits_base
            for layer, seconds in self.pool.stalls.by_layer.items():
                self.stats.layers[layer].stall_seconds = seconds - self._layer_stall_base.get(layer, 0.0)
        return self.stats

    def reset_stats(self) -> None:
        self.stats = CacheStats()
        if self.pool.cuda:
            self._stall_base, self._waits_base = self.pool.stalls.collect(), self.pool.stalls.waits
            self._layer_stall_base = dict(self.pool.stalls.by_layer)

    def occupancy(self) -> dict[int, int]:
        return {layer: len(s.slot_of) for layer, s in self.layers.items()}
