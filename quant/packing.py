"""Our packed format for one quantized weight matrix, and its plain-torch reference dequantization.

A weight W [out, in] (a linear layer's, y = x @ W.T) is quantized per row in groups of `group_size`
consecutive input columns, asymmetric: W[r, c] ~ (q[r, c] - zero[r, g]) * scale[r, g], g = c // group_size.
The last group of a row may be shorter when in % group_size != 0 (tiny test models only; real experts
divide evenly). Codes q are `bits`-bit unsigned integers.

Packing, chosen for a fused GPU kernel that walks a row along the input dimension:
- codes: int32 [out, ceil(in / cpw)], cpw = 32 // bits codes per word (16 for INT2, 10 for INT3, 8 for
  INT4, 4 for INT8); code c of a row sits in word c // cpw at bits (c % cpw) * bits, least significant
  first; unused high bits and the padding codes of a row's last word are zero.
- scale, zero: float16 [out, ceil(in / group_size)].
A kernel loads a row's words once and expands them with shifts; with group_size a multiple of cpw (true
for every supported bits/group pair except INT3) a group is a whole number of words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def codes_per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; use one of {SUPPORTED_BITS}")
    return 32 // bits


def num_words(in_features: int, bits: int) -> int:
    return -(-in_features // codes_per_word(bits))


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


@dataclass
class PackedMatrix:
    bits: int
    group_size: int
    shape: tuple[int, int]  # (out, in) of the original weight
    codes: torch.Tensor  # int32 [out, num_words]
    scale: torch.Tensor  # float16 [out, num_groups]
    zero: torch.Tensor  # float16 [out, num_groups]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedMatrix:
        """The same matrix with fn applied to its codes, scale and zero (clone, cpu, ...)."""
        return PackedMatrix(self.bits, self.group_size, self.shape, fn(self.codes), fn(self.scale), fn(self.zero))

    def rows(self, start: int, stop: int) -> PackedMatrix:
        """Rows start:stop of W (views: the packed tensors are row-major)."""
        return PackedMatrix(self.bits, self.group_size, (stop - start, self.shape[1]), self.codes[start:stop],
                            self.scale[start:stop], self.zero[start:stop])


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integer codes [out, in] (any integer dtype, values < 2**bits) -> int32 words [out, words]."""
    cpw = codes_per_word(bits)
    out, cols = q.shape
    words = num_words(cols, bits)
    padded = torch.zeros(out, words * cpw, dtype=torch.int64, device=q.device)
    padded[:, :cols] = q.to(torch.int64)
    shifts = torch.arange(cpw, dtype=torch.int64, device=q.device) * bits
    packed = (padded.view(out, words, cpw) << shifts).sum(dim=-1)  # disjoint bit fields: sum == or
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as two's complement int32
    return packed.to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int32 words [out, words] -> codes [out, in_features] as uint8."""
    cpw = codes_per_word(bits)
    shifts = torch.arange(cpw, dtype=torch.int32, device=words.device) * bits
    # arithmetic shift of a negative word drags sign bits down, but the mask drops them again
    q = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(words.shape[0], -1)[:, :in_features].to(torch.uint8)


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Per-group values [out, groups] -> per-column [out, in_features]."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize(m: PackedMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: W = (q - zero) * scale, computed in float32, then cast to `dtype`."""
    cols = m.shape[1]
    q = unpack_codes(m.codes, m.bits, cols).float()
    zero = expand_groups(m.zero.float(), m.group_size, cols)
    scale = expand_groups(m.scale.float(), m.group_size, cols)
    return ((q - zero) * scale).to(dtype)
