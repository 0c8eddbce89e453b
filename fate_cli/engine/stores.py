"""A model's tier store: where it lives, opening it, and building it with progress on stderr."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fate_cli.errors import ModelNotFound
from fate_cli.model.loader import load_args
from fate_cli.registry import BUNDLED_ROOT, ResolvedModel, fate_home, models_dir, pull_record
from quant.store import TIERS_DIRNAME, BuildResult, QuantParams, TierStore, build_store
from quant.store import Progress as ProgressFn


def default_store_dir(model_path: Path, name: str) -> Path:
    """Where the store of the model in `model_path` (asked for as `name`) lives: inside a pulled model's folder,
    else under $FATE_HOME/tiers."""
    path = model_path.resolve()
    if path.is_relative_to(models_dir().resolve()):
        return model_path / TIERS_DIRNAME
    if path.is_relative_to(BUNDLED_ROOT.resolve()):
        return fate_home() / "tiers" / path.name
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    return fate_home() / "tiers" / f"{path.name}-{digest}"


def store_dir_of(resolved: ResolvedModel) -> Path:
    return default_store_dir(resolved.path, resolved.name)


def quantize_model(model_dir: Path, store_dir: Path, params: QuantParams | None = None,
                   progress: ProgressFn | None = None) -> BuildResult:
    """Build (or finish, or confirm) the tier store of the checkpoint in `model_dir` at `store_dir`."""
    record = pull_record(model_dir)
    origin = {"repo": record.get("repo"), "revision": record.get("revision")}
    return build_store(model_dir, store_dir, load_args(model_dir).experts, params, progress, origin)


def quantize_model_for(resolved: ResolvedModel, params: QuantParams, console: Console | None = None,
                       announce: str | None = None) -> BuildResult:
    """Build the store of a resolved model with a rich progress display on stderr (`fate quantize`, `fate pull`,
    and a run whose budget needs a store that does not exist yet); `announce` is printed once quantizing starts
    (never for a store that is up to date)."""
    err = console or Console(stderr=True, highlight=False, soft_wrap=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        tasks: dict[str, int] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = "hashing the checkpoint (MB)" if phase == "hash" else "quantizing experts"
                if phase != "hash" and announce:
                    progress.console.print(announce)
                tasks[phase] = progress.add_task(label, total=None)
            scale = 1 << 20 if phase == "hash" else 1
            progress.update(tasks[phase], completed=done // scale, total=max(total // scale, 1))

        from fate_cli.model.threads import matrix_threads

        args = load_args(resolved.path)
        # a small model's experts are small matrices: spread over threads, each pass waits at barriers (seconds
        # per store on a busy machine instead of a fraction of one)
        with matrix_threads(args.hidden_size * args.moe_intermediate_size, torch.device(params.device)):
            return quantize_model(resolved.path, store_dir_of(resolved), params, progress=report)


def open_store(resolved: ResolvedModel, build: bool) -> TierStore | None:
    """The model's checked tier store; a missing one is built when `build`, else None."""
    store_dir = store_dir_of(resolved)
    try:
        return TierStore.open(store_dir, resolved.path, name=resolved.name)
    except ModelNotFound:
        if not build:
            return None
    quantize_model_for(resolved, QuantParams())
    return TierStore.open(store_dir, resolved.path, name=resolved.name)
