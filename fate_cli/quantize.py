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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fate_cli.engine.runtime import dtype_name, pick_device, pick_dtype
from fate_cli.engine.stores import quantize_model_for, store_dir_of
from fate_cli.errors import ModelNotFound, UsageError
from fate_cli.model.values import SHARD_MB
from fate_cli.model_info import store_size as _store_size
from fate_cli.model_info import tier_summary as _tier_summary
from fate_cli.registry import BUNDLED_ROOT, resolve


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
    result = quantize_model_for(resolved, params, err, announce=f"[dim]quantizing {resolved.name} with {method} on "
                                f"{dev.type} into {store_dir_of(resolved)}[/dim]")
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
    from fate_cli.perplexity import window_starts

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    all_windows = len(window_starts(len(ids), window))
    scored = len(window_starts(len(ids), window, max_windows, spread=True))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
               TimeElapsedColumn(), TimeRemainingColumn())
    rows = []
    for choice in choices:
        provider = None
        if choice != "bf16":
            provider = tiered_provider(store_dir_of(resolved), resolved.path, choice, dev, dt, name=resolved.name)
        loaded = load_model(resolved.path, dev, dt, provider=provider)
        experts = loaded.model.layers[loaded.args.moe_layer_ids[0]].mlp.provider
        # "bf16" asks for the checkpoint's own experts; they run at the run's dtype, which the label says
        label = choice if choice != "bf16" else f"checkpoint ({short_dtype(dt)})"
        what = experts.describe() if choice != "bf16" else f"experts: {dtype_name(dt)} (checkpoint weights)"
        err.print(f"[dim]{label}: {what}[/dim]")
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task(label, total=scored)
            result = perplexity(loaded.model, ids, window=window, max_windows=max_windows, spread=True,
                                progress=lambda done, _total, task=task: bar.update(task, completed=done))
        rows.append((label, what, result))
        del loaded, experts
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r.perplexity for c, _, r in rows if c.startswith("checkpoint")), None)
    name = path.name if file else "bundled held-out text"
    subset = f"all {scored} windows" if scored == all_windows else f"{scored} of {all_windows} windows"
    spread = "" if scored == all_windows else ", spread evenly over the text (--full for all)"
    from fate_cli.model.model import dense_label

    print(f"{resolved.name}, {name}: {subset} of {window} tokens{spread}; {dev.type} {dtype_name(dt)}{dense_label()}")
    print()
    print("| tiers | perplexity | vs checkpoint | tokens | experts |")
    print("| --- | ---: | ---: | ---: | --- |")
    for label, what, r in rows:
        rel = f"{(r.perplexity / base - 1) * 100:+.2f}%" if base else "-"
        print(f"| {label} | {r.perplexity:.4f} | {rel} | {r.tokens} | {what.removeprefix('experts: ')} |")
    sys.stdout.flush()


def short_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, dtype_name(dtype))


def rm_tiers_command(model: str, yes: bool) -> None:
    """`fate rm MODEL --tiers`: delete the model's tier store; the next run that needs it builds it again."""
    import os
    import shutil
    import time

    from fate_cli.model_info import read_store

    resolved = resolve(model)
    store_dir = store_dir_of(resolved)
    if not store_dir.is_dir():
        raise ModelNotFound(f"{resolved.name} has no tier store ({store_dir}); nothing to remove")
    manifest = read_store(store_dir)
    size = human_size(_store_size(manifest)) if manifest else "incomplete"
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"not removing {store_dir} without confirmation (stdin is not a terminal); pass --yes")
        import typer

        if not typer.confirm(f"Delete the tier store of {resolved.name} ({size}) in {store_dir}?", default=False):
            Console(highlight=False, soft_wrap=True).print("nothing removed")
            return
    # one rename takes the store out of sight, so no half-deleted store is ever opened
    trash = store_dir.with_name(f".trash-{store_dir.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(store_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)
    Console(highlight=False, soft_wrap=True).print(f"removed the tier store of {resolved.name} ({size}): {store_dir}")
