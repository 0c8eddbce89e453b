"""YaRN rope scaling: inverse frequencies blended between interpolation and extrapolation, and the factor
that scales cos/sin. The same arithmetic as transformers' _compute_yarn_parameters (float32)."""

from __future__ import annotations

import math

import torch

from fate_cli.model.args import YarnRope


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_frequencies(head_dim: int, theta: float, yarn: YarnRope) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [head_dim / 2] float32, the attention factor cos and sin are multiplied by)."""
    factor = yarn.factor
    if yarn.attention_factor is not None:
        attention = yarn.attention_factor
    elif yarn.mscale and yarn.mscale_all_dim:
        attention = _mscale(factor, yarn.mscale) / _mscale(factor, yarn.mscale_all_dim)
    else:
        attention = _mscale(factor)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no singularity
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # the share of extrapolation per dimension
    return interpolation * (1 - keep) + extrapolation * keep, float(attention)
