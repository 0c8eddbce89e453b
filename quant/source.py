"""The source checkpoint as `fate quantize` reads it: tensors by name with plain reads, and file hashes.

Why not fate_cli.model.loader.Checkpoint: safetensors' safe_open memory-maps each file, and the pages of
every tensor read stay mapped (and counted in the process's resident set) until the handle closes.
Quantization reads every expert once, so through safe_open the resident set would grow to the size
of the checkpoint. Here each tensor is read with pread into a fresh buffer that is freed after use,
so peak memory stays near the largest tensor whatever the size of the model.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fate_cli.errors import BadModel, ModelNotFound
from quant.files import UnreadableJSON, read_json_object
from quant.gpt_oss_experts import FusedExperts, part_names
from quant.manifest import SOURCE_NAME, TEXT, ManifestError, check

ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "I16": torch.int16,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ExpertSet:
    """Which tensors of a checkpoint are the routed experts, and their shapes: what a tier store is built from.

    Expert e of MoE layer l is three matrices named <prefix>layers.l.<module>.experts.e.<proj>.weight, gate and up
    [intermediate, hidden] and down [hidden, intermediate]."""

    family: str
    layers: tuple[int, ...]
    num_experts: int
    hidden: int
    intermediate: int
    module: str = "mlp"
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    layout: str = "separate"  # "gpt_oss": fused per layer, read per expert by quant/gpt_oss_experts.py
    prefix: str = "model."  # "model.language_model." where the text model sits inside a VLM checkpoint

    @property
    def bias(self) -> bool:
        """Whether each expert has biases on its three projections (gpt_oss)."""
        return self.layout == "gpt_oss"

    def names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) tensor names of one expert in the checkpoint (or the per-expert names a reader
        derives from a fused layout: quant/gpt_oss_experts.py, fused_expert_slices)."""
        if self.layout == "gpt_oss":
            return part_names(f"{self.prefix}layers.{layer}.{self.module}.experts", expert)[:3]  # type: ignore[return-value]
        base = f"{self.prefix}layers.{layer}.{self.module}.experts.{expert}"
        return tuple(f"{base}.{name}.weight" for name in self.proj_names)  # type: ignore[return-value]

    def bias_names(self, layer: int, expert: int) -> tuple[str, str, str] | None:
        """(gate, up, down) bias names of one expert, where the family's experts have biases."""
        if not self.bias:
            return None
        return part_names(f"{self.prefix}layers.{layer}.{self.module}.experts", expert)[3:]  # type: ignore[return-value]

    @property
    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(gate, up, down) shapes."""
        h, i = self.hidden, self.intermediate
        return (i, h), (i, h), (h, i)

    @property
    def bias_shapes(self) -> tuple[tuple[int], tuple[int], tuple[int]]:
        """(gate, up, down) bias shapes, where bias_names gives names."""
        return (self.intermediate,), (self.intermediate,), (self.hidden,)
HASH_CHUNK = 8 << 20


FUSED_EXPERTS = re.compile(r"^(?P<experts>.+\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def fused_expert_slices(name: str, shape: tuple[int, ...]) -> list[tuple[str, int, int, int]]:
    """The per-expert tensors a fused 3-D expert tensor holds, as (per-expert name, expert, first row, end row).

    Checkpoints store experts either as separate tensors (`...experts.E.gate_proj.weight`, up_proj, down_proj)
    or fused: `...experts.gate_up_proj` [experts, 2 * width, hidden] (gate rows, then up rows) and
    `...experts.down_proj` [experts, hidden, width]. Every reader names experts the separate way; a fused
    tensor's expert slices are contiguous rows, so they are read in place under those names.
    """
    m = FUSED_EXPERTS.match(name)
    if not m or len(shape) != 3:
        return []
    base, experts, rows = m["experts"], shape[0], shape[1]
    if m["kind"] == "down_proj":
        return [(f"{base}.{e}.down_proj.weight", e, 0, rows) for e in range(experts)]
    if rows % 2:
        return []
    half = rows // 2
    return [
        item
        for e in range(experts)
        for item in ((f"{base}.{e}.gate_proj.weight", e, 0, half), (f"{base}.{e}.up_proj.weight", e, half, rows))
    ]


def weight_files(model_dir: Path) -> list[str]:
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = read_json_object(index)["weight_map"]
        except (UnreadableJSON, KeyError):
            raise BadModel(f"{index} is malformed (no weight_map); re-download the model") from None
        try:  # tensor name -> shard file inside the model folder
            check(weight_map, {TEXT: SOURCE_NAME}, "weight_map")
        except ManifestError as err:
            raise BadModel(f"{index} is malformed ({err}); re-download the model") from None
        return sorted(set(weight_map.values()))
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ModelNotFound(f"{model_dir} has no model.safetensors or {INDEX}; pull the model again with `fate pull`")


def source_files(model_dir: Path) -> list[str]:
    """The files a tier store depends on: config, weight index (if any) and weights."""
    names = ["config.json", *weight_files(model_dir)]
    if (model_dir / INDEX).is_file():
        names.insert(1, INDEX)
    return names


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if on_bytes:
                on_bytes(n)
    return h.hexdigest()


def file_record(path: Path, on_bytes: Callable[[int], None] | None = None) -> dict:
    st = path.stat()
    return {"sha256": sha256_file(path, on_bytes), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class SourceReader:
    """Tensor names, dtypes and shapes from the safetensors headers; reads by pread, no memory map."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        self.entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int, int]] = {}
        for name in weight_files(model_dir):
            path = model_dir / name
            if not path.is_file():
                raise ModelNotFound(f"checkpoint shard {path} is missing; run `fate pull` again to fetch it")
            try:
                with open(path, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    if n > 100 << 20:
                        raise ValueError("header too large")
                    header = json.loads(f.read(n))
                start = 8 + n
                for key, info in header.items():
                    if key == "__metadata__":
                        continue
                    begin, end = info["data_offsets"]
                    dtype = ST_DTYPES[info["dtype"]]
                    shape = tuple(info["shape"])
                    self.entries[key] = (name, dtype, shape, start + begin, end - begin)
                    row = dtype.itemsize * (shape[2] if len(shape) == 3 else 0)
                    for part, e, first, stop in fused_expert_slices(key, shape):
                        offset = start + begin + (e * shape[1] + first) * row
                        rows = stop - first  # a separate tensor of the same name wins (setdefault, then set)
                        self.entries.setdefault(part, (name, dtype, (rows, shape[2]), offset, rows * row))
            except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
                raise BadModel(f"{path} is corrupt or truncated ({err}); delete it and run `fate pull` again") from None

        self.fused = FusedExperts(lambda n: self.entries[n][2] if n in self.entries else None, self._expert)

    def __contains__(self, name: str) -> bool:
        return name in self.entries or self.fused.shape(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2] if name in self.entries else self.fused.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][1] if name in self.entries else self.fused.dtype(name, self.dtype)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.entries and self.fused.shape(name) is not None:
            return self.fused.get(name)
        return self._read(name, *self.entries[name])

    def _expert(self, name: str, expert: int) -> torch.Tensor:
        """Expert `expert`'s slice of a fused tensor [E, ...]: its bytes alone."""
        file, dtype, shape, offset, nbytes = self.entries[name]
        each = nbytes // shape[0]
        return self._read(name, file, dtype, shape[1:], offset + expert * each, each)

    def _read(self, name: str, file: str, dtype: torch.dtype, shape: tuple[int, ...], offset: int,
              nbytes: int) -> torch.Tensor:
        path = self.dir / file
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(offset)
                view = memoryview(buf.numpy())
                got = 0
                while got < nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        raise OSError("unexpected end of file")
                    got += n
        except OSError as err:
            raise BadModel(
                f"{path}: cannot read tensor {name} ({err}); the file is damaged, run `fate pull` again"
            ) from None
        return buf.view(dtype).reshape(shape)
