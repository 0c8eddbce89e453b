"""Klotski's co-activation prefetcher: which experts of the next layer follow the ones just routed.

counts[l][i, j] is how many tokens went to expert i of MoE layer l and to expert j of the next MoE
layer, gathered offline by running the model over held-out text (fate_cli/engine/coactivation.py), and, when no offline
counts exist for a model, learned from its own routing as it runs. Given a layer's routed experts
and their token counts, the next layer's experts are scored by sum_i tokens_i * P(j | i).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


class Coactivation:
    def __init__(self, moe_layers: Sequence[int], num_experts: int):
        self.num_experts = num_experts
        self.next = dict(zip(moe_layers, list(moe_layers)[1:]))
        self.counts = {layer: torch.zeros(num_experts, num_experts) for layer in self.next}

    def add_tokens(self, layer: int, here: torch.Tensor, after: torch.Tensor) -> None:
        """here, after: [tokens, k] expert ids of the same tokens at `layer` and at the next MoE layer."""
        a = F.one_hot(here.cpu(), self.num_experts).sum(1).float()
        b = F.one_hot(after.cpu(), self.num_experts).sum(1).float()
        self.counts[layer] += a.t() @ b

    def add_step(self, routed: dict[int, torch.Tensor]) -> None:
        """routed: MoE layer -> [tokens, k] ids of one forward step."""
        for layer, nxt in self.next.items():
            if layer in routed and nxt in routed:
                self.add_tokens(layer, routed[layer], routed[nxt])

    def add_counts(self, layer: int, experts: Sequence[int], tokens: Sequence[int],
                   after: Sequence[int], after_tokens: Sequence[int]) -> None:
        """Online, from what a step routed at two consecutive layers (per-expert token counts only)."""
        total = max(1, sum(tokens))
        # through numpy views of the same float32 memory: the same arithmetic at a fraction of torch's host cost
        add = np.array(tokens, dtype=np.float32)[:, None] * np.array(after_tokens, dtype=np.float32)[None, :] / total
        self.counts[layer].numpy()[np.ix_(list(experts), list(after))] += add

    def popularity(self, layer: int) -> torch.Tensor:
        """How often each expert of `layer` was routed to ([experts]), from the same counts: its pairs with the
        next layer plus its pairs with the previous one."""
        total = torch.zeros(self.num_experts)
        if layer in self.counts:
            total += self.counts[layer].sum(1)
        for prev, nxt in self.next.items():
            if nxt == layer:
                total += self.counts[prev].sum(0)
        return total

    def predict(self, layer: int, experts: Sequence[int], tokens: Sequence[int], n: int,
                min_score: float = 0.0) -> list[int]:
        """Up to n experts of the next MoE layer by score (about how many tokens are expected to route there),
        only those scoring at least min_score (and above zero)."""
        if layer not in self.counts or not experts:
            return []
        rows = self.counts[layer][list(experts)]
        cond = rows / rows.sum(1, keepdim=True).clamp(min=1.0)  # P(j | i)
        score = (torch.tensor(list(tokens), dtype=torch.float32)[:, None] * cond).sum(0)
        values, order = torch.sort(score, descending=True)
        least = float(np.float32(min_score))  # compared as the float32 scores are
        return [e for e, v in zip(order[:n].tolist(), values[:n].tolist()) if v > 0 and v >= least]
