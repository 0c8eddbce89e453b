"""Tiles of the batch-1 GEMV per expert matrix, timed the way decode runs it: in a CUDA graph, on cold weights.

Triton's autotuner (quant/triton_kernels.py `_gemv_tuned`) times tiles eagerly on one matrix that sits in L2,
and its picks move between runs. This sweep times, per tile, a CUDA graph of the GEMV over R copies of the
matrix (R x its bytes > 2 x L2, so each call reads from HBM; scripts/bench_kernels.py's bench_graph and
rotation, without its cap on R) and reports the time per call; the best tile per (N, K, bits, group) goes
into `GEMV_TILES`.

    python3 scripts/sweep_gemv.py [--shapes mixtral,qwen3] [--out sweep_gemv.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import triton_kernels as tk  # noqa: E402
from quant.hqq_quant import quantize_matrix  # noqa: E402

try:
    from scripts import bench_kernels as bk  # noqa: E402
except ImportError:  # a `scripts` package elsewhere on sys.path shadows the repo's; this file's folder is on sys.path
    import bench_kernels as bk  # noqa: E402


def tiles(n: int, k: int) -> list[dict]:
    auto = tk.split_k(n, k, torch.device("cuda"))
    out = []
    for bn in (8, 16, 32, 64):
        for block_k in (256, 512, 1024, 2048):
            if block_k > 2 * k:
                continue
            for warps in (4, 8):
                for split in sorted({1, auto, 2 * auto}):
                    if math.ceil(k / block_k) < split:
                        continue
                    out.append({"BLOCK_N": bn, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": warps})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    for shape in args.shapes.split(","):
        hidden, inter = bk.SHAPES[shape]
        for matrix, (n, k) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
            w = torch.randn(n, k, device="cuda") * 0.02
            for _, bits, group in bk.TIERS:
                m = quantize_matrix(w, bits, group, method="minmax")
                copies = [m] + [m.map(torch.clone) for _ in range(bk.rotation(m.nbytes, cap=None) - 1)]
                x = torch.randn(1, k, device="cuda").bfloat16()
                timed = []
                for cfg in tiles(n, k):
                    us = bk.bench_graph(lambda c, cfg=cfg: lambda xin: tk.gemv(xin, c, config=cfg), copies, x)
                    timed.append((us, cfg))
                    print(f"{shape} {matrix} INT{bits}: {us:7.1f} us {cfg}", flush=True)
                timed.sort(key=lambda t: t[0])
                results.append({"shape": shape, "matrix": matrix, "n": n, "k": k, "bits": bits, "group": group,
                                "copies": len(copies), "best": timed[0][1], "best_us": timed[0][0],
                                "top": [{"us": t, "cfg": c} for t, c in timed[:5]]})
                print(f"== {shape} {matrix} {n}x{k} INT{bits} g{group}: best {timed[0][0]:.1f} us {timed[0][1]}")
    print("\nGEMV_TILES = {")
    for r in results:
        print(f"    ({r['n']}, {r['k']}, {r['bits']}, {r['group']}): {r['best']},  # {r['best_us']:.1f} us")
    print("}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
