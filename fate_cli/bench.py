"""`fate bench`: memory-budget sweeps, policies side by side, llama-bench style (ppP / tgN tests).

For each target (a model, `synthetic:<shape>`, `replay:<shape>`), each budget and each policy: one
warm-up request, then `reps` timed requests, every row on the same prompts (held-out text of the
bundled model, or --prompts FILE), so routing is the same across rows. A budget that cannot run is a
row that says so. Output: a markdown table with ratios against ondemand and resident, CSV or JSON;
--plot draws decode speed and hit rate against budget, one line per policy.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cache.budget import auto_budget, format_size, parse_size
from cache.floor import RoutingLog, floor_of
from cache.policies import POLICIES
from fate_cli.bench_targets import ModelTarget, ReplayTarget, Target
from fate_cli.engine.coactivation import offline_coactivation
from fate_cli.engine.profile import offline_miss_curves
from fate_cli.engine.runtime import (
    device_label,
    dtype_name,
    experts_for,
    hybrid_options,
    open_weights,
    pick_device,
    pick_dtype,
)
from fate_cli.engine.stores import open_store
from fate_cli.errors import FateError, UsageError
from fate_cli.model.values import BUDGET_SHARE, MAX_BUDGETS
from fate_cli.registry import BUNDLED_ROOT, resolve
from quant.files import write_atomic

BENCH_ORDER = ("resident", "fate", "lru", "eap", "fmoe", "klotski", "ondemand", "cpu", "freetoken")
FIELDS = [
    "model", "kind", "size_bytes", "device", "backend", "policy", "vram", "budget_bytes", "batch", "test", "status",
    "tokens_per_s", "stdev", "reps", "hit_rate", "prediction_recall", "decode_prediction_recall", "gb_moved",
    "bytes_moved", "stall_seconds", "peak_device_bytes", "same_tokens_as_resident", "plan", "note",
    "request_tokens_per_s", "minimum_budget_bytes", "decode_predicted", "miss", "cpu_experts", "cpu_seconds",
    "link_wait_seconds", "loads", "min_loads", "min_bytes", "min_tier", "loads_over_min", "bytes_over_min",
    "host_ms_per_token",
]
RESIDENT_NOTE = "ignores the budget: every expert on the device at the hot tier, the ceiling"


# ---- inputs -----------------------------------------------------------------------------------------


def parse_budgets(text: str | None, footprint) -> list[tuple[str, int | None]]:  # noqa: ANN001 - planner.Footprint
    """'8GB', '4GB,8GB', '4GB-16GB+4GB', or shares of the hot-tier expert bytes ('25%,50%') -> (label, bytes).

    A share s means the fixed part (non-expert weights, KV cache, workspace) plus s of all experts at the
    hot tier. None means automatic (free device memory less a margin)."""
    if text is None:
        return [("auto", None)]
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item.endswith("%"):
            share = BUDGET_SHARE.parse(item[:-1], "the --vram share") / 100
            out.append((item, int(footprint.fixed + share * footprint.all_hot)))
            continue
        rng = re.fullmatch(r"(.+?)-(.+?)\+(.+)", item)
        if rng:
            lo, hi, step = (parse_size(g) for g in rng.groups())
            if lo > hi:
                raise UsageError(f"the range '{item}' runs backwards; write it like 4GB-16GB+4GB")
            if (hi - lo) // step + 1 + len(out) > MAX_BUDGETS:  # counted before any budget is built
                raise UsageError(f"the range '{item}' gives {(hi - lo) // step + 1} budgets; at most {MAX_BUDGETS} "
                                 "in all, raise the step")
            value = lo
            while value <= hi:
                out.append((format_size(value).replace(" ", ""), value))
                value += step
            continue
        out.append((item, parse_size(item)))
    if len(out) > MAX_BUDGETS:
        raise UsageError(f"--vram lists {len(out)} budgets; give at most {MAX_BUDGETS}")
    if not out:
        raise UsageError("--vram is empty; give a size like 8GB, a list 4GB,8GB or a range 4GB-16GB+4GB")
    return out


def check_writable(path_text: str, option: str) -> None:
    """An output file's folder exists and can be written, checked before the sweep that fills it."""
    folder = Path(path_text).expanduser().parent
    if not folder.is_dir():
        raise UsageError(f"{option} {path_text}: the folder {folder} does not exist; create it or give another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path_text}: the folder {folder} is not writable; give another path")
    if Path(path_text).is_dir():
        raise UsageError(f"{option} {path_text} is a folder; give a file name")


