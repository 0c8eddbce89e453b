"""A model's dense (non-expert) weights as INT8 for CPU decode: one scale per output row, symmetric.

At batch 1 a CPU decode step reads every dense weight once, so its time is those bytes over the host's read
bandwidth. In float32 the non-expert weights of Qwen3-30B-A3B (attention, lm_head) are 4.9 GB a token against
about 1 GB of INT4 experts; at INT8 they are 1.2 GB. A few rows at a time go through torch's own weight-only
kernel (`torch._weight_int8pack_mm`, bfloat16 activations: its float32 path runs about 10x slower); more rows
(a prompt) dequantize a block of output rows at a time into a scratch buffer and multiply at the input's dtype,
where the product is compute-bound and the dequantization's pass is small beside it.
"""

from __future__ import annotations

import torch
from torch import nn

# Rows of input up to which torch's INT8 kernel beats a float32 product even without the dequantization the
# other path adds (a one-off timing of one 4096x2048 matrix on the 2-core box, 2026-12-06: 0.27 against 0.65 ms
# at 1 row, 1.7 against 2.3 ms at 16, 7.0 against 4.7 ms at 64).
KERNEL_MAX_ROWS = 16
# torch 2.13's CPU kernel reads past a row whose length is not a multiple of 16 (a segmentation fault at 1x40,
# 1x72, 1x100 in a sweep); such a Linear takes the dequantized path at any row count
KERNEL_IN_MULTIPLE = 16
BLOCK_ROWS = 4096  # output rows dequantized at a time on the matmul path: bounded scratch for a large lm_head

_scratch: dict[torch.dtype, torch.Tensor] = {}


def _buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    buf = _scratch.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = _scratch[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W held as int8 codes [out, in] and a bfloat16 scale per output row."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = codes.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Round-to-nearest per output row against max|w| / 127, the scale rounded to bfloat16 first so that
        the codes are rounded against the scale the kernel multiplies by."""
        if weight.device.type != "cpu":
            raise ValueError("INT8 dense weights run on the CPU; this weight is on " + str(weight.device))
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.bfloat16).tiny).bfloat16()
        codes = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(codes.contiguous(), scale, None if bias is None else bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        """The weight as the kernel sees it, float32 (for tests and error measurements)."""
        return self.codes.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= KERNEL_MAX_ROWS and self.in_features % KERNEL_IN_MULTIPLE == 0:
            y = torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.codes, self.scale).to(x.dtype)
        else:
            y = self._blocked(rows)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _blocked(self, rows: torch.Tensor) -> torch.Tensor:
        y = torch.empty(rows.shape[0], self.out_features, dtype=rows.dtype)
        scale = self.scale.to(rows.dtype)[:, None]
        for first in range(0, self.out_features, BLOCK_ROWS):
            last = min(self.out_features, first + BLOCK_ROWS)
            w = _buffer((last - first) * self.in_features, rows.dtype).view(last - first, self.in_features)
            torch.mul(self.codes[first:last], scale[first:last], out=w)
            y[:, first:last] = rows @ w.t()
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
