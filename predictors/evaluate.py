"""Offline measurements of routing on real text: expert utilisation and cross-layer predictability."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from fate_cli.model.experts import ExpertFn, ExpertProvider
from fate_cli.model.model import Transformer
from fate_cli.model.moe import MoEBlock, route
from predictors.cross_layer import predict_next


class GateInputRecorder(ExpertProvider):
    """Wraps an ExpertProvider and keeps every MoE layer's router input, for analysis after a run."""

    def __init__(self, inner: ExpertProvider):
        self.inner = inner
        self.inputs: dict[int, list[torch.Tensor]] = defaultdict(list)

    def begin_request(self) -> None:
        self.inner.begin_request()

    def gate_input(self, layer: int, hidden: torch.Tensor) -> None:
        self.inputs[layer].append(hidden.detach().float().cpu())
        self.inner.gate_input(layer, hidden)

    def experts(
        self, layer: int, ids: Sequence[int], token_counts: Sequence[int]
    ) -> Iterable[tuple[int, ExpertFn]]:
        return self.inner.experts(layer, ids, token_counts)


@dataclass
class LayerRouting:
    layer: int
    top_share: float  # share of all routed (token, expert) picks taken by the most used expert
    entropy: float  # entropy of the pick distribution over experts, divided by log(num_experts)
    recall_at_k: float | None  # previous layer's gate input through this router: true top-k found in top-k
    recall_at_k1: float | None  # ... found in the predicted top-(k+1)


def routing_report(model: Transformer, inputs: dict[int, list[torch.Tensor]]) -> list[LayerRouting]:
    args = model.args
    k, experts = args.top_k, args.num_experts
    routers = {
        i: layer.mlp.gate.weight.detach().float().cpu()
        for i, layer in enumerate(model.layers)
        if isinstance(layer.mlp, MoEBlock)
    }
    gate_inputs = {layer: torch.cat(chunks) for layer, chunks in inputs.items()}
    report = []
    for layer in sorted(gate_inputs):
        x = gate_inputs[layer]
        _, true_ids = route(x @ routers[layer].t(), k, args.norm_topk_prob)
        counts = torch.bincount(true_ids.flatten(), minlength=experts).double()
        share = counts / counts.sum()
        nonzero = share[share > 0]
        entropy = float(-(nonzero * nonzero.log()).sum() / math.log(experts))
        recall_k = recall_k1 = None
        if layer - 1 in gate_inputs:
            prev = gate_inputs[layer - 1]
            recall_k = _recall(true_ids, predict_next(prev, routers[layer], k))
            recall_k1 = _recall(true_ids, predict_next(prev, routers[layer], k + 1))
        report.append(LayerRouting(layer, float(share.max()), entropy, recall_k, recall_k1))
    return report


def _recall(true_ids: torch.Tensor, predicted: torch.Tensor) -> float:
    """Mean over tokens of |true ∩ predicted| / |true|."""
    hits = (true_ids.unsqueeze(-1) == predicted.unsqueeze(-2)).any(-1).float()
    return float(hits.mean())
