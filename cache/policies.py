"""Cache policies: what to keep, what to evict, what to fetch ahead and at which tier.

- fate: cross-layer gate prediction (layer i's gate input through layer i+1's router, top k+1 per
  token, loaded in order of popularity), mixed tiers: popular predictions at the hot tier, the least
  popular 30% (prefill) and every miss at the cold tier. The router probability refines it, most of all
  in decode where one token gives no popularity to rank by: a prediction no token is confident about moves
  at the cold tier, the weakest are not fetched. Slots per layer by measurement (the model's miss curves,
  cache/allocation.py; evenly for a model without them), and eviction by decayed use counts: the expert
  used least, recent uses weighing most, leaves first.
- fate-shallow: the same prediction and tiers with Fate's published cache: shallow-favoring slots (the
  first layers whole, the rest evenly) and per-layer ARC.
- ondemand (Load-on-Demand): no prediction; load after the router; keep nothing beyond the layer.
- lru (mixtral-offloading): per-layer LRU, no prediction, loads at the hot tier.
- eap (MoE-Infinity's Expert Activation Path): the current request's partial activation matrix is
  matched to past requests' by cosine similarity; the match ranks the remaining layers' experts to
  prefetch, and activation counts decide what to evict.
- fmoe (fMoE): expert maps of past iterations (layers x experts router probabilities) matched by the
  prompt's semantic key before the first layer and by the trajectory as layers are seen; the next layer's
  experts prefetched by probability until their mass reaches 1 - similarity (at least top-k); LRU.
- klotski (Klotski's expert-aware pipeline, for batched work): hot experts stay (a layer's slots keep
  the experts used most, by offline counts plus this run's routing; cold ones pass through); after a
  layer routes, the next layer's experts are scored by previous-layer -> next-layer co-activation counts
  gathered offline on held-out text (learned online for models without offline counts) and those
  expected to take a token are prefetched, at most as many as the layer just needed; every policy
  computes resident (hot) experts first and misses (cold) last, so misses' copies hide behind the
  resident experts' compute. Its multi-batch pipeline: a batch's prompts are prefilled in groups that pass
  through each layer together (one copy of an expert serves the whole group), the group size picked by
  cache/microbatch.py from measured copy and compute times and the memory its plan sets aside.
- resident: every expert on the device at the hot tier, the ceiling.
- cpu (llama.cpp's --n-cpu-moe) and freetoken (a shared LRU whose misses are split between the link and the
  CPU): computing misses on the CPU, run by cache/hybrid.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from cache.eviction import ARC, LRU, ByPriority, DecayedFrequency
from fate_cli.model.args import ModelArgs
from predictors.activation_path import ActivationPathPredictor
from predictors.coactivation import Coactivation
from predictors.cross_layer import lookahead, router_probs
from predictors.expert_map import ExpertMapStore, experts_by_mass

FATE_COLD_FRACTION = 0.3  # Fate moves the least popular 30% of prefill predictions at the cold tier
# A prediction's router probability times top_k (1.0 = an average routed expert's share), for its most
# confident token, also picks its tier: hot from HOT_SHARE, cold below, and under MIN_SHARE it is not
# fetched at all: when copies cannot hide behind compute, a wrong guess costs a whole transfer and a miss
# later costs a cold one. Chosen by measurement on the bundled model's traces, where it moves fewer bytes
# than lru and eap at every budget with a higher hit rate (docs/bench-results.md, the offload sweep).
HOT_SHARE = 0.6
MIN_SHARE = 0.3
# Per step of a layer, the weight an earlier use keeps in fate's eviction (half-life about 14 steps): on the
# bundled model's decode traffic the fewest loads of 0.8-0.99 at 25%, 50% and 75% budgets, and fewer than LRU,
# ARC or plain counts at each (docs/bench-results.md, the floor).
FATE_DECAY = 0.95
# Klotski prefetches the next layer's experts expected to take at least one token: on the bundled model's
# traces, a prefetch below that was almost never used (docs/bench-results.md, batches).
KLOTSKI_MIN_TOKENS = 1.0


class Prefetch(NamedTuple):  # a tuple: policies make hundreds a step, and a tuple is the cheapest to make
    layer: int
    expert: int
    tier: str


@dataclass
class PolicyContext:
    moe_layers: list[int]
    num_layers: int
    num_experts: int
    top_k: int
    routers: dict[int, torch.Tensor]  # MoE layer -> router weight [experts, hidden], on the compute device
    coactivation: Callable[[], Coactivation] | None = None  # offline co-activation counts, where a model has them

    @classmethod
    def of(cls, args: ModelArgs, routers: dict[int, torch.Tensor],
           coactivation: Callable[[], Coactivation] | None = None) -> PolicyContext:
        """A model's context: its shapes from `args`, its routers (or another model's, for a trace replay)."""
        return cls(list(args.moe_layer_ids), args.num_layers, args.num_experts, args.top_k, routers, coactivation)

    def __post_init__(self) -> None:
        self._next = {layer: self._scan_next(layer) for layer in self.moe_layers}  # asked at every layer's step

    def next_moe(self, layer: int) -> int | None:
        return self._next[layer] if layer in self._next else self._scan_next(layer)

    def _scan_next(self, layer: int) -> int | None:
        later = [m for m in self.moe_layers if m > layer]
        return later[0] if later else None


class Policy:
    name = ""
    split = "uniform"  # how the planner shares slots between layers
    keep_after_layer = True
    tiers: tuple[str, ...] = ("hot",)  # the tiers its transfers use (the host tier holds these)
    lookahead = False  # whether on_lookahead takes the next layer's router top k+1 in place of on_gate_input
    pipeline = False  # whether a batch's prompts are prefilled together in groups (cache/microbatch.py)

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        self.predicted: dict[int, set[int]] = {}  # layer -> experts predicted for its next step

    def eviction(self, layer: int, capacity: int):  # noqa: ANN201 - LRU | ARC | ByPriority
        return LRU(capacity)

    def miss_tier(self) -> str:
        return "hot"

    def begin_request(self) -> None:
        pass

    def on_gate_input(self, layer: int, hidden: torch.Tensor) -> list[Prefetch]:
        return []

    def on_route(self, layer: int, experts: list[int], counts: list[int]) -> list[Prefetch]:
        """The layer's routing (experts, tokens each); may return prefetches for later layers."""
        return []

    def on_lookahead(self, layer: int, ids: list[int], probs: list[float]) -> list[Prefetch]:
        return []


