"""Expert FFN callables computed straight from a tier's packed buffer: down(silu(gate x) * up x).

Backends, chosen per device and tier (`select_backend`, overridable with FATE_QUANT_BACKEND=torch|triton):
- "cpu dequant+matmul": on a CPU, dequantize gate_up and down with the plain-torch reference
  (quant.packing.dequantize: float32 (q - zero) * scale, cast to the compute dtype) at every call, then
  three F.linear, exactly as DenseExpert would on those weights. Nothing is cached: memory holds only
  the packed tier. Bitwise equal to a DenseExpert built from the dequantized weights.
- "triton-fused" (quant/triton_kernels.py): on a CUDA GPU with Triton, for INT2/INT4/INT8 tiers whose
  group size is a power of two (up to 1024), a multiple of the codes per word, and divides both matrix
  widths. At batch 1 a GEMV with
  the dequantization fused into the product computes gate and up in one launch, then down (silu(gate) *
  up applied while laying out its input); at 2-128 rows (any number for small experts) a GEMM with the
  dequantization fused in; at more rows of a large expert, on a Hopper GPU (2 and 4 bits) a warp-specialized GEMM
  that dequantizes into the tensor cores' registers (quant/hopper_gemm.py), elsewhere the Triton dequant kernel on
  a side stream
  and cuBLAS (quant/README.md has the measurements behind each choice).
- "torch dequant+matmul": the CPU path on a GPU, where Triton is missing or the tier does not fit it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from quant.layout import ExpertLayout
from quant.packing import PackedMatrix, dequantize
from quant.triton_kernels import tier_fits

CPU = "cpu dequant+matmul"
TORCH = "torch dequant+matmul"
TRITON = "triton-fused"


def triton_fits(layout: ExpertLayout) -> bool:
    return layout.kind == "quantized" and tier_fits(layout.bits, layout.group_size, layout.hidden,
                                                    layout.intermediate)


def select_backend(device: torch.device | str, layout: ExpertLayout) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return CPU
    forced = os.environ.get("FATE_QUANT_BACKEND", "")
    if forced == "torch":
        return TORCH
    from quant import triton_kernels

    if triton_kernels.available() and triton_fits(layout):
        return TRITON
    if forced == "triton":
        raise RuntimeError("FATE_QUANT_BACKEND=triton but Triton is missing or this tier does not fit its kernels")
    return TORCH


class QuantExpert:
    """One expert of a quantized tier, on the device its buffer is on (same call as DenseExpert)."""

    def __init__(self, buf: torch.Tensor, layout: ExpertLayout, backend: str | None = None):
        self.buf, self.layout = buf, layout
        self.gate_up, self.down = layout.packed(buf)
        self.backend = backend or select_backend(buf.device, layout)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == TRITON:
            return expert_ffn(x, self.gate_up, self.down)
        i = self.layout.intermediate
        w = dequantize(self.gate_up, x.dtype)
        return F.linear(F.silu(F.linear(x, w[:i])) * F.linear(x, w[i:]), dequantize(self.down, x.dtype))

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes


def dequantized_weights(buf: torch.Tensor, layout: ExpertLayout, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(gate, up, down) as plain matrices: the reference a QuantExpert must match."""
    gate_up, down = layout.packed(buf)
    w = dequantize(gate_up, dtype)
    i = layout.intermediate
    return w[:i], w[i:], dequantize(down, dtype)


def dense_weights(buf: torch.Tensor, layout: ExpertLayout, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A dense tier's buffer -> (gate, up, down) in `dtype` (copies only when the dtype changes)."""
    v = layout.views(buf)
    i = layout.intermediate
    gate_up, down = v["gate_up"].to(dtype), v["down"].to(dtype)
    return gate_up[:i], gate_up[i:], down


FUSED_MAX_ROWS = 128  # more rows of a large expert: Hopper's wgmma GEMM or dequantize + cuBLAS (quant/README.md)
LARGE_EXPERT = 1 << 24  # weights in gate|up from which that holds (Mixtral's 58.7M: yes; Qwen3's 3.1M: no)


def expert_ffn(x: torch.Tensor, gate_up: PackedMatrix, down: PackedMatrix) -> torch.Tensor:
    """down(silu(gate x) * up x) for x [M, H] on the GPU, from packed gate_up [2I, H] and down [H, I]: the fused
    GEMV at batch 1, the fused GEMM at a few rows, and for many rows of a large expert Hopper's wgmma GEMM or
    dequantize + cuBLAS."""
    from quant import hopper_gemm
    from quant import triton_kernels as tk

    if x.shape[0] <= tk.GEMV_MAX_ROWS:
        h = tk.gemv(x, gate_up, out_dtype=torch.float32)
        return tk.gemv(h, down, act=True, out_dtype=x.dtype)
    inter = down.shape[1]
    large = x.shape[0] > FUSED_MAX_ROWS and gate_up.shape[0] * gate_up.shape[1] >= LARGE_EXPERT
    if large:
        if hopper_gemm.usable(x, gate_up, down):  # Hopper: no bf16 copy of the weights (quant/README.md)
            return hopper_gemm.expert_ffn(x, gate_up, down)
        return tk.dequant_ffn_overlapped(x, gate_up, down)
    if x.dtype in (torch.bfloat16, torch.float16):
        h = tk.gemm(x, gate_up)
        return tk.gemm(F.silu(h[:, :inter]) * h[:, inter:], down)
    h = F.linear(x, tk.dequant(gate_up, x.dtype))
    return F.linear(F.silu(h[:, :inter]) * h[:, inter:], tk.dequant(down, x.dtype))