def parse_policies(text: str | None) -> list[str]:
    if not text:
        return list(BENCH_ORDER)
    names = [p.strip() for p in text.split(",") if p.strip()]
    for name in names:
        if name not in POLICIES:
            raise UsageError(f"unknown policy '{name}'; use any of {', '.join(POLICIES)}, comma-separated")
    return names


def parse_misses(text: str | None) -> list[str]:
    """`--miss auto,link`: where fate's misses go, one row of fate per mode."""
    modes = [m.strip() for m in (text or "auto").split(",") if m.strip()]
    bad = [m for m in modes if m not in ("auto", "cpu", "link")]
    if bad or not modes:
        raise UsageError(f"unknown --miss '{text}'; use auto, cpu or link, or a list like auto,link")
    return list(dict.fromkeys(modes))


def parse_batches(text: str | None) -> list[int]:
    """`--batch 1,4,16`: prompts decoded together, one sweep per size."""
    try:
        sizes = [int(item) for item in (text or "1").split(",") if item.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise UsageError(f"cannot read --batch '{text}'; give sizes like 1 or 1,4,16")
    return list(dict.fromkeys(sizes))


def prompt_set(prompt_len: int, count: int, prompts_file: str | None) -> list[list[int]]:
    """`count` prompts of prompt_len tokens: consecutive windows of the held-out text, or the file's prompts."""
    from fate_cli.tokenizer import Tokenizer

    tok = Tokenizer(BUNDLED_ROOT / "tiny")
    if prompts_file:
        from fate_cli.prompts import read_prompts

        paragraphs = read_prompts(prompts_file)
        out = []
        for i in range(count):
            ids = tok.encode(paragraphs[i % len(paragraphs)], add_special_tokens=False) or [0]
            out.append((ids * (prompt_len // len(ids) + 1))[:prompt_len])
        return out
    ids = tok.encode((BUNDLED_ROOT / "tiny" / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False)
    while len(ids) < prompt_len * count:
        ids = ids + ids
    return [ids[i * prompt_len : (i + 1) * prompt_len] for i in range(count)]


def open_target(name: str | None, device: torch.device, dtype: torch.dtype, transfer_bits: int | None,
                eager: bool = False) -> Target:
    """The model, synthetic model or replay a bench measures; eager: no captured decode step."""
    target = _open_target(name, device, dtype, transfer_bits)
    target.eager = eager
    return target


def _open_target(name: str | None, device: torch.device, dtype: torch.dtype, transfer_bits: int | None) -> Target:
    from fate_cli.engine.replay import is_replay, replay_shape
    from fate_cli.synthetic import is_synthetic

    if is_replay(name):
        hidden, inter = replay_shape(name)
        weights = open_weights(resolve("tiny"), device, torch.float32)
        recorded = weights.model(experts_for(weights, None, None, None))
        return ReplayTarget(name, recorded, hidden, inter, device, dtype, transfer_bits)
    if is_synthetic(name):
        from fate_cli.synthetic import random_weights, synthetic_args, synthetic_store

        args = synthetic_args(name)
        store = synthetic_store(args, name)
        return ModelTarget(name, "synthetic", random_weights(args, device, dtype), store, transfer_bits)
    resolved = resolve(name)
    weights = open_weights(resolved, device, dtype)
    return ModelTarget(resolved.name, "model", weights, open_store(resolved, build=True), transfer_bits,
                       offline_coactivation(resolved.path), offline_miss_curves(resolved.path))


class _NO_FOOTPRINT:  # noqa: N801 - checks the --vram syntax before a model's footprint is known
    fixed = all_hot = 0


def check_target_name(name: str) -> None:
    from fate_cli.engine.replay import is_replay, replay_shape
    from fate_cli.synthetic import is_synthetic, synthetic_args

    if is_replay(name):
        replay_shape(name)
    elif is_synthetic(name):
        synthetic_args(name)
    else:
        resolve(name)


# ---- the sweep -----------------------------------------------------------------------------------------


def measure_row(target: Target, policy: str, label: str, budget: int, prompts: list[list[int]], gen_len: int,
                reps: int, batch: int = 1, miss: str | None = None) -> tuple[list[dict], list[int] | None]:
    """Two rows (ppP, tgN) for one policy at one budget; or two rows that say why it cannot run.

    Each request is `batch` prompts decoded together; its speeds count every prompt's tokens."""
    cuda = target.device.type == "cuda"
    p = len(prompts[0])
    base = {
        "model": target.name, "kind": target.kind, "size_bytes": target.size_bytes,
        "device": device_label(target.device), "backend": target.backend(), "policy": policy, "vram": label,
        "budget_bytes": budget, "batch": batch, "reps": reps, "miss": miss if policy == "fate" else None,
    }
    suffix = "" if batch == 1 else f" b{batch}"
    tests = (f"pp{p}{suffix}", f"tg{gen_len}{suffix}")
    requests = [prompts[i * batch : (i + 1) * batch] for i in range(reps + 1)]
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        session = target.session(policy, budget, miss)
    except FateError as err:
        from cache.planner import minimum_budget

        minimum = minimum_budget(target.footprint)
        return [{**base, "test": t, "status": "does not fit", "note": str(err),
                 "minimum_budget_bytes": minimum if budget < minimum else None} for t in tests], None
    except torch.OutOfMemoryError:  # the row's cache or banks did not fit beside what the device already holds
        if cuda:
            torch.cuda.empty_cache()
        note = f"CUDA ran out of memory setting up {label}; the plan's estimate was too low, try a larger budget"
        return [{**base, "test": t, "status": "out of memory", "note": note} for t in tests], None
    try:
        if session.offload:
            session.offload.routing = RoutingLog()  # for the floor, computed after the timed requests
        session.run(requests[0], gen_len)  # warm-up: kernels compiled, caches filled as after earlier requests
        if session.offload:
            session.offload.reset_stats()
            held = {layer: set(state.slot_of) for layer, state in session.offload.layers.items()}
            session.offload.routing.count_from_here(held)  # the floor starts where the warm-up left the slots
        pp, tg, whole, tokens = [], [], [], None
        for request in requests[1:]:
            timing = session.run(request, gen_len)
            pp.append(timing.prefill_tokens_per_s)
            tg.append(timing.decode_tokens_per_s)
            whole.append(timing.request_tokens_per_s)
            tokens = tokens if tokens is not None else timing.token_ids
        stats = session.offload.sync_stats().as_dict() if session.offload else {}
        peak = torch.cuda.max_memory_allocated() if cuda else None
        plan = session.setup.plan.summary()
        groups = session.offload.last_groups if session.offload else []
        if any(len(g) > 1 for g in groups):  # klotski's micro-batches
            plan += f"; prompts prefilled together in groups of {'+'.join(str(len(g)) for g in groups)}"
        decode = session.decode_mode()
        floor = row_floor(session.offload, stats) if session.offload else {}
    except torch.OutOfMemoryError:
        session.close()
        note = f"CUDA ran out of memory at {label}; the plan's estimate was too low, try a larger budget"
        return [{**base, "test": t, "status": "out of memory", "note": note} for t in tests], None
    session.close()
    moved = stats.get("bytes_moved", {})
    common = {
        **base, "status": "ok", "hit_rate": stats.get("hit_rate", 1.0),
        "prediction_recall": stats.get("prediction_recall"),
        "decode_prediction_recall": stats.get("decode_prediction_recall"),
        "decode_predicted": stats.get("decode_predicted"),
        "bytes_moved": moved, "gb_moved": sum(moved.values()) / 1e9 / max(1, reps),
        "stall_seconds": stats.get("stall_seconds", 0.0) / max(1, reps), "peak_device_bytes": peak, "plan": plan,
        "per_layer": stats.get("per_layer", {}), "decode": decode,
        "request_tokens_per_s": statistics.mean(whole),
        "cpu_experts": stats.get("cpu_experts", 0) / max(1, reps),  # per request, as gb_moved
        "cpu_seconds": stats.get("cpu_seconds", 0.0) / max(1, reps),
        "link_wait_seconds": stats.get("link_wait_seconds", 0.0) / max(1, reps), "cost_model": stats.get("cost_model"),
        "host_ms_per_token": host_ms_per_token(stats, batch),
        **floor, **({"note": RESIDENT_NOTE} if policy == "resident" else {}),
    }
    rows = []
    for test, values in zip(tests, (pp, tg)):
        rows.append({**common, "test": test, "tokens_per_s": statistics.mean(values),
                     "stdev": statistics.stdev(values) if len(values) > 1 else None})  # one value: no spread
    return rows, tokens


def host_ms_per_token(stats: dict, batch: int) -> float | None:
    """The decode step's host part per generated token (the device idles through it), against 1000 / tokens_per_s
    of the tg row; None where no step stopped for the host (every expert resident, or eager decode)."""
    steps = stats.get("decode_host_steps", 0)
    return 1e3 * stats["decode_host_seconds"] / (steps * batch) if steps else None


def row_floor(offload, stats: dict) -> dict:  # noqa: ANN001 - cache.offload.OffloadedExperts
    """Belady's MIN for the row's slots on the routing its timed requests served, and the policy's loads (misses
    and prefetches) and bytes over it; bytes at the smallest tier the policy's transfers may use."""
    tiers = [offload.transfer_tier] if offload.transfer_tier else list(offload.policy.tiers)
    capacities = {layer: state.capacity for layer, state in offload.layers.items()}
    floor = floor_of(offload.routing, capacities, {t: offload.layouts[t].nbytes for t in tiers})
    loads, nbytes = sum(stats.get("loads", {}).values()), sum(stats.get("bytes_moved", {}).values())
    over_loads, over_bytes = floor.over(loads, nbytes)
    return {"loads": loads, "min_loads": floor.loads, "min_bytes": floor.nbytes, "min_tier": floor.tier,
            "loads_over_min": over_loads, "bytes_over_min": over_bytes}


def sweep(targets: Sequence[Callable[[], Target]], budget_text: str | None, policies: list[str],
          prompts: list[list[int]], gen_len: int, reps: int, device: torch.device,
          progress: Callable[[str, int, int], None] | None = None,
          on_rows: Callable[[list[dict]], None] | None = None, batches: Sequence[int] = (1,),
          misses: Sequence[str] = ("auto",)) -> list[dict]:
    """Every target x budget x batch x policy (fate once per --miss mode), resident first."""
    rows: list[dict] = []
    for make in targets:
        target = make()
        budgets = parse_budgets(budget_text, target.footprint)
        runs = [(p, m) for p in sorted(policies, key=lambda p: p != "resident")
                for m in (misses if p == "fate" else (None,))]
        total, done = len(budgets) * len(batches) * len(runs), 0
        for (label, budget), batch in itertools.product(budgets, batches):
            budget = budget if budget is not None else auto_budget(device)
            reference = None
            for policy, miss in runs:  # resident first: the reference
                if progress:
                    progress(f"{target.name} {label} {'' if batch == 1 else f'b{batch} '}{policy_label(policy, miss)}",
                             done, total)
                new, tokens = measure_row(target, policy, label, budget, prompts, gen_len, reps, batch, miss)
                if policy == "resident":
                    reference = tokens
                for row in new:
                    row["same_tokens_as_resident"] = (
                        None if reference is None or tokens is None or target.kind == "replay" else tokens == reference
                    )
                rows += new
                if on_rows:
                    on_rows(new)
                done += 1
        if progress:
            progress(f"{target.name} done", total, total)
        del target
    return rows


# ---- outputs ---------------------------------------------------------------------------------------


def policy_label(policy: str, miss: str | None) -> str:
    """fate with its --miss mode (`fate`: auto, the default); other policies as named."""
    return policy if miss in (None, "auto") else f"{policy} (miss {miss})"


def _fmt(value, pattern: str, empty: str = "-") -> str:  # noqa: ANN001
    return empty if value is None else pattern.format(value)


def speed_cell(r: dict) -> str:
    """`mean ± sd`; the mean alone for one repetition; marked when the spread exceeds the mean."""
    if r["stdev"] is None:
        return f"{r['tokens_per_s']:.2f}"
    return f"{r['tokens_per_s']:.2f} ± {r['stdev']:.2f}" + (" (!)" if noisy(r) else "")


def noisy(r: dict) -> bool:
    return r["status"] == "ok" and r["stdev"] is not None and r["stdev"] > r["tokens_per_s"]


def status_cell(r: dict) -> str:
    if r["status"] == "does not fit" and r.get("minimum_budget_bytes"):
        return f"does not fit (needs {format_size(r['minimum_budget_bytes'])})"
    return r["status"]


def markdown(rows: list[dict]) -> str:
    out = io.StringIO()
    out.write("| model | size (hot) | policy | vram | test | t/s | hit % | pred. recall | GB moved | on CPU "
              "| loads / MIN |\n")
    out.write("| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    notes = {"size (hot): non-expert weights plus every expert at the hot tier, what `resident` holds "
             "(`fate list` gives the checkpoint's size on disk)"}
    for r in rows:
        name = r["model"] + ("" if r["kind"] == "model" else f" ({r['kind']})")
        policy = policy_label(r["policy"], r.get("miss"))
        cpu = "-"
        if r["status"] != "ok":
            speed = status_cell(r)
            hit = recall = moved = floor = "-"
        else:
            speed = speed_cell(r)
            hit = f"{100 * r['hit_rate']:.1f}"
            decode = r["test"].startswith("tg")
            recall = _fmt(r["decode_prediction_recall"] if decode else r["prediction_recall"], "{:.3f}")
            if decode and r.get("decode_predicted") == 0:
                recall = "none made"
                notes.add(f"none made: {r['policy']} predicted no expert on one-token steps"
                          + (" (its co-activation counts expect less than one token at any expert of the next "
                             "layer)" if r["policy"] == "klotski" else ""))
            moved = f"{r['gb_moved']:.3f}"
            if r.get("cpu_experts"):
                cpu = f"{r['cpu_experts']:.0f} ({r['cpu_seconds']:.2f} s)"
                notes.add("on CPU: misses computed on the CPU per request, and the CPU time they took")
            floor = floor_cell(r)
            if floor.endswith("*"):
                notes.add("*: misses computed on the CPU load nothing, so loads / MIN may fall below 1 there")
            if floor != "-":
                notes.add("loads / MIN: experts the policy loaded (misses and prefetches) over Belady's MIN, the "
                          "fewest any policy could load serving the same routing with the row's slots (per request, "
                          "prefill and decode; bytes over MIN's at the smallest tier in brackets)")
        if policy == "resident":
            policy = "resident (any budget)"
            notes.add(f"resident (any budget): {RESIDENT_NOTE}")
        if noisy(r):
            notes.add("(!): the spread exceeds the mean; raise -r or run on a quieter machine")
        out.write(f"| {name} | {format_size(r['size_bytes'])} | {policy} | {r['vram']} | {r['test']} | "
                  f"{speed} | {hit} | {recall} | {moved} | {cpu} | {floor} |\n")
    if rows and all(r["reps"] == 1 for r in rows):
        notes.add("one repetition (-r 1): no spread to show")
    out.write("\n" + "\n".join(f"- {n}" for n in sorted(notes)) + "\n")
    ratio_lines = ratios(rows)
    if ratio_lines:
        out.write("\n| model | vram | test | policy | × ondemand | × resident |\n")
        out.write("| --- | ---: | --- | --- | ---: | ---: |\n")
        for line in ratio_lines:
            out.write(f"| {line['model']} | {line['vram']} | {line['test']} | {line['policy']} | "
                      f"{_fmt(line['vs_ondemand'], '{:.2f}')} | {_fmt(line['vs_resident'], '{:.2f}')} |\n")
    return out.getvalue()


def floor_cell(r: dict) -> str:
    """`1.52 (0.84)`: loads over MIN's, bytes over MIN's bytes; `0 = MIN` when neither loads anything."""
    if r.get("min_loads") is None:
        return "-"
    cpu = " *" if r.get("cpu_experts") else ""  # a miss the CPU computed needed no slot: MIN is no floor there
    if not r["min_loads"]:
        return ("0 = MIN" if not r["loads"] else f"{r['loads']} (MIN 0)") + cpu
    return f"{r['loads_over_min']:.2f} ({r['bytes_over_min']:.2f}){cpu}"


def ratios(rows: list[dict]) -> list[dict]:
    """Each policy's tokens/s over ondemand's and over resident's, same model, budget and test."""
    ok = [r for r in rows if r["status"] == "ok"]
    by_key = {(r["model"], r["vram"], r["test"], policy_label(r["policy"], r.get("miss"))): r["tokens_per_s"]
              for r in ok}
    lines = []
    for r in ok:
        key = (r["model"], r["vram"], r["test"])
        od, res = by_key.get((*key, "ondemand")), by_key.get((*key, "resident"))
        if od is None and res is None:
            continue
        lines.append({"model": r["model"], "vram": r["vram"], "test": r["test"],
                      "policy": policy_label(r["policy"], r.get("miss")),
                      "vs_ondemand": r["tokens_per_s"] / od if od else None,
                      "vs_resident": r["tokens_per_s"] / res if res else None})
    return lines


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})
    return out.getvalue()


def size_unit(largest: float) -> tuple[str, float]:
    """The unit a budget axis reads in: GB from 1 GB, else MB, else kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if largest >= scale:
            return unit, scale
    return "bytes", 1.0


def plot_figure(rows: list[dict]):  # noqa: ANN201 - a matplotlib Figure
    """Decode tokens/s and hit rate against budget, one line per policy, one pair of panels per model; the
    legend below the panels, where it hides no line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in rows if r["status"] == "ok" and r["test"].startswith("tg")]
    models = list(dict.fromkeys(r["model"] for r in decode)) or [rows[0]["model"]]
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.8 * len(models) + 0.6), squeeze=False)
    unit, scale = size_unit(max((r["budget_bytes"] for r in decode), default=1e9))
    handles: dict[str, object] = {}
    for (ax_speed, ax_hit), model in zip(axes, models):
        mine = [r for r in decode if r["model"] == model]

        def line(r: dict) -> str:
            return policy_label(r["policy"], r.get("miss")) + ("" if r.get("batch", 1) == 1 else f" b{r['batch']}")

        for name in dict.fromkeys(line(r) for r in mine):
            pts = sorted((r["budget_bytes"] / scale, r["tokens_per_s"], 100 * r["hit_rate"]) for r in mine
                         if line(r) == name)
            (handle,) = ax_speed.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax_hit.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
            handles.setdefault(name, handle)
        kind = next((r["kind"] for r in mine), "model")
        title = model + ("" if kind == "model" else f" ({kind})")
        ax_speed.set(title=f"{title}: decode", xlabel=f"VRAM budget ({unit})", ylabel="tokens/s")
        ax_hit.set(title=f"{title}: expert hit rate", xlabel=f"VRAM budget ({unit})", ylabel="hit %")
        for ax in (ax_speed, ax_hit):
            ax.ticklabel_format(axis="x", style="plain", useOffset=False)
            ax.grid(alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 7),
                   frameon=False)
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    return fig


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = plot_figure(rows)
    try:  # the old plot stays whole, no partial one is left
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)


