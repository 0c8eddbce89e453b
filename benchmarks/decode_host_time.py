"""Host time of the offloaded decode step per MoE layer and per token, per policy, on the CPU.

    python3 benchmarks/decode_host_time.py --policy fate,lru --tokens 64 --profile fate
    python3 benchmarks/decode_host_time.py --device cuda --tokens 64      # on a GPU, the captured step

With experts offloaded, the decode step (fate_cli/engine/decode_step.py) stops after every MoE layer's router;
the host reads the routing, runs the policy and queues the misses (`DecodeStep._show_routing`: the provider's
`gate_lookahead` or `gate_input` and `prepare`), the next segment runs, then `provider.finish`. On a GPU the
device idles through all of it, so each microsecond per layer costs the model's MoE layer count per token.

What is built: a synthetic model with a real shape's layer count, expert count and top-k (--shape, default
qwen3-30b-a3b: 48 layers, 128 experts, top-8) but a small hidden and expert width (--hidden, --inter): the
host's work per layer depends on experts and top-k, not on the width. Every policy (and the hybrid `cpu`,
`freetoken`, fate with --miss auto) runs at one --vram share of the hot-tier expert bytes, as `fate bench
--vram 50%` reads it, through the uncaptured decode step (DecodeGraphs(capture=False)): one warm-up request,
then --reps requests of --tokens tokens, the same prompts for every policy.

Per policy, two timed passes over the same requests:
- clean: only `_show_routing` and `finish` are timed (time.perf_counter around each): `host us/layer` and
  `host ms/token` (over the decode steps), against the whole decode step's `step ms/token`; `recorded` is the
  host time the step itself records in the cache's stats (CacheStats.decode_host_seconds, per token), which
  leaves out the wait for the routing's copy (`-` where the code keeps no such record);
- split (each piece wrapped, a little slower): `readback` (the routing list, counts, order: `_show_routing`
  less what it calls), `policy` (gate_lookahead / gate_input, and the policy's on_route inside prepare),
  `prepare` (the slot bookkeeping: prepare less on_route and the copies), `copy` (SlotPool.load: on the CPU
  the copy itself, on a GPU the launch of an asynchronous one), `finish`, and `cpu experts` (a hybrid cache's
  misses computed on the host, work rather than overhead). Only calls made inside the host part count
  (prefill calls some of the same methods).
Hits, misses, loads and bytes of the clean pass are printed too: they are machine-independent, so two runs
of different code on the same arguments must print the same ones. --profile NAMES prints a cProfile of the
host part alone (the profiler enabled inside `_show_routing` and `finish`) for those policies.

--device cuda runs the captured step on a GPU (bfloat16): the host's part then holds its CUDA calls (copies
queued on the copy stream, events, the slot tables' uploads), and `host ms/token` and `readback` also hold the
wait for each layer's routing copy, which `recorded` leaves out.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import io
import pstats
import random
import time
from pathlib import Path

import torch

from cache.hybrid import HybridOptions
from fate_cli.bench import parse_budgets
from fate_cli.bench_targets import ModelTarget
from fate_cli.engine import decode_step
from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.runtime import device_label
from fate_cli.model.loader import FAMILIES
from fate_cli.synthetic import CONFIGS, random_weights, synthetic_store

POLICIES = ("fate", "fate-link", "lru", "fate-shallow", "eap", "fmoe", "klotski", "ondemand", "cpu", "freetoken")
PIECES = ("readback", "policy", "prepare", "copy", "finish", "cpu experts")


def small_shape(shape: str, hidden: int, inter: int) -> dict:
    """The shape's config with its layer count, experts and top-k kept, its widths (and vocabulary) shrunk."""
    if shape not in CONFIGS:
        raise SystemExit(f"error: unknown --shape '{shape}'; use one of {', '.join(CONFIGS)}")
    cfg = copy.deepcopy(CONFIGS[shape])
    inner = cfg.get("text_config", cfg)
    heads = max(1, hidden // 32)
    small = {"hidden_size": hidden, "intermediate_size": inter, "moe_intermediate_size": inter, "head_dim": 32,
             "num_attention_heads": heads, "num_key_value_heads": min(heads, inner["num_key_value_heads"]),
             "vocab_size": 1024, "shared_expert_intermediate_size": inter}
    inner.update({k: v for k, v in small.items() if k in inner or k in ("head_dim",)})
    if inner["model_type"] == "mixtral" or "num_local_experts" in inner:
        inner["intermediate_size"] = inter
    return cfg


def open_target(shape: str, hidden: int, inter: int, device: torch.device) -> ModelTarget:
    cfg = small_shape(shape, hidden, inter)
    args = FAMILIES[cfg["model_type"]](cfg, Path(f"<synthetic:{shape}>/config.json"))
    name = f"synthetic:{shape} (hidden {hidden}, experts {inter} wide)"
    torch.set_flush_denormal(True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = ModelTarget(name, "synthetic", random_weights(args, device, dtype), synthetic_store(args, name), None)
    target.hybrid = HybridOptions()
    target.capture = device.type == "cuda"
    return target


class HostClock:
    """Seconds spent in named host pieces of the decode step, gathered by wrappers around its methods."""

    def __init__(self, profiler: cProfile.Profile | None = None) -> None:
        self.seconds = dict.fromkeys(("show", "finish", "lookahead", "on_route", "prepare", "load", "host_moe"), 0.0)
        self.profiler = profiler
        self.inside = [False]  # in the host part (prefill calls some of the same methods: not counted)
        self.undo: list = []

    def wrap(self, owner: object, attr: str, key: str, outer: bool = False) -> None:
        """Time owner.attr under `key` (outer: the host part's entry points, where the profiler runs)."""
        inner = getattr(owner, attr)
        seconds, profiler, inside = self.seconds, self.profiler, self.inside

        @functools.wraps(inner)
        def timed(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            if not (outer or inside[0]):
                return inner(*a, **kw)
            if outer:
                inside[0] = True
                if profiler is not None:
                    profiler.enable()
            start = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                seconds[key] += time.perf_counter() - start
                if outer:
                    inside[0] = False
                    if profiler is not None:
                        profiler.disable()

        setattr(owner, attr, timed)
        self.undo.append((owner, attr, inner, isinstance(owner, type)))

    def restore(self) -> None:
        for owner, attr, inner, on_class in reversed(self.undo):
            if on_class:
                setattr(owner, attr, inner)
            else:
                delattr(owner, attr)
        self.undo = []

    def pieces(self) -> dict[str, float]:
        s = self.seconds
        inside = s["lookahead"] + s["prepare"] + s["host_moe"]
        return {"readback": s["show"] - inside, "policy": s["lookahead"] + s["on_route"],
                "prepare": s["prepare"] - s["on_route"] - s["load"], "copy": s["load"], "finish": s["finish"],
                "cpu experts": s["host_moe"]}


def target_device(session) -> torch.device:  # noqa: ANN001 - a bench Session
    return session.model.embed_tokens.weight.device


def run_pass(session, graphs: DecodeGraphs, prompts: list[list[int]], tokens: int, clock: HostClock,  # noqa: ANN001
             split: bool) -> tuple[float, int]:
    """The requests with the clock's wrappers in place -> (decode seconds, decode steps)."""
    offload = session.offload
    clock.wrap(decode_step.DecodeStep, "_show_routing", "show", outer=True)
    clock.wrap(offload, "finish", "finish", outer=True)
    if split:
        clock.wrap(offload, "gate_lookahead", "lookahead")
        clock.wrap(offload, "gate_input", "lookahead")
        clock.wrap(offload, "prepare", "prepare")
        clock.wrap(offload.policy, "on_route", "on_route")
        clock.wrap(offload, "host_moe", "host_moe")
        clock.wrap(offload.pool, "load", "load")
    sampler = Sampler(SamplingParams(temperature=0.0), target_device(session))
    seconds, steps = 0.0, 0
    try:
        for prompt in prompts:
            result = generate(session.model, prompt, tokens, sampler, graphs=graphs)
            seconds += result.stats.decode_seconds
            steps += result.stats.generated_tokens - 1
    finally:
        clock.restore()
    return seconds, steps


def measure(target: ModelTarget, policy: str, budget: int, prompts: list[list[int]], tokens: int,
            profile: bool) -> dict:
    miss = "link" if policy == "fate-link" else "auto"
    session = target.session(policy.removesuffix("-link"), budget, miss)
    offload = session.offload
    device = target_device(session)
    graphs = DecodeGraphs(session.model, capture=device.type == "cuda")
    sampler = Sampler(SamplingParams(temperature=0.0), device)
    generate(session.model, prompts[0], tokens, sampler, graphs=graphs)  # warm-up: the slots filled
    if graphs._step is None:
        raise SystemExit(f"error: {policy} did not run the decode step ({graphs.describe()})")
    cut = len(graphs._step.host_layers)
    offload.reset_stats()
    clean = HostClock()
    seconds, steps = run_pass(session, graphs, prompts[1:], tokens, clean, split=False)
    stats = offload.stats
    recorded = getattr(stats, "decode_host_seconds", None)  # the step's own record of its host part, if it keeps one
    row = {
        "policy": policy, "slots": sorted(set(s.capacity for s in offload.layers.values())), "cut_layers": cut,
        "hit_rate": stats.hit_rate, "hits": stats.hits, "misses": stats.misses, "loads": sum(stats.loads.values()),
        "bytes": sum(stats.bytes_moved.values()), "prefetches": stats.prefetches, "cpu_experts": stats.cpu_experts,
        "steps": steps, "step_ms": 1e3 * seconds / steps,
    }
    host = clean.seconds["show"] + clean.seconds["finish"]
    row["host_ms"] = 1e3 * host / steps
    row["host_us_layer"] = 1e6 * host / (steps * cut)
    row["recorded_ms"] = None if recorded is None else 1e3 * recorded / steps
    split = HostClock()
    run_pass(session, graphs, prompts[1:], tokens, split, split=True)
    row["pieces_us_layer"] = {k: 1e6 * v / (steps * cut) for k, v in split.pieces().items()}
    if profile:
        prof = cProfile.Profile()
        run_pass(session, graphs, prompts[1:], tokens, HostClock(prof), split=False)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        row["profile"] = out.getvalue()
    graphs.forget()
    session.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b", help="a synthetic shape (fate_cli/synthetic.py)")
    ap.add_argument("--policy", default=",".join(POLICIES),
                    help=f"comma-separated, of {', '.join(POLICIES)} (fate-link: fate with --miss link)")
    ap.add_argument("--vram", default="50%", help="share of the hot-tier expert bytes, as fate bench reads it")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--inter", type=int, default=128, help="each expert's width")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--reps", type=int, default=3, help="timed requests after the warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the host runs Python on one)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: the captured step on the GPU, where the host's CUDA calls (copies, events) count too")
    ap.add_argument("--profile", default="", help="policies whose host part is cProfiled, comma-separated")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    policies = [p.strip() for p in a.policy.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise SystemExit(f"error: unknown --policy {', '.join(bad)}; use any of {', '.join(POLICIES)}")
    profiled = {p.strip() for p in a.profile.split(",") if p.strip()}
    target = open_target(a.shape, a.hidden, a.inter, torch.device(a.device))
    ((label, budget),) = parse_budgets(a.vram, target.footprint)
    rng = random.Random(0)
    vocab = target.weights.args.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(a.prompt)] for _ in range(a.reps + 1)]
    print(f"{target.name}: {len(target.ctx.moe_layers)} MoE layers, {target.ctx.num_experts} experts, "
          f"top-{target.ctx.top_k}; --vram {label}; {a.reps} x {a.tokens} tokens after a warm-up; "
          f"torch {torch.__version__}, {a.threads} thread(s), {device_label(torch.device(a.device))}")
    print("host us/layer: _show_routing + finish per cut layer; pieces from the split pass (wrapped, slower)\n")
    head = ("policy", "slots", "hit %", "hits", "misses", "loads", "MB moved", "step ms/tok", "host ms/tok",
            "recorded", "host us/layer", *PIECES)
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = []
    for policy in policies:
        r = measure(target, policy, budget, prompts, a.tokens, policy in profiled)
        rows.append(r)
        pieces = [f"{r['pieces_us_layer'][k]:.1f}" for k in PIECES]
        print(f"| {policy} | {'/'.join(map(str, r['slots']))} | {100 * r['hit_rate']:.1f} | {r['hits']} | "
              f"{r['misses']} | {r['loads']} | {r['bytes'] / 1e6:.2f} | {r['step_ms']:.2f} | {r['host_ms']:.2f} | "
              f"{'-' if r['recorded_ms'] is None else format(r['recorded_ms'], '.2f')} | {r['host_us_layer']:.1f} | "
              + " | ".join(pieces) + " |", flush=True)
    for r in rows:
        if "profile" in r:
            print(f"\n## cProfile of the host part, {r['policy']}\n{r['profile']}")


if __name__ == "__main__":
    main()