class OnDemand(Policy):
    name = "ondemand"
    keep_after_layer = False


class LRUPolicy(Policy):
    name = "lru"


class Resident(Policy):
    name = "resident"


class Fate(Policy):
    name = "fate"
    split = "measured"
    tiers = ("hot", "cold")

    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        self.use: dict[int, DecayedFrequency] = {}

    def eviction(self, layer: int, capacity: int) -> DecayedFrequency | ARC:
        self.use[layer] = DecayedFrequency(capacity, FATE_DECAY)
        return self.use[layer]

    def on_route(self, layer: int, experts: list[int], counts: list[int]) -> list[Prefetch]:
        if layer in self.use:
            self.use[layer].step(experts)
        return []

    def miss_tier(self) -> str:
        return "cold"

    lookahead = True

    def on_gate_input(self, layer: int, hidden: torch.Tensor) -> list[Prefetch]:
        nxt = self.ctx.next_moe(layer)
        if nxt is None:
            return []
        ids, probs = lookahead(hidden, self.ctx.routers[nxt], self.ctx.top_k)
        return self.on_lookahead(layer, ids.flatten().tolist(), probs.flatten().tolist())

    def on_lookahead(self, layer: int, ids: list[int], probs: list[float]) -> list[Prefetch]:
        """The next layer's router top k+1 per token on this layer's gate input, flattened (computed by
        on_gate_input, or inside a captured decode step)."""
        nxt = self.ctx.next_moe(layer)
        if nxt is None:
            return []
        k = self.ctx.top_k
        if len(ids) == k + 1 and len(set(ids)) == len(ids):  # one token (decode): no popularity, no cold tier
            self.predicted[nxt] = set(ids)
            ranked = sorted(zip(ids, probs), key=lambda ep: -ep[1])  # by confidence; ties keep the router's order
            return [Prefetch(nxt, e, "hot" if p * k >= HOT_SHARE else "cold") for e, p in ranked if p * k >= MIN_SHARE]
        count: dict[int, int] = {}
        share: dict[int, float] = {}  # the most confident token's share, per predicted expert
        for e, p in zip(ids, probs):
            count[e] = count.get(e, 0) + 1
            share[e] = max(share.get(e, 0.0), p * k)
        self.predicted[nxt] = set(count)
        ranked = sorted(count, key=lambda e: (-count[e], -share[e]))  # by popularity, then confidence
        tied = count[ranked[0]] == count[ranked[-1]]  # one token (decode): no popularity to rank by
        cold_from = len(ranked) if tied else len(ranked) - int(FATE_COLD_FRACTION * len(ranked))
        return [
            Prefetch(nxt, e, "hot" if i < cold_from and share[e] >= HOT_SHARE else "cold")
            for i, e in enumerate(ranked)
            if share[e] >= MIN_SHARE
        ]


class FateShallow(Fate):
    name = "fate-shallow"
    split = "shallow"

    def eviction(self, layer: int, capacity: int) -> ARC:
        return ARC(capacity)