# ---- the command -------------------------------------------------------------------------------------


def bench_command(model: str | None, prompt_len: int, gen_len: int, reps: int, device: str | None,
                  dtype: str | None, output: str, vram: str | None, policy: str | None,
                  transfer_bits: int | None = None, prompts_file: str | None = None, plot_file: str | None = None,
                  quiet: bool = False, rows_to: str | None = None, batch: str | None = None,
                  eager: bool = False, miss: str | None = "auto", link: str | None = None,
                  cpu_threads: int | None = None) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if output not in ("md", "csv", "json"):
        raise UsageError(f"unknown output format '{output}'; use md, csv or json")
    if plot_file and not plot_file.lower().endswith(".png"):
        raise UsageError(f"--plot {plot_file} is not a PNG file name; give one ending in .png")
    if plot_file:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib, the `plot` extra; pip install 'fate-moe[plot]', or leave "
                             "--plot out") from None
    for opt, out_file in (("--plot", plot_file), ("--rows-to", rows_to)):  # before hours of measuring, not after
        if out_file:
            check_writable(out_file, opt)
    policies = parse_policies(policy)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    names = [n.strip() for n in model.split(",")] if model else ["tiny"]
    for name in names:  # bad names and budgets fail here, before anything is printed or loaded
        check_target_name(name)
    parse_budgets(vram, _NO_FOOTPRINT)
    batches = parse_batches(batch)
    misses = parse_misses(miss)
    hybrid = hybrid_options("auto", link, cpu_threads)
    prompts = prompt_set(prompt_len, (reps + 1) * max(batches), prompts_file)
    console = Console(stderr=True, soft_wrap=True)
    from fate_cli.model.model import dense_label

    console.print(f"[dim]fate bench on {dev.type} [{device_label(dev)}],"
                  f" {dtype_name(dt)}{dense_label()}; pp{prompt_len} tg{gen_len}, batch {','.join(map(str, batches))},"
                  f" {reps} repetitions after a warm-up; CPU experts on {cpu_threads or torch.get_num_threads()} "
                  f"threads; link {'as measured' if link is None else f'emulated at {link}/s'}[/dim]")

    def make(name: str) -> Target:
        target = open_target(name, dev, dt, transfer_bits, eager)
        target.hybrid = dataclasses.replace(hybrid, costs={})
        console.print(f"[dim]{target.cost_line()}[/dim]")  # measured link and host bandwidths
        return target

    makers = [lambda n=n: make(n) for n in names]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=quiet) as bar:
        task = bar.add_task("loading", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        def append_rows(new: list[dict]) -> None:  # a long sweep keeps what it measured if it is stopped
            with open(rows_to, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)

        rows = sweep(makers, vram, policies, prompts, gen_len, reps, dev, progress, append_rows if rows_to else None,
                     batches, misses)
    spread = [r for r in rows if noisy(r)]
    if spread:
        console.print(f"warning: {len(spread)} row{'s' if len(spread) > 1 else ''} with a spread larger than the "
                      "mean (marked (!)); raise -r or run on a quieter machine", highlight=False)
    if output == "json":  # the table first: a plot that fails to draw loses nothing measured
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    elif output == "csv":
        sys.stdout.write(to_csv(rows))
    else:
        sys.stdout.write(markdown(rows))
    sys.stdout.flush()
    if plot_file:
        plot(rows, Path(plot_file))
