"""`fate quantize`, `fate verify`, `fate perplexity`: build the tier store, check it, measure its quality.

The work lives in quant/ (store.py builds and checks, provider.py serves experts from it); this module
resolves the model, draws progress, and prints one-line results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.filesize import decimal as human_size

from fate_cli.engine.runtime import dtype_name, pick_device, pick_dtype
from fate_cli.engine.stores import quantize_model_for, store_dir_of
from fate_cli.errors import ModelNotFound, UsageError
from fate_cli.model.values import SHARD_MB
from fate_cli.registry import BUNDLED_ROOT, resolve


def _tier_summary(manifest: dict) -> str:
    parts = []
    for name, t in manifest["tiers"].items():
        what = f"INT{t['bits']} g{t['group_size']}" if t["kind"] == "quantized" else t["dtype"]
        layers = t["layers"]
        span = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
        parts.append(f"{name} {what} ({span})")
    return ", ".join(parts)


def _store_size(manifest: dict) -> int:
    return sum(f["size"] for f in manifest["files"].values())


def quantize_command(
    model: str,
    hot_bits: int,
    cold_bits: int,
    group_size: int,
    cold_group_size: int,
    dense_layers: int,
    hqq_iters: int,
    method: str,
    shard_mb: float,
    device: str | None,
) -> None:
    from quant.hqq_quant import hqq_available
    from quant.store import QuantParams

    resolved = resolve(model)
    dev = pick_device(device)
    if method == "hqq" and not hqq_available():
        raise UsageError(
            "the hqq package is not installed; `pip install hqq` (DISABLE_CUDA=1 on a CPU) or use --method minmax"
        )
    shard_bytes = max(1, int(SHARD_MB.check(shard_mb, "--shard-mb") * (1 << 20)))
    params = QuantParams(
        hot_bits=hot_bits, hot_group_size=group_size, cold_bits=cold_bits, cold_group_size=cold_group_size,
        dense_layers=dense_layers, method=method, iters=hqq_iters, max_shard_bytes=shard_bytes,
        device=dev.type,
    )
    params.validate()
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[dim]quantizing {resolved.name} with {method} on {dev.type} into {store_dir_of(resolved)}[/dim]")
    result = quantize_model_for(resolved, params, err)
    m = result.manifest
    size = human_size(_store_size(m))
    if result.up_to_date:
        out.print(f"{resolved.name}: tier store is up to date ({_tier_summary(m)}; {size}) in {result.store_dir}")
        return
    reused = f", reused {result.reused_shards} finished shards" if result.reused_shards else ""
    out.print(
        f"{resolved.name}: quantized {m['model']['num_experts']} experts x {len(m['model']['moe_layers'])} layers "
        f"into {_tier_summary(m)}; {len(m['files'])} files, {size}, in {result.seconds:.1f} s{reused} -> "
        f"{result.store_dir}"
    )


def verify_command(model: str) -> None:
    from quant.store import check_store

    resolved = resolve(model)
    store_dir = store_dir_of(resolved)
    manifest = check_store(store_dir, resolved.path, deep=True, name=resolved.name)
    rev = manifest["source"].get("revision")
    source = f"revision {rev[:12]}" if rev else f"{len(manifest['source']['files'])} source files unchanged"
    print(
        f"store OK: {store_dir} ({_tier_summary(manifest)}; {len(manifest['files'])} files, "
        f"{human_size(_store_size(manifest))}; {source})"
    )


def perplexity_command(
    model: str | None,
    file: str | None,
    tiers: str,
    window: int,
    max_windows: int | None,
    device: str | None,
    dtype: str | None,
) -> None:
    from cache.tiered import TIER_CHOICES, tiered_provider
    from fate_cli.model.loader import load_model
    from fate_cli.perplexity import perplexity
    from fate_cli.tokenizer import Tokenizer

    choices = [t.strip() for t in tiers.split(",") if t.strip()]
    for c in choices:
        if c not in TIER_CHOICES:
            raise UsageError(f"unknown --tiers value '{c}'; use one or more of {', '.join(TIER_CHOICES)}")
    resolved = resolve(model)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    torch.set_flush_denormal(True)  # trained weights make denormals, slow on CPUs
    path = Path(file) if file else BUNDLED_ROOT / "tiny" / "heldout.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelNotFound(f"cannot read text file {path} ({err}); give a readable UTF-8 file with --file") from None
    ids = Tokenizer(resolved.path).encode(text, add_special_tokens=False)
    if len(ids) < 2:
        raise UsageError(f"{path} holds fewer than two tokens; perplexity needs more text")
    if any(c != "bf16" for c in choices):  # refuse a missing, damaged or stale store before any work
        from quant.store import check_store

        check_store(store_dir_of(resolved), resolved.path, deep=False, name=resolved.name)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    rows = []
    for choice in choices:
        provider = None
        if choice != "bf16":
            provider = tiered_provider(store_dir_of(resolved), resolved.path, choice, dev, dt, name=resolved.name)
        loaded = load_model(resolved.path, dev, dt, provider=provider)
        experts = loaded.model.layers[loaded.args.moe_layer_ids[0]].mlp.provider
        what = experts.describe() if choice != "bf16" else f"experts: {dtype_name(dt)} (checkpoint weights)"
        err.print(f"[dim]{choice}: {what}[/dim]")
        result = perplexity(loaded.model, ids, window=window, max_windows=max_windows)
        rows.append((choice, what, result))
        del loaded, experts
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r.perplexity for c, _, r in rows if c == "bf16"), None)
    name = path.name if file else "bundled held-out text"
    print(f"| tiers | perplexity | vs bf16 | tokens | experts |  <!-- {resolved.name}, {name}, window {window}, "
          f"{dev.type} {dtype_name(dt)} -->")
    print("| --- | ---: | ---: | ---: | --- |")
    for choice, what, r in rows:
        rel = f"{(r.perplexity / base - 1) * 100:+.2f}%" if base else "-"
        print(f"| {choice} | {r.perplexity:.4f} | {rel} | {r.tokens} | {what.removeprefix('experts: ')} |")
    sys.stdout.flush()
