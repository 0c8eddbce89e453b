"""Two of the decode step's many small ops as one Triton kernel each, for CUDA tensors (both paths use them).

An eager RMSNorm is six kernels (cast, square, mean, rsqrt, scale, cast and weight) and a rotary embedding
on a decode row nine (two table gathers and casts, a negation, a concatenation, two products, a sum); in a
captured step of a 48-layer model that is thousands of launches a token. Each kernel here computes the same
values in one launch, rounding where torch rounds (the rotary kernel matches Rotary.apply to within one
rounding step per element); the norm sums its squares in another order.
"""

from __future__ import annotations

import torch

from quant.triton_kernels import HAVE_TRITON, available


def usable(x: torch.Tensor) -> bool:
    return x.is_cuda and available() and x.is_contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dimension, as fate_cli.model.layers.RMSNorm."""
    n = x.shape[-1]
    rows = x.numel() // n
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    _rms_norm_kernel[(rows,)](x, weight, out, n, eps, BLOCK=triton.next_power_of_2(n), num_warps=4)
    return out


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary.apply for one token per row: x [batch, heads, 1, head_dim] (any strides of a transposed
    view), cos/sin the float32 tables [positions, head_dim], positions [batch]."""
    b, heads, _, d = x.shape
    out = torch.empty(b, heads, 1, d, dtype=x.dtype, device=x.device)
    _rope_kernel[(b * heads,)](x, cos, sin, positions, out, heads, x.stride(0), x.stride(1), d,
                               BLOCK=triton.next_power_of_2(d), num_warps=1)
    return out


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.arange(0, BLOCK)
        ok = col < N
        x = tl.load(x_ptr + row * N + col, mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        h = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # RMSNorm casts back before the weight
        w = tl.load(w_ptr + col, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + col, (w * h).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, HEADS, stride_b, stride_h, D,
                     BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // HEADS
        h = pid % HEADS
        i = tl.arange(0, BLOCK)
        ok = i < D
        half = D // 2
        pos = tl.load(pos_ptr + b)
        dt = x_ptr.dtype.element_ty
        base = x_ptr + b * stride_b + h * stride_h
        x = tl.load(base + i, mask=ok, other=0.0).to(tl.float32)
        partner = tl.load(base + tl.where(i < half, i + half, i - half), mask=ok, other=0.0).to(tl.float32)
        rotated = tl.where(i < half, -partner, partner)
        c = tl.load(cos_ptr + pos * D + i, mask=ok, other=0.0).to(dt).to(tl.float32)
        s = tl.load(sin_ptr + pos * D + i, mask=ok, other=0.0).to(dt).to(tl.float32)
        y = (x * c).to(dt).to(tl.float32) + (rotated * s).to(dt).to(tl.float32)
        tl.store(out_ptr + pid * D + i, y.to(dt), mask=ok)
