"""Tiles of the batch-1 GEMV per expert matrix, timed the way decode runs it: in a CUDA graph, on cold weights.

Triton's autotuner (quant/triton_kernels.py `_gemv_tuned`) times tiles eagerly on one matrix that sits in L2,
and its picks move between runs. This sweep captures, per tile, a graph of the GEMV over R copies of the
matrix (R x its bytes > 2 x L2, so each call reads from HBM) and reports the replay time per call; the best
tile per (N, K, bits, group) goes into `GEMV_TILES`.

    python3 scripts/sweep_gemv.py [--shapes mixtral,qwen3] [--out sweep_gemv.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from quant import triton_kernels as tk
from quant.hqq_quant import quantize_matrix

SHAPES = {"mixtral": (4096, 14336), "qwen3": (2048, 768)}
TIERS = ((4, 64), (2, 32))
L2_BYTES = 50 * 1024**2


def graph_us(fn, reps: int = 20) -> float:  # noqa: ANN001
    """Replay time of one captured call of fn, in microseconds (fn itself loops over the copies)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def tiles(n: int, k: int) -> list[dict]:
    auto = tk.split_k(n, k, torch.device("cuda"))
    out = []
    for bn in (8, 16, 32, 64):
        for bk in (256, 512, 1024, 2048):
            if bk > 2 * k:
                continue
            for warps in (4, 8):
                for split in sorted({1, auto, 2 * auto}):
                    if math.ceil(k / bk) < split:
                        continue
                    out.append({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": warps})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    for shape in args.shapes.split(","):
        hidden, inter = SHAPES[shape]
        for matrix, (n, k) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
            w = torch.randn(n, k, device="cuda") * 0.02
            for bits, group in TIERS:
                m = quantize_matrix(w, bits, group, method="minmax")
                nbytes = m.codes.nbytes + m.scale.nbytes + m.zero.nbytes
                copies = [m] + [m.map(torch.clone) for _ in range(max(1, math.ceil(2 * L2_BYTES / nbytes)) - 1)]
                x = torch.randn(1, k, device="cuda").bfloat16()
                timed = []
                for cfg in tiles(n, k):
                    def run(cfg=cfg, copies=copies, x=x) -> None:  # noqa: ANN001
                        for c in copies:
                            tk.gemv(x, c, config=cfg)
                    timed.append((graph_us(run) / len(copies), cfg))
                    print(f"{shape} {matrix} INT{bits}: {timed[-1][0]:7.1f} us {cfg}", flush=True)
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
