"""What a model is, read without loading it: its config, its checkpoint's tensor shapes, its tier store.

`fate show` prints it all; `fate list` a row of it per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fate_cli.errors import FateError
from fate_cli.model.args import ModelArgs
from fate_cli.model.loader import Checkpoint, load_args
from quant.files import UnreadableJSON, read_json_object


@dataclass
class ModelFacts:
    args: ModelArgs
    parameters: int  # every tensor of the checkpoint
    active_parameters: int  # one token's share: everything but the experts it does not route to
    dtype: str  # the checkpoint's own (config.json's torch_dtype)
    store_dir: Path
    store: dict | None  # the tier store's manifest, None when none is built


def expert_parameters(args: ModelArgs) -> int:
    """One routed expert's weights: gate, up and down projections."""
    return 3 * args.hidden_size * args.moe_intermediate_size


def parameter_counts(args: ModelArgs, checkpoint: Checkpoint) -> tuple[int, int]:
    """(all parameters, those one token uses) from the checkpoint's tensor shapes."""
    total = sum(math.prod(checkpoint.shape(name)) for name in checkpoint.names())
    moe_layers = len(args.moe_layer_ids)
    unused = moe_layers * (args.num_experts - args.top_k) * expert_parameters(args)
    return total, total - unused


def read_store(store_dir: Path) -> dict | None:
    from quant.store import MANIFEST

    try:
        manifest = read_json_object(store_dir / MANIFEST)
    except UnreadableJSON:
        return None
    return manifest if manifest.get("complete", True) else None


def tier_summary(manifest: dict) -> str:
    """`hot INT4 g64 (layers 1-7), cold INT2 g32 (layers 0-7), ...`"""
    parts = []
    for name, t in manifest["tiers"].items():
        what = f"INT{t['bits']} g{t['group_size']}" if t["kind"] == "quantized" else t["dtype"]
        layers = t["layers"]
        span = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
        parts.append(f"{name} {what} ({span})")
    return ", ".join(parts)


def tier_bits(manifest: dict) -> str:
    """The quantized tiers' widths, hot first: `INT4/INT2`."""
    return "/".join(f"INT{t['bits']}" for t in manifest["tiers"].values() if t["kind"] == "quantized")


def store_size(manifest: dict) -> int:
    return sum(f["size"] for f in manifest["files"].values())


def model_facts(path: Path, name: str) -> ModelFacts:
    from fate_cli.engine.stores import default_store_dir

    args = load_args(path)
    total, active = parameter_counts(args, Checkpoint(path))
    try:
        dtype = str(read_json_object(path / "config.json").get("torch_dtype") or "?")
    except UnreadableJSON:
        dtype = "?"
    store_dir = default_store_dir(path, name)
    return ModelFacts(args, total, active, dtype, store_dir, read_store(store_dir))


def try_model_facts(path: Path, name: str) -> ModelFacts | None:
    """model_facts, or None for a folder that does not hold a readable model (an incomplete pull)."""
    try:
        return model_facts(path, name)
    except FateError:
        return None


def human_count(n: int) -> str:
    """9216000 -> 9.2M, 46702792704 -> 46.7B"""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
