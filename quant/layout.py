"""One expert of one tier as one contiguous byte buffer: the segments, their offsets, and views into it.

Every expert of a model and tier has the same layout, so the manifest records it once. Segments, in
order, each starting on an ALIGN-byte boundary:

  quantized tier (bits b, group g; H = hidden, I = expert width):
    gate_up.codes int32   [2I, words(H)]   rows 0..I-1 are gate_proj, rows I..2I-1 up_proj
    gate_up.scale float16 [2I, groups(H)]
    gate_up.zero  float16 [2I, groups(H)]
    down.codes    int32   [H, words(I)]
    down.scale    float16 [H, groups(I)]
    down.zero     float16 [H, groups(I)]
  dense tier (16-bit copy, for the shallow layers a plan keeps unquantized):
    gate_up       dtype   [2I, H]
    down          dtype   [H, I]
  and, last, where the family's experts have biases (gpt_oss), in either kind, at 16 bits (`bias` dtype):
    gate_up.bias  bias    [2I]             gate's bias, then up's
    down.bias     bias    [H]

Gate and up share one matrix so a kernel computes both with one launch; the buffer's total size is
rounded up to ALIGN so that experts laid end to end in a file all start aligned. Biases travel inside the
expert's buffer (a few kilobytes beside megabytes of weights), so every tier, slot and copy that holds an
expert holds its biases, and a kernel finds them at a fixed offset from the slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.packing import PackedMatrix, num_groups, num_words

ALIGN = 128

DTYPES = {"int32": torch.int32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BIAS_DTYPES = ("bfloat16", "float16")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class Segment:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}


@dataclass(frozen=True)
class ExpertLayout:
    kind: str  # "quantized" | "dense"
    hidden: int
    intermediate: int
    bits: int | None
    group_size: int | None
    dtype: str | None  # dense tiers only
    segments: tuple[Segment, ...]
    nbytes: int
    bias: str | None = None  # the biases' dtype, where the experts have biases (segments gate_up.bias, down.bias)

    @classmethod
    def _build(cls, kind: str, hidden: int, inter: int, bits, group, dtype, specs, bias: str | None) -> ExpertLayout:
        if bias is not None:
            if bias not in BIAS_DTYPES:
                raise ValueError(f"expert biases are kept at 16 bits ({' or '.join(BIAS_DTYPES)}), not {bias}")
            specs = [*specs, ("gate_up.bias", bias, (2 * inter,)), ("down.bias", bias, (hidden,))]
        segments, offset = [], 0
        for name, dt, shape in specs:
            seg = Segment(name, dt, tuple(shape), offset)
            segments.append(seg)
            offset = _round_up(offset + seg.nbytes)
        return cls(kind, hidden, inter, bits, group, dtype, tuple(segments), offset, bias)

    @classmethod
    def quantized(cls, hidden: int, inter: int, bits: int, group_size: int, bias: str | None = None) -> ExpertLayout:
        specs = []
        for prefix, rows, cols in (("gate_up", 2 * inter, hidden), ("down", hidden, inter)):
            specs += [
                (f"{prefix}.codes", "int32", (rows, num_words(cols, bits))),
                (f"{prefix}.scale", "float16", (rows, num_groups(cols, group_size))),
                (f"{prefix}.zero", "float16", (rows, num_groups(cols, group_size))),
            ]
        return cls._build("quantized", hidden, inter, bits, group_size, None, specs, bias)

    @classmethod
    def dense(cls, hidden: int, inter: int, dtype: str, bias: str | None = None) -> ExpertLayout:
        specs = [("gate_up", dtype, (2 * inter, hidden)), ("down", dtype, (hidden, inter))]
        return cls._build("dense", hidden, inter, None, None, dtype, specs, bias)

    def to_json(self) -> dict:
        d = {
            "kind": self.kind,
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "bits": self.bits,
            "group_size": self.group_size,
            "dtype": self.dtype,
            "align": ALIGN,
            "nbytes": self.nbytes,
            "segments": [s.to_json() for s in self.segments],
        }
        if self.bias is not None:  # absent for experts without biases: their stores read as before
            d["bias"] = self.bias
        return d

    @classmethod
    def from_json(cls, d: dict) -> ExpertLayout:
        bias = d.get("bias")
        if bias is not None and bias not in BIAS_DTYPES:
            raise ValueError(f"the recorded expert biases are {bias!r}, not a 16-bit dtype fate writes")
        if d["kind"] == "quantized":
            layout = cls.quantized(d["hidden"], d["intermediate"], d["bits"], d["group_size"], bias)
        else:
            layout = cls.dense(d["hidden"], d["intermediate"], d["dtype"], bias)
        if layout.to_json() != d:  # a manifest from another layout version: refuse rather than misread bytes
            raise ValueError("the recorded expert layout differs from the one this version of fate writes")
        return layout

    def segment(self, name: str) -> Segment:
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(name)

    def assemble(self, parts: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
        """Segments by name (each of its recorded dtype and shape) -> one zero-padded uint8 buffer."""
        buf = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        for name, view in self.views(buf).items():
            view.copy_(parts[name])
        return buf

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """A uint8 buffer of nbytes (any device) -> typed views of its segments (no copy)."""
        if buf.dtype != torch.uint8 or buf.numel() != self.nbytes:
            raise ValueError(f"expected a uint8 buffer of {self.nbytes} bytes, got {buf.dtype} x {buf.numel()}")
        return {
            s.name: buf[s.offset : s.offset + s.nbytes].view(DTYPES[s.dtype]).view(s.shape) for s in self.segments
        }

    def biases(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An expert's (gate|up [2I], down [H]) bias views, or None where the layout has no biases."""
        if self.bias is None:
            return None
        v = self.views(buf)
        return v["gate_up.bias"], v["down.bias"]

    def packed(self, buf: torch.Tensor) -> tuple[PackedMatrix, PackedMatrix]:
        """A quantized expert's buffer -> (gate_up, down) PackedMatrix views."""
        v = self.views(buf)
        shapes = {"gate_up": (2 * self.intermediate, self.hidden), "down": (self.hidden, self.intermediate)}
        gate_up, down = (
            PackedMatrix(self.bits, self.group_size, shapes[p], v[f"{p}.codes"], v[f"{p}.scale"], v[f"{p}.zero"])
            for p in ("gate_up", "down")
        )
        return gate_up, down
