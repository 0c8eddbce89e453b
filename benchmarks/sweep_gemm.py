"""Tile sweep of the fused dequant GEMM (quant.triton_kernels.gemm) against dequantize + cuBLAS and bf16 cuBLAS.

    python3 benchmarks/sweep_gemm.py [--shapes mixtral,qwen3] [--rows 4,16,64,128,512] [--budget-s 20] [--tiers 4:64]
                                  [--wide-swap] [--out F.json]

Per expert matrix (gate|up [2I, H] and down [H, I]), tier (INT4 g64, INT2 g32) and row count: the time of
one product y = x @ W.T with x [rows, K] bf16, for every tile configuration tried (within --budget-s
seconds per case), beside the dequant kernel + cuBLAS and cuBLAS on the bf16 weights. Each timing runs
the product over R distinct copies of the matrix (their bytes exceed twice the L2) and divides by R, so
no weight is read from cache. Correctness of every configuration: against x.float() @ dequantize(W).T.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from quant import triton_kernels as tk
from quant.hqq_quant import quantize_matrix
from quant.packing import dequantize

import bench_kernels as bk  # benchmarks/bench_kernels.py: shapes, tiers and timing shared by the kernel benchmarks

SHAPES = bk.SHAPES


def copies(make, nbytes: int) -> list:
    return [make() for _ in range(bk.rotation(nbytes, cap=32))]


def per_call_us(fn, items: list) -> float:
    from triton.testing import do_bench

    def run() -> None:
        for it in items:
            fn(it)

    return do_bench(run, warmup=10, rep=60, return_mode="median") * 1000 / len(items)


def configs(rows: int, seed: int = 0, wide_swap: bool = False) -> list[dict]:
    """Candidate tiles for `rows` rows, in a fixed shuffled order (a time budget then samples them all).
    wide_swap: also the W tile as the wide operand with more than 64 rows of x."""
    bm0 = min(128, max(16, 1 << (rows - 1).bit_length()))
    bms = sorted({bm0, max(16, bm0 // 2)} | ({256} if rows >= 256 else set()))
    out = []
    for bm, bn, block_k, (warps, stages), swap in itertools.product(
            bms, (64, 128, 256), (64, 128), ((4, 3), (8, 3), (4, 4), (8, 2)), (True, False)):
        if bm * bn > 256 * 128 or (bm >= 128 and bn >= 256 and warps == 4) or (swap and bm > 64 and not wide_swap):
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": block_k, "SWAP": swap, "num_warps": warps,
                    "num_stages": stages})
    random.Random(seed).shuffle(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--rows", default="4,16,64,128,512")
    ap.add_argument("--budget-s", type=float, default=20.0, help="seconds of tile trials per case")
    ap.add_argument("--wide-swap", action="store_true", help="try SWAP tiles above 64 rows of x too")
    ap.add_argument("--tiers", default=",".join(f"{bits}:{group}" for _, bits, group in bk.TIERS),
                    help="bits:group of the tiers to sweep")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if not torch.cuda.is_available() or not tk.available():
        sys.exit("needs a CUDA GPU and triton")
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}",
          flush=True)
    results = []
    for name in a.shapes.split(","):
        hidden, inter = SHAPES[name]
        for what, (n, k) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
            w16 = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
            dense = copies(lambda w16=w16: w16.clone(), w16.nbytes)
            tiers = [tuple(int(v) for v in t.split(":")) for t in a.tiers.split(",")]
            packed = {bits: quantize_matrix(w16, bits, group, method="minmax") for bits, group in tiers}
            for rows in (int(r) for r in a.rows.split(",")):
                x = torch.randn(rows, k, device="cuda").bfloat16()
                t_bf16 = per_call_us(lambda w, x=x: F.linear(x, w), dense)
                for bits, group in tiers:
                    m = packed[bits]
                    ref = x.float() @ dequantize(m, torch.float32).T
                    ms = copies(lambda m=m: m.map(torch.Tensor.clone), m.nbytes)
                    t_deq = per_call_us(lambda w, x=x: F.linear(x, tk.dequant(w, x.dtype)), ms)
                    trials, t0 = [], time.perf_counter()
                    for cfg in configs(rows, wide_swap=a.wide_swap):
                        if time.perf_counter() - t0 > a.budget_s:
                            break
                        if k % cfg["BLOCK_K"] or cfg["BLOCK_K"] % group:
                            continue
                        try:
                            y = tk.gemm(x, m, cfg)
                            err = ((y.float() - ref).norm() / ref.norm()).item()
                            t = per_call_us(lambda w, x=x, cfg=cfg: tk.gemm(x, w, cfg), ms)
                        except Exception as e:  # a tile that does not fit the GPU's shared memory
                            print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                            continue
                        trials.append({"cfg": cfg, "us": t, "rel_err": err})
                    t_def = per_call_us(lambda w, x=x: tk.gemm(x, w), ms)
                    best = min(trials, key=lambda r: r["us"]) if trials else None
                    row = {"expert": name, "matrix": what, "n": n, "k": k, "rows": rows, "bits": bits,
                           "group": group, "bf16_us": t_bf16, "deq_cublas_us": t_deq, "default_us": t_def,
                           "default_cfg": tk.gemm_config(rows, n, k, group), "best": best, "trials": trials}
                    results.append(row)
                    bb = f"{best['us']:.1f} us {best['cfg']} err {best['rel_err']:.1e}" if best else "none"
                    print(f"{name} {what} {n}x{k} rows {rows} INT{bits}: bf16 {t_bf16:.1f}, deq+cublas {t_deq:.1f}, "
                          f"fused default {t_def:.1f}, best {bb} ({len(trials)} tried)", flush=True)
                    del ms
            del dense, packed
            torch.cuda.empty_cache()
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
