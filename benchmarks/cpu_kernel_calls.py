"""The CPU expert kernel's calls apart: one Qwen3-30B-A3B INT4 g64 expert at batch 1, its two products alone
(gate_up 1536x2048, down 2048x768), an empty call (no active token: the parallel region's start and end alone),
and the whole `cpu_moe` call, per thread count, back to back and with the host busy between calls.

    python3 benchmarks/cpu_kernel_calls.py --threads 16,8,1
    OMP_WAIT_POLICY=active python3 benchmarks/cpu_kernel_calls.py --threads 16,8
    python3 benchmarks/cpu_kernel_calls.py --threads 8 --tokens 8,16,32,64   # where dequantizing once wins

--tokens: `cpu_moe` of one expert for that many tokens, through the fused kernel and through dequantizing it once
then torch's matmul (what cpu_moe does above quant/cpu_experts.KERNEL_MAX_TOKENS tokens), INT4 g64 and INT2 g32.

Each call reads another expert of a pool larger than the caches, as a decode step does. Medians, microseconds.
"""

from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np
import torch

from quant import cpu_experts, cpu_kernels
from quant.layout import ExpertLayout
from quant.synthetic import random_quantized

POOL = 500  # experts (1.3 GB): every call reads RAM


def spin(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="8,1", help="thread counts, comma-separated")
    p.add_argument("--gap-us", type=float, default=500, help="the host busy this long between calls (and none)")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--tokens", default="", help="token counts: the fused kernel against dequantize + matmul")
    a = p.parse_args()
    if a.tokens:
        crossover([int(t) for t in a.threads.split(",")], [int(t) for t in a.tokens.split(",")])
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_", "NUMBA_"))}
    print(f"numba {numba.__version__}, threading layer {numba.config.THREADING_LAYER}, {numba.config.NUMBA_NUM_THREADS}"
          f" threads at most; torch threads {torch.get_num_threads()}; environment {env or 'default'}")
    layout = ExpertLayout.quantized(2048, 768, 4, 64)
    tier = random_quantized(layout, torch.Generator().manual_seed(0)).unsqueeze(0).repeat(POOL, 1)
    arena = tier.numpy()
    planes, matmul = cpu_kernels._planes_kernel(4, 64), cpu_kernels._quantized_kernel(4, 64)
    x = torch.randn(1, 2048)
    xp, xs = planes(x.numpy()[None])
    ap, a_s = planes(np.random.default_rng(0).standard_normal((1, 1, 768)).astype(np.float32))
    rows, xsel, act = np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones((1, 1), np.uint8)
    idle = np.zeros((1, 1), np.uint8)
    h, y = np.zeros((1, 1, 1536), np.float32), np.zeros((1, 1, 2048), np.float32)
    gu, dn = cpu_experts._offsets(layout, "gate_up"), cpu_experts._offsets(layout, "down")
    w = torch.ones(1, 1)
    print("| threads | gap us | gate_up | down | empty call | cpu_moe |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads in (int(t) for t in a.threads.split(",")):
        cpu_kernels.set_threads(threads)
        for gap in (0.0, a.gap_us):
            calls = {
                "gate_up": lambda: matmul(arena, rows, xsel, *gu, 1536, 2048, xp, xs, act, h),
                "down": lambda: matmul(arena, rows, xsel, *dn, 2048, 768, ap, a_s, act, y),
                "empty": lambda: matmul(arena, rows, xsel, *dn, 2048, 768, ap, a_s, idle, y),
                "cpu_moe": lambda n=threads: cpu_experts.cpu_moe(x, [(tier[rows[0]], layout)], w, threads=n),
            }
            medians = []
            for fn in calls.values():
                times = []
                for i in range(a.calls):
                    rows[0] = (i * 7) % POOL
                    spin(gap)
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                medians.append(np.median(times[20:]) * 1e6)
            print(f"| {threads} | {gap:.0f} | " + " | ".join(f"{m:.1f}" for m in medians) + " |", flush=True)


def crossover(thread_counts: list[int], token_counts: list[int]) -> None:
    print("| threads | tier | tokens | fused kernel us | dequantize + matmul us |\n| ---: | --- | ---: | ---: | ---: |")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        cpu_kernels.configure_threads(threads)
        for name, layout in (("int4-g64", ExpertLayout.quantized(2048, 768, 4, 64)),
                             ("int2-g32", ExpertLayout.quantized(2048, 768, 2, 32))):
            tier = random_quantized(layout, torch.Generator().manual_seed(0)).unsqueeze(0).repeat(POOL // 2, 1)
            for tokens in token_counts:
                x, w = torch.randn(tokens, 2048), torch.ones(tokens, 1)
                medians = []
                for limit in (1 << 30, 0):  # every call through the kernel; every call dequantized
                    cpu_experts.KERNEL_MAX_TOKENS = limit
                    times = []
                    for i in range(30):
                        t = time.perf_counter()
                        cpu_experts.cpu_moe(x, [(tier[(i * 7) % len(tier)], layout)], w, threads=threads)
                        times.append(time.perf_counter() - t)
                    medians.append(np.median(times[5:]) * 1e6)
                print(f"| {threads} | {name} | {tokens} | {medians[0]:.0f} | {medians[1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
