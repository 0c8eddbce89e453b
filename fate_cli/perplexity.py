"""Perplexity of a model on a token stream, in non-overlapping windows through the normal forward path."""

from __future__ import annotations

import math
from collections.abc import Callable
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


def window_starts(n_tokens: int, window: int, max_windows: int | None = None, spread: bool = False) -> list[int]:
    """Starts of the non-overlapping windows of `window` tokens that hold at least two tokens; with
    max_windows, the first that many, or with spread that many evenly over the text (first and last
    included), so a subset samples the whole text rather than its beginning."""
    starts = [s for s in range(0, n_tokens - 1, window) if n_tokens - s >= 2]
    if max_windows is None or max_windows >= len(starts):
        return starts
    if not spread:
        return starts[:max_windows]
    if max_windows == 1:
        return starts[:1]
    last = len(starts) - 1
    return [starts[round(i * last / (max_windows - 1))] for i in range(max_windows)]


@torch.inference_mode()
def perplexity(
    model: Transformer, token_ids: list[int], window: int = 256, max_windows: int | None = None,
    spread: bool = False, progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Mean next-token negative log-likelihood over windows of `window` tokens (each scored from position 0),
    the first max_windows of them or, with spread, max_windows spread over the text; progress(done, total)
    after each window."""
    window = min(window, model.args.max_position_embeddings)
    device = model.embed_tokens.weight.device
    cache = model.new_cache(1, window)
    starts = window_starts(len(token_ids), window, max_windows, spread)
    total, count = 0.0, 0
    for done, start in enumerate(starts, 1):
        chunk = token_ids[start : start + window]
        tokens = torch.tensor([chunk], device=device)
        logits = model(tokens, cache, 0)[0, :-1].float()
        total += F.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
        count += len(chunk) - 1
        if progress is not None:
            progress(done, len(starts))
    if count == 0:
        raise ValueError("need at least two tokens to measure perplexity")
    mean = total / count
    return PerplexityResult(mean, math.exp(mean), count, len(starts))
