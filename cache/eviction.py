"""Per-layer replacement policies over a fixed number of slots: LRU, ARC, and priority by count.

Each holds the set of experts resident in one layer's slots and answers two questions: is expert e
here (a hit, which also updates recency), and which resident expert leaves to make room for e.
Experts pinned for the step in progress are never chosen.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence


class LRU:
    """mixtral-offloading's per-layer LRU."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.order: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, expert: int) -> bool:
        return expert in self.order

    def touch(self, expert: int) -> None:
        self.order.move_to_end(expert)

    def victim(self, pinned: Collection[int], incoming: int | None = None) -> int:
        return next(e for e in self.order if e not in pinned)

    def admit(self, expert: int, victim: int | None) -> None:
        if victim is not None:
            del self.order[victim]
        self.order[expert] = None

    def remove(self, expert: int) -> None:
        del self.order[expert]

    def resident(self) -> list[int]:
        return list(self.order)


def first_unpinned(lists: Sequence[Iterable[int]], pinned: Collection[int]) -> int:
    """The first expert, list by list in order, that the step does not pin (the victim of a list-ordered cache)."""
    for lst in lists:
        for e in lst:
            if e not in pinned:
                return e
    raise RuntimeError("every slot of the layer is pinned")


class ARC:
    """Adaptive Replacement Cache (Megiddo & Modha): recency list T1, frequency list T2, ghost lists B1/B2.

    Ghost hits move the target size p of T1, so the cache leans to recency or frequency as the
    access pattern asks: Fate's per-layer eviction.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.p = 0
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, expert: int) -> bool:
        return expert in self.t1 or expert in self.t2

    def touch(self, expert: int) -> None:
        """A hit: the expert has been used at least twice, so it belongs to T2."""
        self.t1.pop(expert, None)
        self.t2.pop(expert, None)
        self.t2[expert] = None

    def victim(self, pinned: Collection[int], incoming: int | None = None) -> int:
        in_b2 = incoming is not None and incoming in self.b2
        prefer_t1 = self.t1 and (len(self.t1) > self.p or (in_b2 and len(self.t1) == self.p))
        return first_unpinned((self.t1, self.t2) if prefer_t1 else (self.t2, self.t1), pinned)

    def admit(self, expert: int, victim: int | None) -> None:
        c = self.capacity
        if expert in self.b1:
            self.p = min(c, self.p + max(1, len(self.b2) // max(1, len(self.b1))))
            del self.b1[expert]
            target = self.t2
        elif expert in self.b2:
            self.p = max(0, self.p - max(1, len(self.b1) // max(1, len(self.b2))))
            del self.b2[expert]
            target = self.t2
        else:
            target = self.t1
        if victim is not None:
            if victim in self.t1:
                del self.t1[victim]
                self.b1[victim] = None
            else:
                del self.t2[victim]
                self.b2[victim] = None
        target[expert] = None
        while len(self.b1) > c:  # ghost lists remember at most c evictions each
            self.b1.popitem(last=False)
        while len(self.b2) > c:
            self.b2.popitem(last=False)

    def remove(self, expert: int) -> None:
        self.t1.pop(expert, None)
        self.t2.pop(expert, None)

    def resident(self) -> list[int]:
        return [*self.t1, *self.t2]


class ByPriority(LRU):
    """Evict the resident expert with the lowest score (MoE-Infinity: activation counts).

    LRU's bookkeeping, without its recency: residents stay in arrival order, which breaks ties."""

    def __init__(self, capacity: int, score: Callable[[int], float]):
        super().__init__(capacity)
        self.score = score

    def touch(self, expert: int) -> None:
        pass

    def victim(self, pinned: Collection[int], incoming: int | None = None) -> int:
        """min(residents not pinned, key=score), the first of equals: a plain loop, cheaper on the host."""
        score, best, lowest = self.score, None, 0.0
        for e in self.order:
            if e in pinned:
                continue
            value = score(e)
            if best is None or value < lowest:
                best, lowest = e, value
        if best is None:
            raise RuntimeError("every slot of the layer is pinned")
        return best


INFLATION_LIMIT = 1e100  # inflated counts (DecayedFrequency, cost_model.ReuseEstimate) rebase above this


class DecayedFrequency(LRU):
    """Evict the resident expert used least, counting uses with weight `decay` per step of the layer since.

    A step's routing is told to `step` (every routed expert, resident or not), so an expert that leaves and
    comes back keeps its history: frequency where it is stable, recency where it shifts (half-life
    ln 0.5 / ln decay steps). Ties leave in arrival order. On the bundled model's decode traffic this loads
    fewer experts than LRU, ARC or plain counts at every budget (docs/bench-results.md, the floor).

    Counts are kept inflated: a use at step t adds decay ** -(t - base), so every expert's count is its decayed
    count times the same factor, no count changes when time passes, and the victim is the smallest count (a C-level
    min over the residents, the host's cost per load). The factor is folded back in now and then, well inside a
    float's range."""

    def __init__(self, capacity: int, decay: float):
        super().__init__(capacity)
        self.decay = decay
        self.now = 0
        self.unit = 1.0  # decay ** -(now - base): what a use now adds
        self.count: dict[int, float] = {}  # expert -> its decayed uses times `unit`'s factor

    def step(self, experts: Collection[int]) -> None:
        self.now += 1
        self.unit /= self.decay
        if self.unit > INFLATION_LIMIT:  # rebase on now: every count scaled by the same factor
            scale = 1.0 / self.unit
            self.count = {e: c * scale for e, c in self.count.items()}
            self.unit = 1.0
        count, unit = self.count, self.unit
        for e in experts:
            count[e] = count.get(e, 0.0) + unit

    def score(self, expert: int) -> float:
        return self.count.get(expert, 0.0) / self.unit

    def touch(self, expert: int) -> None:
        pass

    def admit(self, expert: int, victim: int | None) -> None:
        super().admit(expert, victim)
        self.count.setdefault(expert, 0.0)  # every resident has a count: the victim's min needs no default

    def victim(self, pinned: Collection[int], incoming: int | None = None) -> int:
        """min(residents not pinned, key=count), the first of equals (C-level min and key: the host's cost). The
        step's pinned experts were just counted, so the least used resident is rarely one of them."""
        key = self.count.__getitem__
        least = min(self.order, key=key, default=None)
        if least is not None and least not in pinned:
            return least
        candidates = [e for e in self.order if e not in pinned]
        if not candidates:
            raise RuntimeError("every slot of the layer is pinned")
        return min(candidates, key=key)
