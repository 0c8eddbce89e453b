"""Experts computed on the CPU from their host-tier buffers: one call per layer for all its CPU experts.

`cpu_moe(x, experts, weights)` is the contract the offload cache and CPU-only runs call: x [T, H] on the
CPU, `experts` the layer's experts to compute here as (buffer, layout) in the tier store's format (the host
tier's own copy: quant/layout.py), `weights` [T, len(experts)] each token's routing weight for each of them
(0 where a token does not route to it). It returns sum_j weights[:, j] * expert_j(x), [T, H] in x's dtype.
This is the plain-torch reference (dequantize, then matmul, one expert at a time); faster kernels keep the
same contract and are held to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from quant.expert_act import ClampedSwiGLU
from quant.layout import ExpertLayout
from quant.packing import dequantize

CPU_REFERENCE = "cpu dequant+matmul (reference)"


def cpu_moe(x: torch.Tensor, experts: Sequence[tuple[torch.Tensor, ExpertLayout]], weights: torch.Tensor,
            act: ClampedSwiGLU | None = None) -> torch.Tensor:
    """sum over j of weights[:, j] * expert_j(x) for the experts given, computed on the CPU."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    xf = x.float()
    for j, (buf, layout) in enumerate(experts):
        rows = weights[:, j].nonzero().flatten()
        if rows.numel() == 0:
            continue
        gate_up, down = layout.packed(buf)
        w_gu, w_d = dequantize(gate_up), dequantize(down)
        b_gu = b_d = None
        if layout.bias is not None:  # gpt_oss: 16-bit biases after the weights
            views = layout.views(buf)
            b_gu, b_d = views["gate_up.bias"].float(), views["down.bias"].float()
        inter = layout.intermediate
        h = F.linear(xf[rows], w_gu, b_gu)
        a = F.silu(h[:, :inter]) * h[:, inter:] if act is None else act(h[:, :inter], h[:, inter:])
        out[rows] += weights[rows, j, None].float() * F.linear(a, w_d, b_d)
    return out.to(x.dtype)
