"""How close an online eviction rule comes to Belady's MIN on the bundled model's recorded decode traffic.

On the routing and slots policy_traffic.py holds MIN to (the `replay:64x128` target on the CPU, one warm-up
request then -r measured ones of -p prompt and -n generated tokens; per-layer slots of fate's measured plan at
25/50/75%, and the same total split evenly), prints per budget the loads per generated token, with no prefetch
(every load a miss), of online eviction rules, each a function of the past routing only: LRU, LFU (plain counts
kept across evictions), ARC, LRU-2, 2Q and decayed use counts (cache/eviction.py's DecayedFrequency) over a grid
of decays; each over MIN; the best rule in hindsight for the whole model and for each layer on its own (a bound
on what tuning an online rule can do). Then:
- ahead: the best rule with a perfect predictor of the current token's routing (cache/online.py ahead_loads):
  the same loads, none of them a miss;
- lookahead: the best decay that also sees the next w tokens' routing (furthest next use within the window, decayed
  counts beyond it), an oracle: how much of the future it takes to come within 1.3x of MIN; with the whole future,
  Belady's furthest next use with each loaded expert kept in a slot (MIN may use one without keeping it).
--check replays the real expert cache (`lru`, and `fate` with its prefetches off) and asserts its loads equal
the simulation's. Deterministic: counts only.

    python3 benchmarks/online_floor.py [-p 128] [-n 64] [-r 2] [--check]
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence

import torch

from cache.belady import NEVER, min_loads
from cache.eviction import ARC, LRU, ByPriority, DecayedFrequency, first_unpinned
from cache.online import Eviction, Observe, ahead_loads, demand_loads
from fate_cli.bench import open_target, parse_budgets, prompt_set

DECAYS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
WINDOWS = (1, 2, 4, 8, 16, 32)
TARGET = 1.3  # the goal: loads within 1.3x of MIN


class LRU2(LRU):
    """LRU-K with K=2 (O'Neil et al.): evict the resident whose second most recent use is oldest (never: first),
    then the least recently used. Uses are remembered for experts that left too."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.now = 0
        self.last: dict[int, tuple[float, float]] = {}  # expert -> (second last use, last use)

    def step(self, experts: Collection[int]) -> None:
        self.now += 1
        for e in experts:
            self.last[e] = (self.last.get(e, (-NEVER, -NEVER))[1], self.now)

    def touch(self, expert: int) -> None:
        pass

    def victim(self, pinned: Collection[int], incoming: int | None = None) -> int:
        return min((e for e in self.order if e not in pinned), key=lambda e: self.last.get(e, (-NEVER, -NEVER)))


class TwoQ:
    """2Q (Johnson & Shasha): a first use enters a FIFO A1in (a quarter of the slots); an expert evicted from it is
    remembered in A1out (half the slots' worth) and on its return enters Am, an LRU of the reused."""

    def __init__(self, capacity: int):
        self.kin, self.kout = max(1, capacity // 4), max(1, capacity // 2)
        self.a1in: OrderedDict[int, None] = OrderedDict()
        self.a1out: OrderedDict[int, None] = OrderedDict()
        self.am: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, expert: int) -> bool:
        return expert in self.a1in or expert in self.am

    def touch(self, expert: int) -> None:
        if expert in self.am:
            self.am.move_to_end(expert)

    def victim(self, pinned: Collection[int], incoming: int | None = None) -> int:
        return first_unpinned((self.a1in, self.am) if len(self.a1in) > self.kin or not self.am
                              else (self.am, self.a1in), pinned)

    def admit(self, expert: int, victim: int | None) -> None:
        if victim is not None:
            if victim in self.a1in:
                del self.a1in[victim]
                self.a1out[victim] = None
                while len(self.a1out) > self.kout:
                    self.a1out.popitem(last=False)
            else:
                del self.am[victim]
        if expert in self.a1out:
            del self.a1out[expert]
            self.am[expert] = None
        else:
            self.a1in[expert] = None


class Lookahead(DecayedFrequency):
    """An oracle, not an online rule: decayed use counts that also see the next `window` steps. Evict the resident
    whose next use within the window is furthest, the one used least by decayed count among those not seen."""

    def __init__(self, capacity: int, decay: float, steps: Sequence[Collection[int]], window: int):
        super().__init__(capacity, decay)
        self.steps, self.window = steps, window

    def victim(self, pinned: Collection[int], incoming: int | None = None) -> int:
        ahead = self.steps[self.now: self.now + self.window]  # self.now steps observed: the next is steps[now]

        def key(e: int) -> tuple[float, float]:
            return next((i for i, s in enumerate(ahead) if e in s), NEVER), -self.score(e)

        return max((e for e in self.order if e not in pinned), key=key)  # max keeps the first of equals


Rule = Callable[[int], tuple[Eviction, Observe | None]]  # slots -> a fresh rule and what it observes


def lfu(capacity: int) -> tuple[Eviction, Observe]:
    uses: dict[int, int] = {}

    def observe(step: Sequence[int]) -> None:
        for e in step:
            uses[e] = uses.get(e, 0) + 1

    return ByPriority(capacity, lambda e: uses.get(e, 0)), observe


def with_history(make: Callable[[int], LRU2 | DecayedFrequency]) -> Rule:
    def rule(capacity: int) -> tuple[Eviction, Observe]:
        ev = make(capacity)
        return ev, ev.step
    return rule


RULES: dict[str, Rule] = {
    "lru": lambda c: (LRU(c), None),
    "lfu": lfu,
    "arc": lambda c: (ARC(c), None),
    "lru-2": with_history(LRU2),
    "2q": lambda c: (TwoQ(c), None),
    **{f"decay {d}": with_history(lambda c, d=d: DecayedFrequency(c, d)) for d in DECAYS},
}


def record(p: int, n: int, r: int) -> tuple[dict[int, list[tuple[int, ...]]], dict[int, list[list[int]]], list[bool]]:
    """Per MoE layer, the experts (and their tokens) of every step of the warm-up and measured requests, and which
    steps count (the measured requests' decode steps), as policy_traffic.py records them."""
    target = open_target("replay:64x128", torch.device("cpu"), torch.float32, None)
    routing: dict[int, list[tuple[int, ...]]] = {}
    counts: dict[int, list[list[int]]] = {}
    counted: list[bool] = []
    for i, prompt in enumerate(prompt_set(p, r + 1, None)):
        for k, step in enumerate(target.steps([prompt], n)):
            for traffic in step.layers:
                routing.setdefault(traffic.layer, []).append(tuple(traffic.ids))
                counts.setdefault(traffic.layer, []).append(list(traffic.counts))
            counted.append(i > 0 and k > 0)
    return routing, counts, counted


def even(slots: dict[int, int]) -> dict[int, int]:
    """The same total split evenly, the remainder to the shallower layers."""
    share, extra = divmod(sum(slots.values()), len(slots))
    return {layer: share + (i < extra) for i, layer in enumerate(sorted(slots))}


def check(p: int, n: int, r: int, budgets: list[tuple[str, int | None]], sim: Callable[[str, dict[int, int]], int]
          ) -> None:
    """The real expert cache's loads on the same traffic equal the simulation's: `lru`, and `fate` without prefetch."""
    from fate_cli.engine.replay import ReplayModel

    cpu = torch.device("cpu")
    target = open_target("replay:64x128", cpu, torch.float32, None)
    prompts = prompt_set(p, r + 1, None)
    for label, budget in budgets:
        for policy, rule in (("lru", "lru"), ("fate", "decay 0.95")):
            session = target.session(policy, budget, miss="link")
            offload = session.offload
            if policy == "fate":  # its eviction alone: no guesses for the next layer
                offload.policy.on_gate_input = lambda layer, hidden: []
                offload.policy.on_lookahead = lambda layer, ids, probs: []
            loads = 0
            for i, prompt in enumerate(prompts):
                steps = target.steps([prompt], n)
                player = ReplayModel(session.provider, target.hidden, cpu, torch.float32,
                                     max(s.tokens for s in steps))
                session.provider.begin_request()
                player.step(steps[0])
                before = sum(offload.stats.loads.values())
                for step in steps[1:]:
                    player.step(step)
                if i > 0:
                    loads += sum(offload.stats.loads.values()) - before
            assert offload.stats.prefetches == 0
            slots = {layer: state.capacity for layer, state in offload.layers.items()}
            simulated = sim(rule, slots)
            print(f"check {label:>4} {policy:5} real cache {loads} loads, simulation ({rule}) {simulated}"
                  f" {'equal' if loads == simulated else 'DIFFERENT'}", flush=True)
            assert loads == simulated
            session.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", type=int, default=128, help="prompt tokens")
    ap.add_argument("-n", type=int, default=64, help="generated tokens")
    ap.add_argument("-r", type=int, default=2, help="requests measured after one warm-up")
    ap.add_argument("--check", action="store_true", help="also replay the real cache and compare its loads")
    args = ap.parse_args()
    torch.set_num_threads(2)
    routing, counts, counted = record(args.p, args.n, args.r)
    tokens = args.r * args.n  # per generated token, as policy_traffic.py divides

    def per_layer(rule: str, slots: dict[int, int]) -> dict[int, int]:
        out = {}
        for layer, c in slots.items():
            ev, observe = RULES[rule](c)
            out[layer] = demand_loads(routing[layer], ev, c, counted, observe, counts[layer])
        return out

    def simulate(rule: str, slots: dict[int, int]) -> int:
        return sum(per_layer(rule, slots).values())

    target = open_target("replay:64x128", torch.device("cpu"), torch.float32, None)
    budgets = parse_budgets("25%,50%,75%", target.footprint)
    for label, budget in budgets:
        fate = target.plan("fate", budget).plan.slots
        for split, slots in (("fate's plan", fate), ("even", even(fate))):
            floor = sum(min_loads(routing[layer], c, counted) for layer, c in slots.items())
            print(f"\n{label} {split}: slots {[slots[layer] for layer in sorted(slots)]}, MIN {floor / tokens:.2f}"
                  " loads/token", flush=True)
            loads = {rule: per_layer(rule, slots) for rule in RULES}
            totals = {rule: sum(by_layer.values()) for rule, by_layer in loads.items()}
            for rule, total in totals.items():
                print(f"  {rule:12} {total / tokens:6.2f}  {total / floor:5.2f}x MIN")
            best = min(totals, key=totals.__getitem__)
            print(f"  best in hindsight, one rule: {best} {totals[best] / tokens:.2f} ({totals[best] / floor:.2f}x)")
            by_layer = sum(min(loads[rule][layer] for rule in RULES) for layer in slots)
            print(f"  best in hindsight, a rule per layer: {by_layer / tokens:.2f} ({by_layer / floor:.2f}x)")
            ahead = []
            for layer, c in slots.items():
                ev, observe = RULES[best](c)
                ahead.append(ahead_loads(routing[layer], ev, c, counted, observe, counts[layer]))
            print(f"  {best} with the current token's routing known ahead: {sum(a for a, _ in ahead) / tokens:.2f}"
                  f" loads, {sum(m for _, m in ahead)} of them misses", flush=True)
            assert sum(a for a, _ in ahead) == totals[best]
            decay = min(DECAYS, key=lambda d: totals[f"decay {d}"])
            for w in WINDOWS:
                seen = 0
                for layer, c in slots.items():
                    ev = Lookahead(c, decay, routing[layer], w)
                    seen += demand_loads(routing[layer], ev, c, counted, ev.step, counts[layer])
                print(f"  decay {decay} seeing {w:2} tokens ahead (oracle): {seen / tokens:.2f} ({seen / floor:.2f}x)"
                      f"{'  within 1.3x' if seen <= TARGET * floor else ''}", flush=True)
            # seeing everything: Belady's furthest next use where each load takes a slot (MIN may instead use an
            # expert without keeping it, when every resident is needed sooner)
            kept = 0
            for layer, c in slots.items():
                ev = Lookahead(c, decay, routing[layer], len(routing[layer]))
                kept += demand_loads(routing[layer], ev, c, counted, ev.step, counts[layer])
            print(f"  furthest next use, each load kept (oracle): {kept / tokens:.2f} ({kept / floor:.2f}x)",
                  flush=True)
    if args.check:
        check(args.p, args.n, args.r, budgets, simulate)


if __name__ == "__main__":
    main()
