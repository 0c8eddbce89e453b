"""MoE-Infinity's Expert Activation Path, as a predictor.

Each request leaves a matrix of counts (layers x experts: how many tokens each expert served). A
bounded store keeps the most recent ones. While a request runs, its partial matrix (the layers seen
so far) is matched by cosine similarity against the store; the best match's rows for the layers
still to come rank the experts to prefetch, and the counts double as cache priority.
"""

from __future__ import annotations

from collections import deque

import torch


class ActivationPathPredictor:
    def __init__(self, num_layers: int, num_experts: int, capacity: int = 64):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.store: deque[torch.Tensor] = deque(maxlen=capacity)
        self.current = torch.zeros(num_layers, num_experts)
        self.totals = torch.zeros(num_layers, num_experts)  # counts over every request: cache priority
        # numpy views of the same memory: one element read or written costs the host far less than torch's
        self._current, self._totals = self.current.numpy(), self.totals.numpy()

    def begin_request(self) -> None:
        if self.current.sum() > 0:
            self.store.append(self.current.clone())
        self.current.zero_()

    def observe(self, layer: int, experts: list[int], counts: list[int]) -> None:
        current, totals = self._current[layer], self._totals[layer]
        for e, c in zip(experts, counts):
            current[e] += c
            totals[e] += c

    def best_match(self, upto_layer: int) -> torch.Tensor | None:
        """The stored matrix most like the current one over layers 0..upto_layer (cosine similarity)."""
        if not self.store:
            return None
        seen = self.current[: upto_layer + 1].flatten()
        if seen.sum() == 0:
            return None
        stack = torch.stack(list(self.store))
        past = stack[:, : upto_layer + 1].flatten(1)
        sims = torch.nn.functional.cosine_similarity(past, seen[None], dim=1)
        return stack[int(torch.argmax(sims))]

    def predict(self, layer: int, upto_layer: int, n: int) -> list[int]:
        """Up to n experts of `layer`, by the best match's counts (falling back to all-time counts)."""
        return self.predict_layers([layer], upto_layer, n)[0]

    def predict_layers(self, layers: list[int], upto_layer: int, n: int) -> list[list[int]]:
        """`predict` for several layers against one match: the match found once, the rows ranked together."""
        if not layers:
            return []
        match = self.best_match(upto_layer)
        rows = (match if match is not None else self.totals)[layers]
        order = torch.argsort(rows, dim=1, descending=True, stable=True)[:, :n]
        counts = torch.gather(rows, 1, order)
        return [[e for e, c in zip(es, cs) if c > 0] for es, cs in zip(order.tolist(), counts.tolist())]

    def priority(self, layer: int, expert: int) -> float:
        return float(self._totals[layer, expert])
