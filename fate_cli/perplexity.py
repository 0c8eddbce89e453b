"""Perplexity of a model on a token stream, in non-overlapping windows through the normal forward path."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fate_cli.model.model import Transformer


@dataclass
class PerplexityResult:
    mean_nll: float
    perplexity: float
    tokens: int
    windows: int


@torch.inference_mode()
def perplexity(
    model: Transformer, token_ids: list[int], window: int = 256, max_windows: int | None = None
) -> PerplexityResult:
    """Mean next-token negative log-likelihood over windows of `window` tokens (each scored from position 0)."""
    window = min(window, model.args.max_position_embeddings)
    device = model.embed_tokens.weight.device
    cache = model.new_cache(1, window)
    total, count, windows = 0.0, 0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window]
        if len(chunk) < 2:
            break
        tokens = torch.tensor([chunk], device=device)
        logits = model(tokens, cache, 0)[0, :-1].float()
        total += F.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
        count += len(chunk) - 1
        windows += 1
        if max_windows is not None and windows >= max_windows:
            break
    if count == 0:
        raise ValueError("need at least two tokens to measure perplexity")
    mean = total / count
    return PerplexityResult(mean, math.exp(mean), count, windows)
