"""gpt-oss's fused expert tensors read as per-expert matrices, from the plain or the MXFP4 layout.

A layer's experts are stored together:
- plain: `<base>.gate_up_proj` [E, H, 2I] (x @ W: gate and up interleaved along the last axis, gate first),
  `<base>.gate_up_proj_bias` [E, 2I], `<base>.down_proj` [E, I, H], `<base>.down_proj_bias` [E, H];
- MXFP4 (as published): `<base>.gate_up_proj_blocks` [E, 2I, H/32, 16] uint8 (two e2m1 codes a byte, the low
  nibble first), `<base>.gate_up_proj_scales` [E, 2I, H/32] uint8 (e8m0: 2^(s - 127) per 32 values), and
  `<base>.down_proj_blocks` / `_scales` [E, H, I/32, ...]: rows already in nn.Linear's [out, in] order.
Readers answer to per-expert names `<base>.<e>.<part>`, part one of PARTS, in fate's orientation: gate and up
[I, H], down [H, I], biases [I], [I], [H]. Expert e's slice of a fused tensor is contiguous, so a reader
reads only it (and the last slice read is kept, so gate and up share one read).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

PARTS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
PART_NAME = re.compile(r"^(?P<base>.+\.experts)\.(?P<expert>\d+)\.(?P<part>" + "|".join(PARTS) + r")$")
# e2m1 codes 0..15: sign bit 3, then exponent and mantissa
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32


def part_names(base: str, expert: int) -> tuple[str, ...]:
    """The per-expert names of expert `expert` of the fused experts at `base` (`model.layers.L.mlp.experts`)."""
    return tuple(f"{base}.{expert}.{part}" for part in PARTS)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32]: code * 2^(scale - 127), exact in
    bfloat16 (one mantissa bit, float32's exponent range)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    blocks = blocks.to(torch.uint8)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()  # low nibble first
    values = torch.ldexp(lut[codes], scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).to(dtype)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] (K a multiple of 32) -> (blocks [..., K/32, 16], scales [..., K/32]): each block's scale is the
    smallest power of two that brings its largest magnitude to at most 6, each value the nearest e2m1 code."""
    *lead, k = w.shape
    groups = w.float().reshape(*lead, k // MXFP4_BLOCK, MXFP4_BLOCK)
    peak = groups.abs().amax(dim=-1).clamp(min=2.0**-126)
    exp = torch.ceil(torch.log2(peak / 6.0)).clamp(-127, 127)
    scaled = groups / torch.ldexp(torch.ones_like(exp), exp.int())[..., None]
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(dim=-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


class FusedExperts:
    """Per-expert parts over a reader's fused tensors: `shape_of(name)` (None if absent) and
    `read(name, expert)` (the expert's slice of a fused tensor)."""

    def __init__(self, shape_of: Callable[[str], tuple[int, ...] | None],
                 read: Callable[[str, int], torch.Tensor]):
        self.shape_of, self.read = shape_of, read
        self._last: tuple[str, int, torch.Tensor] | None = None

    def _slice(self, name: str, expert: int) -> torch.Tensor:
        if self._last is None or self._last[:2] != (name, expert):
            self._last = (name, expert, self.read(name, expert))
        return self._last[2]

    def _mxfp4(self, base: str, proj: str) -> bool:
        return self.shape_of(f"{base}.{proj}") is None and self.shape_of(f"{base}.{proj}_blocks") is not None

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The part's shape (None if `name` is no part of fused experts this reader holds)."""
        m = PART_NAME.match(name)
        if not m:
            return None
        base, expert, part = m["base"], int(m["expert"]), m["part"]
        proj = "down_proj" if part.startswith("down") else "gate_up_proj"
        if part.endswith("_bias"):
            s = self.shape_of(f"{base}.{proj}_bias")
            if s is None or len(s) != 2 or expert >= s[0]:
                return None
            return (s[1] // 2,) if proj == "gate_up_proj" else (s[1],)
        if self._mxfp4(base, proj):
            s = self.shape_of(f"{base}.{proj}_blocks")
            if len(s) != 4 or expert >= s[0]:
                return None
            rows, cols = s[1], s[2] * s[3] * 2
        else:
            s = self.shape_of(f"{base}.{proj}")
            if s is None or len(s) != 3 or expert >= s[0]:
                return None
            rows, cols = s[2], s[1]  # stored [in, out]: the part is its transpose
        return (rows // 2, cols) if proj == "gate_up_proj" else (rows, cols)

    def dtype(self, name: str, stored: Callable[[str], torch.dtype]) -> torch.dtype:
        m = PART_NAME.match(name)
        proj = "down_proj" if m["part"].startswith("down") else "gate_up_proj"
        if m["part"].endswith("_bias"):
            return stored(f"{m['base']}.{proj}_bias")
        return torch.bfloat16 if self._mxfp4(m["base"], proj) else stored(f"{m['base']}.{proj}")

    def get(self, name: str) -> torch.Tensor:
        """One expert's part (a fresh tensor), in fate's orientation."""
        m = PART_NAME.match(name)
        base, expert, part = m["base"], int(m["expert"]), m["part"]
        proj = "down_proj" if part.startswith("down") else "gate_up_proj"
        if part.endswith("_bias"):
            b = self._slice(f"{base}.{proj}_bias", expert)
            return b.clone() if proj == "down_proj" else b[(0 if part == "gate_bias" else 1)::2].contiguous()
        if self._mxfp4(base, proj):
            key = f"{base}.{proj}_blocks"
            if self._last is None or self._last[:2] != (key, expert):
                w = dequantize_mxfp4(self.read(key, expert), self.read(f"{base}.{proj}_scales", expert))
                self._last = (key, expert, w)  # [out, in]
            w = self._last[2]
        else:
            w = self._slice(f"{base}.{proj}", expert).t()  # [in, out] -> [out, in]
        if proj == "down_proj":
            return w.contiguous()
        return w[(0 if part == "gate" else 1)::2].contiguous()
