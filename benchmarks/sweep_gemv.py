"""Tiles of the batch-1 GEMV per expert matrix, timed the way decode runs it: in a CUDA graph, on cold weights.

Triton's autotuner (quant/triton_kernels.py `_gemv_tuned`) times tiles eagerly on one matrix that sits in L2,
and its picks move between runs. This sweep times, per tile, a CUDA graph of the GEMV over R copies of the
matrix (R x its bytes > 2 x L2, so each call reads from HBM; benchmarks/bench_kernels.py's bench_graph and
rotation, without its cap on R) and reports the time per call. The best tile per (N, K, bits, group) is
written into this GPU's tiles file, quant/configs/gemv_tiles_<GPU>.json (quant/gemv_tiles.py), which the
GEMV reads on this GPU from then on: entries of matrices not swept stay as they were.

    python3 benchmarks/sweep_gemv.py [--shapes mixtral,qwen3] [--direct] [--tiles FILE] [--out sweep_gemv.json]

--tiles writes elsewhere than the package's file (compare picks with benchmarks/bench_kernels.py --tiles FILE
before replacing it); --out keeps every tile's time as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from quant import gemv_tiles
from quant import triton_kernels as tk
from quant.hqq_quant import quantize_matrix

import bench_kernels as bk  # benchmarks/bench_kernels.py: shapes, tiers and timing shared by the kernel benchmarks


def candidates(n: int, k: int, group: int, block_n: list[int], block_k: list[int], warps: list[int],
          direct: bool) -> list[dict]:
    auto = tk.split_k(n, k, torch.device("cuda"))
    out = []
    for bn in block_n:
        for bk_ in block_k:
            if bk_ > 2 * k or bk_ % group:
                continue
            for w in warps:
                for split in sorted({1, auto, 2 * auto}):
                    if math.ceil(k / bk_) < split:
                        continue
                    for d in (False, True) if direct else (False,):
                        cfg = {"BLOCK_N": bn, "BLOCK_K": bk_, "SPLIT_K": split, "num_warps": w}
                        out.append({**cfg, "DIRECT": True} if d else cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--out", type=Path, help="every tile's time, as JSON")
    ap.add_argument("--tiles", type=Path, help="write the best tiles here (default: this GPU's file in the package)")
    ap.add_argument("--block-n", default="4,8,16", help="BLOCK_N values to try")
    ap.add_argument("--block-k", default="512,1024,2048", help="BLOCK_K values to try")
    ap.add_argument("--warps", default="4,8", help="num_warps values to try")
    ap.add_argument("--direct", action="store_true", help="also time the direct kernel (no planes pass)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not tk.available():
        raise SystemExit("error: needs a CUDA GPU and triton; run this on the GPU to tune")
    grid = [[int(v) for v in a.split(",")] for a in (args.block_n, args.block_k, args.warps)]
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
                for cfg in candidates(n, k, group, *grid, args.direct):
                    us = bk.bench_graph(lambda c, cfg=cfg: lambda xin: tk.gemv(xin, c, config=cfg), copies, x)
                    timed.append((us, cfg))
                    print(f"{shape} {matrix} INT{bits}: {us:7.1f} us {cfg}", flush=True)
                timed.sort(key=lambda t: t[0])
                results.append({"shape": shape, "matrix": matrix, "n": n, "k": k, "bits": bits, "group": group,
                                "copies": len(copies), "best": timed[0][1], "best_us": timed[0][0],
                                "top": [{"us": t, "cfg": c} for t, c in timed[:5]]})
                print(f"== {shape} {matrix} {n}x{k} INT{bits} g{group}: best {timed[0][0]:.1f} us {timed[0][1]}")
    path = args.tiles or gemv_tiles.CONFIG_DIR / gemv_tiles.file_name(torch.cuda.get_device_name())
    tiles = gemv_tiles.read(path) if path.is_file() else {}
    tiles.update({(r["n"], r["k"], r["bits"], r["group"]): r["best"] for r in results})
    gemv_tiles.write(path, tiles)
    print(f"\n{len(results)} tiles written to {path} ({len(tiles)} matrices)")
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
