"""Expert FFN callables computed straight from a tier's packed buffer: down(silu(gate x) * up x), or where the
family's experts have biases and another activation (gpt_oss), down(act(gate x + b_g, up x + b_u)) + b_d with the
biases read from the buffer (quant/layout.py) and the activation given by the model (quant/expert_act.py).

Backends, chosen per device and tier (`select_backend`, overridable with FATE_QUANT_BACKEND=torch|triton):
- "cpu fused dequant (numba)": on a CPU, for up to CPU_KERNEL_MAX_TOKENS tokens (decode), the CPU expert
  kernels of quant/cpu_kernels.py through quant/cpu_experts.cpu_moe, straight from the packed buffer (equal to
  the dequantize-then-matmul below within float32 rounding); more tokens (prefill) take the path below, with
  the weights dequantized once for all of them by cpu_kernels' multi-threaded dequantize (bitwise the
  reference's). Where numba is missing, the tier does not fit the kernels (INT3) or FATE_CPU_EXPERTS=reference,
  "cpu dequant+matmul" instead.
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

from quant import cpu_experts
from quant.expert_act import ClampedSwiGLU
from quant.layout import ExpertLayout
from quant.packing import PackedMatrix, dequantize
from quant.triton_kernels import tier_fits

CPU = "cpu dequant+matmul"
CPU_FUSED = cpu_experts.CPU_FUSED
CPU_KERNEL_MAX_TOKENS = cpu_experts.KERNEL_MAX_TOKENS  # above: dequantized once, then torch's matmul
TORCH = "torch dequant+matmul"
TRITON = "triton-fused"


def triton_fits(layout: ExpertLayout) -> bool:
    return layout.kind == "quantized" and tier_fits(layout.bits, layout.group_size, layout.hidden,
                                                    layout.intermediate)


def select_backend(device: torch.device | str, layout: ExpertLayout) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_FUSED if layout.kind == "quantized" and cpu_experts.use_kernels(layout) else CPU
    forced = os.environ.get("FATE_QUANT_BACKEND", "")
    if forced == "torch":
        return TORCH
    from quant import triton_kernels

    if triton_kernels.available() and triton_fits(layout):
        return TRITON
    if forced == "triton":
        raise RuntimeError("FATE_QUANT_BACKEND=triton but Triton is missing or this tier does not fit its kernels")
    return TORCH


def backend_label(backend: str) -> str:
    """A backend as the describe line names it: the CPU's fused kernel says where it hands over."""
    if backend == CPU_FUSED:
        return f"{CPU_FUSED} up to {CPU_KERNEL_MAX_TOKENS} tokens a call, {CPU} above"
    return backend


class QuantExpert:
    """One expert of a quantized tier, on the device its buffer is on (same call as DenseExpert). act: the
    family's activation of (gate, up) (None: silu(gate) * up)."""

    def __init__(self, buf: torch.Tensor, layout: ExpertLayout, backend: str | None = None,
                 act: ClampedSwiGLU | None = None):
        self.buf, self.layout, self.act = buf, layout, act
        self.gate_up, self.down = layout.packed(buf)
        self.biases = layout.biases(buf)
        self.backend = backend or select_backend(buf.device, layout)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == TRITON:
            return expert_ffn(x, self.gate_up, self.down, self.biases, self.act)
        if self.backend == CPU_FUSED and x.shape[0] <= CPU_KERNEL_MAX_TOKENS:
            return cpu_experts.cpu_moe(x, [(self.buf, self.layout)], self._ones(x.shape[0]), self.act)
        if self.backend == CPU_FUSED:  # the same weights as dequantize's, made by the multi-threaded kernel
            w, w_down = (m.to(x.dtype) for m in cpu_experts.dequantize_expert(self.buf, self.layout, scratch=True))
        else:
            w, w_down = dequantize(self.gate_up, x.dtype), dequantize(self.down, x.dtype)
        i = self.layout.intermediate
        if self.biases is None and self.act is None:
            return F.linear(F.silu(F.linear(x, w[:i])) * F.linear(x, w[i:]), w_down)
        # as DenseExpert computes it from the dequantized weights and the biases in x's dtype
        b_gu, b_d = (None, None) if self.biases is None else (b.to(x.dtype) for b in self.biases)
        g = F.linear(x, w[:i], None if b_gu is None else b_gu[:i])
        u = F.linear(x, w[i:], None if b_gu is None else b_gu[i:])
        return F.linear(activate(g, u, self.act), w_down, b_d)

    def cpu_buffer(self) -> tuple[torch.Tensor, ExpertLayout] | None:
        """(buffer, layout) where the CPU kernels compute this expert (a MoE block on the CPU computes a layer's
        such experts in one call), else None."""
        return (self.buf, self.layout) if self.backend == CPU_FUSED else None

    @staticmethod
    def _ones(tokens: int) -> torch.Tensor:
        return torch.ones(tokens, 1)

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


