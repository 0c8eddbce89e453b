"""Tuned tiles of the batch-1 GEMV (quant/triton_kernels.py `gemv`), kept as data: one JSON file per GPU.

quant/configs/gemv_tiles_<GPU>.json maps "N=..,K=..,bits=..,group=.." to a tile {"BLOCK_N", "BLOCK_K",
"SPLIT_K", "num_warps"[, "DIRECT"]}; <GPU> is torch.cuda.get_device_name() with every run of characters other
than letters and digits replaced by "_" ("NVIDIA H100 80GB HBM3" -> NVIDIA_H100_80GB_HBM3). The files are
written by benchmarks/sweep_gemv.py, which times tiles in CUDA graphs on cold weights; a shape without an
entry, or a GPU without a file, is tuned by Triton's autotuner on first use (warm, eager timings whose picks
move between runs). A GPU without a file gets a one-line note on stderr, once per process.

Reading this module needs neither Triton nor a GPU.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from quant.files import read_json_object, write_text_atomic

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TILE_KEYS = ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "DIRECT")

Shape = tuple[int, int, int, int]  # (N, K, bits, group)

_BY_GPU: dict[str, dict[Shape, dict]] = {}  # device name -> its tiles, read once
_NAME_OF_INDEX: dict[int, str] = {}


def file_name(device_name: str) -> str:
    """The tiles file of a GPU named `device_name` (torch.cuda.get_device_name)."""
    return f"gemv_tiles_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}.json"


def key(n: int, k: int, bits: int, group: int) -> str:
    return f"N={n},K={k},bits={bits},group={group}"


def parse_key(text: str) -> Shape:
    """"N=28672,K=4096,bits=4,group=64" -> (28672, 4096, 4, 64)."""
    try:
        fields = dict(part.split("=", 1) for part in text.split(","))
        return int(fields["N"]), int(fields["K"]), int(fields["bits"]), int(fields["group"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{text!r} is not a GEMV tile key like {key(1, 1, 4, 64)!r}") from e


def read(path: Path) -> dict[Shape, dict]:
    """The tiles in a file written by `write`."""
    raw = read_json_object(path)
    tiles = {}
    for text, cfg in raw.items():
        unknown = set(cfg) - set(TILE_KEYS)
        if unknown:
            raise ValueError(f"{path}: {text}: unknown tile fields {sorted(unknown)} (known: {', '.join(TILE_KEYS)})")
        tiles[parse_key(text)] = dict(cfg)
    return tiles


def write(path: Path, tiles: dict[Shape, dict]) -> None:
    """Write `tiles` to `path` through a temporary file in the same folder, renamed over it."""
    text = "{\n" + ",\n".join(f'  "{key(*shape)}": {json.dumps(tiles[shape])}' for shape in sorted(tiles)) + "\n}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def for_gpu(device_name: str, config_dir: Path = CONFIG_DIR) -> dict[Shape, dict]:
    """The tiles tuned for `device_name`, read once; {} and a note on stderr when none were tuned for it."""
    if device_name not in _BY_GPU:
        path = config_dir / file_name(device_name)
        if path.is_file():
            _BY_GPU[device_name] = read(path)
        else:
            print(f"note: no tuned GEMV tiles for this GPU ({device_name}: {path.name} not in {config_dir}); "
                  "Triton's autotuner picks them on first use (benchmarks/sweep_gemv.py tunes this GPU)",
                  file=sys.stderr)
            _BY_GPU[device_name] = {}
    return _BY_GPU[device_name]


def use(device_name: str, tiles: dict[Shape, dict]) -> None:
    """Run this process with `tiles` for `device_name` in place of its file (a benchmark of a sweep's picks)."""
    _BY_GPU[device_name] = dict(tiles)


def lookup(n: int, k: int, bits: int, group: int, device: torch.device) -> dict:
    """A copy of the tuned tile of the [N, K] matrix at bits/group on `device`; {} where none is tuned (or off CUDA)."""
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NAME_OF_INDEX:
        _NAME_OF_INDEX[index] = torch.cuda.get_device_name(index)
    return dict(for_gpu(_NAME_OF_INDEX[index]).get((n, k, bits, group), {}))
