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

    def begin_request(self) -> None:
        if self.current.sum() > 0:
            self.store.append(self.current.clone())
        self.current.zero_()

    def observe(self, layer: int, experts: list[int], counts: list[int]) -> None:
        for e, c in zip(experts, counts):
            self.current[layer, e] += c
            self.totals[layer, e] += c

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
        match = self.best_match(upto_layer)
        row = match[layer] if match is not None else self.totals[layer]
        order = torch.argsort(row, descending=True, stable=True)
        return [int(e) for e in order[:n] if row[e] > 0]

    def priority(self, layer: int, expert: int) -> float:
        return float(self.totals[layer, expert])