def expert_biases(buf: torch.Tensor, layout: ExpertLayout, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """An expert's (gate, up, down) biases in `dtype`, or None where its layout has none (any tier's buffer)."""
    biases = layout.biases(buf)
    if biases is None:
        return None
    gate_up, down = (b.to(dtype) for b in biases)
    i = layout.intermediate
    return gate_up[:i], gate_up[i:], down


def activate(gate: torch.Tensor, up: torch.Tensor, act: ClampedSwiGLU | None) -> torch.Tensor:
    """The expert's activation of (gate, up): silu(gate) * up, or the family's."""
    return F.silu(gate) * up if act is None else act(gate, up)


FUSED_MAX_ROWS = 128  # more rows of a large expert: Hopper's wgmma GEMM or dequantize + cuBLAS (quant/README.md)
LARGE_EXPERT = 1 << 24  # weights in gate|up from which that holds (Mixtral's 58.7M: yes; Qwen3's 3.1M: no)


def expert_ffn(x: torch.Tensor, gate_up: PackedMatrix, down: PackedMatrix,
               biases: tuple[torch.Tensor, torch.Tensor] | None = None, act: ClampedSwiGLU | None = None
               ) -> torch.Tensor:
    """down(silu(gate x) * up x) for x [M, H] on the GPU, from packed gate_up [2I, H] and down [H, I]: the fused
    GEMV at batch 1, the fused GEMM at a few rows, and for many rows of a large expert Hopper's wgmma GEMM or
    dequantize + cuBLAS. With biases (gate|up [2I], down [H]) or another activation, the same products with the
    biases and the activation applied between them by torch."""
    from quant import hopper_gemm
    from quant import triton_kernels as tk

    if biases is not None or act is not None:
        return _biased_ffn(x, gate_up, down, biases, act)

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


def _biased_ffn(x: torch.Tensor, gate_up: PackedMatrix, down: PackedMatrix,
                biases: tuple[torch.Tensor, torch.Tensor] | None, act: ClampedSwiGLU | None) -> torch.Tensor:
    """expert_ffn for experts with biases or another activation: the fused GEMV (batch 1, h in float32) or GEMM
    (a few rows, 16-bit) for the products, else dequantize + cuBLAS; bias and activation in between."""
    from quant import triton_kernels as tk

    inter = down.shape[1]
    b_gu, b_d = (None, None) if biases is None else biases
    if x.shape[0] <= tk.GEMV_MAX_ROWS:
        h = tk.gemv(x, gate_up, out_dtype=torch.float32)
        h = h if b_gu is None else h + b_gu.float()
        y = tk.gemv(activate(h[:, :inter], h[:, inter:], act), down, out_dtype=torch.float32)
        return (y if b_d is None else y + b_d.float()).to(x.dtype)
    if x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] <= FUSED_MAX_ROWS:
        h = tk.gemm(x, gate_up)
        h = h if b_gu is None else h + b_gu.to(x.dtype)
        y = tk.gemm(activate(h[:, :inter], h[:, inter:], act).contiguous(), down)
        return y if b_d is None else y + b_d.to(x.dtype)
    h = F.linear(x, tk.dequant(gate_up, x.dtype), None if b_gu is None else b_gu.to(x.dtype))
    return F.linear(activate(h[:, :inter], h[:, inter:], act), tk.dequant(down, x.dtype),
                    None if b_d is None else b_d.to(x.dtype))
