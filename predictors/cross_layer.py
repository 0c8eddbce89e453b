"""Fate's cross-layer gate: layer i's gate input through layer i+1's router predicts layer i+1's experts.

The gate input of adjacent layers is alike (the residual stream changes little per layer), so the
next router applied early is a cheap, accurate guess: one small matmul per layer.
"""

from __future__ import annotations

import torch


def router_probs(gate_input: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """softmax(gate_input @ router.T) in float32: a router's probabilities per token [tokens, experts]."""
    return torch.softmax((gate_input @ router.t()).float(), dim=-1)


def top_next(gate_input: torch.Tensor, next_router: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The next layer's n likeliest experts per token and their router probabilities, both [tokens, n]."""
    top = torch.topk(router_probs(gate_input, next_router), n, dim=-1)
    return top.indices, top.values


def lookahead(gate_input: torch.Tensor, next_router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fate's prediction for a top-k model: the next layer's k+1 likeliest experts per token (their code: top-5
    for a top-4 model), and their probabilities."""
    return top_next(gate_input, next_router, top_k + 1)


def predict_next(gate_input: torch.Tensor, next_router: torch.Tensor, n: int) -> torch.Tensor:
    """Top-n experts per token of the next layer [tokens, n]."""
    return top_next(gate_input, next_router, n)[0]