class EAP(Policy):
    name = "eap"

    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        self.paths = ActivationPathPredictor(ctx.num_layers, ctx.num_experts)

    def eviction(self, layer: int, capacity: int) -> ByPriority:
        return ByPriority(capacity, lambda e, layer=layer: self.paths.priority(layer, e))

    def begin_request(self) -> None:
        self.paths.begin_request()

    def on_route(self, layer: int, experts: list[int], counts: list[int]) -> list[Prefetch]:
        self.paths.observe(layer, experts, counts)
        return []

    def on_gate_input(self, layer: int, hidden: torch.Tensor) -> list[Prefetch]:
        out = []
        seen = max((m for m in self.ctx.moe_layers if m < layer), default=None)
        if seen is None:
            return out
        later = [m for m in self.ctx.moe_layers if m >= layer]
        nxt = self.ctx.next_moe(layer)
        for m, experts in zip(later, self.paths.predict_layers(later, seen, self.ctx.top_k)):
            if m == layer or m == nxt:
                self.predicted[m] = set(experts)
            out += [Prefetch(m, e, "hot") for e in experts]
        return out


class FMoE(Policy):
    name = "fmoe"

    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        self.store = ExpertMapStore(ctx.num_layers, ctx.num_experts)
        self.key: torch.Tensor | None = None
        self.observed: dict[int, torch.Tensor] = {}

    def begin_request(self) -> None:
        self.key = None

    def on_gate_input(self, layer: int, hidden: torch.Tensor) -> list[Prefetch]:
        probs = router_probs(hidden, self.ctx.routers[layer]).mean(0)
        if layer == self.ctx.moe_layers[0]:
            self.observed = {}
            if self.key is None:  # the request's first step: its prompt
                self.key = hidden.float().mean(0).cpu()
        self.observed[layer] = probs
        nxt = self.ctx.next_moe(layer)
        if nxt is None:
            return []
        match = self.store.trajectory_match(self.observed)
        if match is None:
            return []
        expert_map, similarity = match
        experts = experts_by_mass(expert_map[nxt], similarity, self.ctx.top_k)
        self.predicted[nxt] = set(experts)
        return [Prefetch(nxt, e, "hot") for e in experts]

    def on_route(self, layer: int, experts: list[int], counts: list[int]) -> list[Prefetch]:
        if layer == self.ctx.moe_layers[0] and len(self.observed) == 1:
            match = self.store.semantic_match(self.key)  # before layer 0 is computed: the prompt's key
            if match is not None:
                self.predicted.setdefault(layer, set(experts_by_mass(match[0][layer], match[1], self.ctx.top_k)))
        if layer == self.ctx.moe_layers[-1] and self.key is not None:
            expert_map = torch.zeros(self.ctx.num_layers, self.ctx.num_experts)
            for seen, probs in self.observed.items():
                expert_map[seen] = probs.cpu()
            self.store.add(self.key, expert_map)
        return []


class Klotski(Policy):
    name = "klotski"
    pipeline = True

    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        self.offline = ctx.coactivation is not None
        self.co = ctx.coactivation() if ctx.coactivation else Coactivation(ctx.moe_layers, ctx.num_experts)
        self.last: tuple[int, list[int], list[int]] | None = None
        # how much each expert is used (offline counts, then this run's routing): plain lists, read per eviction
        self.use = {layer: self.co.popularity(layer).tolist() for layer in ctx.moe_layers}

    def eviction(self, layer: int, capacity: int) -> ByPriority:
        """Hot experts stay: the least used (offline counts plus this run's routing) leaves first."""
        return ByPriority(capacity, self.use[layer].__getitem__)

    def on_route(self, layer: int, experts: list[int], counts: list[int]) -> list[Prefetch]:
        if not self.offline and self.last is not None and self.co.next.get(self.last[0]) == layer:
            self.co.add_counts(*self.last, experts, counts)
        use = self.use[layer]
        for e, n in zip(experts, counts):
            use[e] += n
        self.last = (layer, experts, counts)
        nxt = self.ctx.next_moe(layer)
        if nxt is None:
            return []
        picks = self.co.predict(layer, experts, counts, len(experts), KLOTSKI_MIN_TOKENS)
        self.predicted[nxt] = set(picks)
        return [Prefetch(nxt, e, "hot") for e in picks]


class CPUMoE(Policy):
    """llama.cpp's --n-cpu-moe: a fixed set of each layer's experts on the GPU, chosen once (the most used by
    offline counts, else by the first request), every other expert computed on the CPU, nothing moved after
    (cache/hybrid.py CPUExperts)."""

    name = "cpu"


class FreeToken(Policy):
    """FreeToken: one LRU cache shared by every layer; each step's misses split, the link's share of the link
    and host bandwidths moved, the rest computed on the CPU (cache/hybrid.py FreeTokenExperts)."""

    name = "freetoken"


POLICY_TYPES: dict[str, type[Policy]] = {
    "fate": Fate, "fate-shallow": FateShallow, "ondemand": OnDemand, "lru": LRUPolicy, "eap": EAP, "fmoe": FMoE,
    "klotski": Klotski, "resident": Resident, "cpu": CPUMoE, "freetoken": FreeToken,
}


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    return POLICY_TYPES[name](ctx)


POLICIES = tuple(POLICY_TYPES)
