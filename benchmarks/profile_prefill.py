"""Where a prefill's GPU time goes: one prompt through a synthetic shape under one policy, profiled by kernel.

    PYTHONPATH=. python3 benchmarks/profile_prefill.py --shape qwen3-30b-a3b --policy resident -p 512

Prints the prefill's tokens/s (mean of --reps timed passes after a warm-up), the FLOPs floor (2 x active
parameters x tokens over --peak-tflops) and the weight-read floor (every routed expert's bytes once per layer
over the copy bandwidth measured in the same run), then the profiler's kernels by total GPU time.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_decode import copy_bandwidth  # this folder is on the path of a script run from it

from fate_cli.bench import open_target
from fate_cli.synthetic import synthetic_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--policy", default="resident")
    parser.add_argument("--vram", default="80GB")
    parser.add_argument("-p", "--prompt-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sync-debug", action="store_true",
                        help="also list where one prefill makes the host wait for the GPU (file:line, count)")
    args = parser.parse_args()
    device = torch.device("cuda")
    name = f"synthetic:{args.shape}"
    target = open_target(name, device, torch.bfloat16, None)
    from cache.budget import parse_size

    session = target.session(args.policy, parse_size(args.vram))
    model = session.model
    margs = synthetic_args(name)
    tokens = torch.randint(0, margs.vocab_size, (1, args.prompt_len), device=device)

    def prefill() -> None:
        cache = model.new_cache(1, args.prompt_len + 8)
        with torch.no_grad():
            model(tokens, cache, 0)

    prefill()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        prefill()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    h, i, k = margs.hidden_size, margs.moe_intermediate_size, margs.top_k
    layers = len(margs.moe_layer_ids)
    flops = 2 * args.prompt_len * layers * (3 * h * i * k)  # routed experts only: the bulk of a MoE's FLOPs
    hot = target.store.tiers["hot"].layout.nbytes
    weight_bytes = layers * margs.num_experts * hot
    bandwidth = copy_bandwidth(device)
    print(f"{name} {args.policy} at {args.vram}: prefill {args.prompt_len} tokens in {seconds * 1e3:.1f} ms = "
          f"{args.prompt_len / seconds:,.0f} tokens/s ({session.graphs.describe() if session.graphs else ''})")
    print(f"floors: routed-expert FLOPs {flops / args.peak_tflops / 1e12 * 1e3:.2f} ms at {args.peak_tflops:.0f} "
          f"TFLOP/s; every expert read once {weight_bytes / bandwidth * 1e3:.2f} ms at {bandwidth / 1e9:.0f} GB/s")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        prefill()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
    if args.sync_debug:
        print_syncs(prefill)


def print_syncs(prefill) -> None:  # noqa: ANN001
    """Each place one prefill synchronises with the GPU (torch's sync debug mode), by source line."""
    import collections
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            prefill()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    print(f"host synchronisations in one prefill: {sum(where.values())}")
    for place, count in where.most_common():
        print(f"  {count:5d}  {place}")


if __name__ == "__main__":
    main()
