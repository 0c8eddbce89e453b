"""Where a batched decode step's time goes under each policy: copies, expert compute, and their overlap.

Replays the bundled model's recorded batch traffic at an expert size (replay.py) on a GPU under the
profiler and reports, per decode step: wall time, time the copy engine was busy (host -> device copies),
time kernels ran, the time both ran at once, and host-tier bytes moved. GPU only.

    python3 benchmarks/profile_replay.py [--target replay:mixtral-8x7b] [--vram 50%] [--batch 16] [-n 8]
        [--policy fate,lru,klotski]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from fate_cli.bench import open_target, parse_budgets, prompt_set
from fate_cli.engine.replay import ReplayModel


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def intersect(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, b - a)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def busy(trace_path: str) -> tuple[float, float, float]:
    """(copy, compute, both) busy microseconds from a Chrome trace."""
    events = json.load(open(trace_path))["traceEvents"]
    copies = union([(e["ts"], e["ts"] + e["dur"]) for e in events
                    if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")])
    kernels = union([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel"])
    return length(copies), length(kernels), intersect(copies, kernels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="replay:mixtral-8x7b")
    ap.add_argument("--vram", default="50%")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("-p", type=int, default=256, help="prompt tokens")
    ap.add_argument("-n", type=int, default=8, help="decode steps profiled")
    ap.add_argument("--policy", default="fate,lru,klotski")
    args = ap.parse_args()
    dev = torch.device("cuda")
    target = open_target(args.target, dev, torch.bfloat16, None)
    prompts = prompt_set(args.p, 3 * args.batch, None)
    (label, budget), = parse_budgets(args.vram, target.footprint)
    for policy in args.policy.split(","):
        session = target.session(policy, budget)
        offload = session.offload
        for r in range(3):  # a warm-up request, a timed one, then the profiled one
            steps = target.steps(prompts[r * args.batch : (r + 1) * args.batch], args.n)
            player = ReplayModel(session.provider, target.hidden, dev, target.dtype, max(s.tokens for s in steps))
            steps = player.to_device(steps)
            prefill, decode = steps[: args.batch], steps[args.batch :]
            session.provider.begin_request()
            for step in prefill:
                player.step(step)
            torch.cuda.synchronize()
            offload.reset_stats()
            if r < 2:
                t0 = time.perf_counter()
                for step in decode:
                    player.step(step)
                torch.cuda.synchronize()
                timed = time.perf_counter() - t0
                continue
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                t0 = time.perf_counter()
                for step in decode:
                    player.step(step)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                prof.export_chrome_trace(f.name)
                copy, compute, both = busy(f.name)
        stats = offload.sync_stats()
        k = len(decode)
        row = {
            "policy": policy, "vram": label, "batch": args.batch, "plan": session.setup.plan.summary(),
            "step_ms": 1e3 * timed / k, "profiled_step_ms": 1e3 * wall / k,
            "copy_busy_ms": copy / 1e3 / k, "compute_busy_ms": compute / 1e3 / k,
            "overlap_ms": both / 1e3 / k, "gb_per_step": sum(stats.bytes_moved.values()) / 1e9 / k,
            "loads_per_step": {t: n / k for t, n in stats.loads.items()}, "hit_rate": stats.hit_rate,
            "stall_ms": 1e3 * stats.stall_seconds / k,
        }
        print(json.dumps(row), flush=True)
        session.close()


if __name__ == "__main__":
    main()
