"""Expert-FFN kernels on a GPU: correctness against dequantize-then-matmul, then bf16 vs INT4 vs INT2 times.

    python3 benchmarks/bench_kernels.py [--shapes mixtral,qwen3] [--quick] [--sweep] [--tiles TILES.json]
                                        [--out FILE.json]

Needs torch and triton on a CUDA GPU; hqq is optional (without it the weights are quantized with plain
min-max, which changes the codes, not the kernels' speed). For each expert shape (Mixtral 4096x14336,
Qwen3-30B-A3B 2048x768), on random bf16 weights (N(0, 0.02)) and fresh random bf16 inputs:

1. Correctness: every kernel against a float32 reference (dequantize with quant.packing.dequantize, then
   float32 matmuls), as ||y - ref|| / ||ref||. Bands: the GEMV (fp32 dequant and accumulation, bf16
   output) < 1e-2; dequantize + cuBLAS (W cast to bf16) < 2e-2; the dequant kernel bitwise equal to the
   reference. Outputs are checked for NaN.
2. Time per expert FFN (down(silu(gate x) * up x)), median of triton.testing.do_bench (L2 flushed before
   each call), at each of --batches (default 1 = decode and 512 = prefill):
   - eager: one FFN call as the runtime makes it (quant.kernels.expert_ffn: fused GEMVs at batch 1,
     dequantize + cuBLAS above GEMV_MAX_ROWS rows);
   - graph: a CUDA graph that runs the FFN of R different experts (R chosen so their weights exceed the
     L2 twice over, so no expert is timed from cache), replay time / R.
   Variants: bf16 (three cuBLAS linears, as DenseExpert), and for INT4 g64 / INT2 g32: triton (what
   expert_ffn runs), deq+cublas (our dequant kernel, then cuBLAS, at every batch), fused-gemm (the fused
   dequant GEMM at every batch above 1), deq-overlap (dequant on a side stream under the previous product,
   then cuBLAS) and torch-deq (the plain-torch reference dequantization, then cuBLAS: the "torch
   dequant+matmul" backend; skipped with --quick).
3. --sweep also times a few tile configurations of the GEMV kernel and prints the best.
Prints a markdown table and the kernels' targets (INT4 batch 1 within 1.5x of bf16; INT2 no slower than
INT4; INT4 prefill of 512 within 1.3x of bf16), judged on graph times.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from quant import gemv_tiles
from quant import triton_kernels as tk
from quant.hqq_quant import hqq_available, quantize_expert
from quant.kernels import expert_ffn
from quant.packing import PackedMatrix, dequantize

SHAPES = {"mixtral": (4096, 14336), "qwen3": (2048, 768)}
TIERS = (("INT4 g64", 4, 64), ("INT2 g32", 2, 32))


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def reference(x: torch.Tensor, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    g, u, d = w
    xf = x.float()
    return F.linear(F.silu(F.linear(xf, g)) * F.linear(xf, u), d)


class Quantized:
    def __init__(self, gu: PackedMatrix, dn: PackedMatrix):
        self.gu, self.dn = gu, dn
        self.inter = dn.shape[1]

    def clone(self) -> Quantized:
        return Quantized(self.gu.map(torch.Tensor.clone), self.dn.map(torch.Tensor.clone))

    @property
    def nbytes(self) -> int:
        return self.gu.nbytes + self.dn.nbytes

    def dequantized(self) -> tuple[torch.Tensor, ...]:
        """(gate, up, down) in float32 by the reference dequantization: what every kernel is checked against."""
        w = dequantize(self.gu, torch.float32)
        return w[: self.inter], w[self.inter :], dequantize(self.dn, torch.float32)

    def triton(self, x: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, self.gu, self.dn)

    def fused_gemm(self, x: torch.Tensor) -> torch.Tensor:
        h = tk.gemm(x, self.gu)
        return tk.gemm(F.silu(h[:, : self.inter]) * h[:, self.inter :], self.dn)

    def deq_overlap(self, x: torch.Tensor) -> torch.Tensor:
        return tk.dequant_ffn_overlapped(x, self.gu, self.dn)

    def deq_cublas(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, tk.dequant(self.gu, x.dtype))
        return F.linear(F.silu(h[:, : self.inter]) * h[:, self.inter :], tk.dequant(self.dn, x.dtype))

    def torch_deq(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.gu, x.dtype)
        h = F.linear(x, w)
        return F.linear(F.silu(h[:, : self.inter]) * h[:, self.inter :], dequantize(self.dn, x.dtype))


class Dense:
    def __init__(self, g: torch.Tensor, u: torch.Tensor, d: torch.Tensor):
        self.g, self.u, self.d = g, u, d

    def clone(self) -> Dense:
        return Dense(self.g.clone(), self.u.clone(), self.d.clone())

    @property
    def nbytes(self) -> int:
        return self.g.nbytes + self.u.nbytes + self.d.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.g)) * F.linear(x, self.u), self.d)


def bench_eager(fn, x: torch.Tensor) -> float:
    from triton.testing import do_bench

    return do_bench(lambda: fn(x), warmup=25, rep=100, return_mode="median") * 1000


def bench_graph(make_fn, experts: list, x: torch.Tensor) -> float:
    """Microseconds per expert: one graph runs the FFN of every expert in `experts` once."""
    from triton.testing import do_bench

    fns = [make_fn(e) for e in experts]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: compile kernels, create cuBLAS handles outside the capture
            for fn in fns:
                fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(x) for fn in fns]
    graph.replay()
    torch.cuda.synchronize()
    del outs
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1000 / len(fns)


def rotation(nbytes: int, cap: int | None = 48) -> int:
    """Copies of a weight of nbytes whose bytes exceed twice the L2 (at least 2, at most cap), so a timed
    loop over them reads every weight from HBM."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    need = max(2, math.ceil(2 * l2 / nbytes))
    return need if cap is None else min(cap, need)


def check(name: str, hidden: int, inter: int, dense: tuple, q: dict, report: list) -> bool:
    ok = True
    for rows in (1, 3, 512):
        x = torch.randn(rows, hidden, device="cuda").bfloat16()
        ref_dense = reference(x, tuple(w.float() for w in dense))
        e = rel(Dense(*dense)(x).float(), ref_dense)
        report.append((name, "bf16", rows, "cublas", e, 2e-2))
        for label, qe in q.items():
            w = qe.dequantized()
            ref = reference(x, w)
            for variant, fn, band in (("triton", qe.triton, 1e-2 if rows <= tk.GEMV_MAX_ROWS else 2e-2),
                                      ("deq+cublas", qe.deq_cublas, 2e-2), ("fused-gemm", qe.fused_gemm, 2e-2),
                                      ("deq-overlap", qe.deq_overlap, 2e-2)):
                if rows == 1 and variant in ("fused-gemm", "deq-overlap"):
                    continue
                err = rel(fn(x).float(), ref)
                report.append((name, label, rows, variant, err, band))
                ok &= err < band
    for label, qe in q.items():
        for m in (qe.gu, qe.dn):
            same = torch.equal(tk.dequant(m, torch.bfloat16), dequantize(m, torch.bfloat16))
            report.append((name, label, 0, "dequant kernel bitwise", 0.0 if same else 1.0, 0.5))
            ok &= same
    return ok


def sweep(name: str, qe: Quantized, label: str, hidden: int) -> list[str]:
    from triton.testing import do_bench

    lines = []
    x1 = torch.randn(1, hidden, device="cuda").bfloat16()
    for m, what in ((qe.gu, "gate_up"), (qe.dn, "down")):
        n, k = m.shape
        xin = x1 if what == "gate_up" else torch.randn(1, k, device="cuda").bfloat16()
        best = None
        auto = tk.split_k(n, k, xin.device)
        for bn in (16, 32, 64):
            for bk in (256, 512, 1024):
                for split in sorted({1, max(1, auto // 2), auto, 2 * auto}):
                    if k // bk < split:
                        continue
                    cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4}
                    t = do_bench(lambda c=cfg, xin=xin, m=m: tk.gemv(xin, m, out_dtype=torch.float32, config=c),
                                 rep=50, return_mode="median") * 1000
                    if best is None or t < best[0]:
                        best = (t, cfg)
        t_def = do_bench(lambda xin=xin, m=m: tk.gemv(xin, m, out_dtype=torch.float32), rep=50,
                         return_mode="median") * 1000
        lines.append(f"{name} {label} GEMV {what} {n}x{k}: autotuned (split {auto}) {t_def:.1f} us; swept best "
                     f"{best[1]} {best[0]:.1f} us")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--quick", action="store_true", help="skip the torch-deq variant")
    ap.add_argument("--batches", default="1,512", help="rows of x (1 = decode; the targets read 1 and 512)")
    ap.add_argument("--sweep", action="store_true", help="also time tile configurations")
    ap.add_argument("--out", type=Path, help="write all numbers as JSON here")
    ap.add_argument("--tiles", type=Path,
                    help="GEMV tiles from benchmarks/sweep_gemv.py --tiles, in place of this GPU's tuned file")
    a = ap.parse_args()
    if not torch.cuda.is_available() or not tk.available():
        sys.exit("needs a CUDA GPU and triton")
    if a.tiles:
        tiles = gemv_tiles.read(a.tiles)
        gemv_tiles.use(torch.cuda.get_device_name(), tiles)
        print(f"GEMV tiles from {a.tiles}: {len(tiles)} matrices")
    torch.manual_seed(0)
    method = "hqq" if hqq_available() else "minmax"
    dev = torch.cuda.get_device_name()
    print(f"# {dev}, torch {torch.__version__}, triton {__import__('triton').__version__}, quantizer {method}",
          flush=True)
    rows_out, checks, sweeps = [], [], []
    all_ok = True
    for name in a.shapes.split(","):
        hidden, inter = SHAPES[name]
        t0 = time.perf_counter()
        dense = tuple((torch.randn(s, device="cuda") * 0.02).bfloat16()
                      for s in ((inter, hidden), (inter, hidden), (hidden, inter)))
        q = {}
        for label, bits, group in TIERS:
            layout, buf = quantize_expert(*dense, bits, group, method=method)
            q[label] = Quantized(*layout.packed(buf))
        print(f"{name}: quantized in {time.perf_counter() - t0:.1f} s", flush=True)
        all_ok &= check(name, hidden, inter, dense, q, checks)

        d0 = Dense(*dense)
        r_dense = rotation(d0.nbytes)
        dense_set = [d0] + [d0.clone() for _ in range(r_dense - 1)]
        variants = [("bf16", "cublas", dense_set, lambda e: e)]
        for label, qe in q.items():
            r = rotation(qe.nbytes)
            qs = [qe] + [qe.clone() for _ in range(r - 1)]
            variants.append((label, "triton", qs, lambda e: e.triton))
            variants.append((label, "deq+cublas", qs, lambda e: e.deq_cublas))
            variants.append((label, "fused-gemm", qs, lambda e: e.fused_gemm))
            variants.append((label, "deq-overlap", qs, lambda e: e.deq_overlap))
            if not a.quick:
                variants.append((label, "torch-deq", qs, lambda e: e.torch_deq))
        for batch in (int(b) for b in a.batches.split(",")):
            x = torch.randn(batch, hidden, device="cuda").bfloat16()
            for label, variant, experts, make in variants:
                if batch == 1 and variant in ("fused-gemm", "deq-overlap"):
                    continue
                eager = bench_eager(make(experts[0]), x)
                graph = bench_graph(make, experts, x)
                rows_out.append({"expert": name, "shape": f"{hidden}x{inter}", "batch": batch, "tier": label,
                                 "variant": variant, "eager_us": eager, "graph_us": graph, "rotation": len(experts)})
                print(f"  {name} b{batch} {label} {variant}: eager {eager:.1f} us, graph {graph:.1f} us "
                      f"(R={len(experts)})", flush=True)
            del x
        if a.sweep:
            for label, qe in q.items():
                sweeps += sweep(name, qe, label, hidden)
        del dense_set, variants, q
        torch.cuda.empty_cache()

    print("\n## correctness (relative error vs float32 dequantize-then-matmul)\n")
    print("| expert | tier | batch | kernel | rel. error | band | ok |")
    print("| --- | --- | ---: | --- | ---: | ---: | --- |")
    for name, label, rows, variant, err, band in checks:
        print(f"| {name} | {label} | {rows or '-'} | {variant} | {err:.2e} | {band:.0e} | "
              f"{'yes' if err < band else 'NO'} |")
    if sweeps:
        print("\n## tile sweep\n")
        print("\n".join(sweeps))
    print(f"\n## expert FFN time per expert, {dev} (median us; graph = CUDA-graph replay / R experts)\n")
    print("| expert | batch | tier | kernel | eager us | graph us | graph vs bf16 |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: |")
    base = {(r["expert"], r["batch"]): r["graph_us"] for r in rows_out if r["tier"] == "bf16"}
    for r in rows_out:
        ratio = r["graph_us"] / base[(r["expert"], r["batch"])]
        print(f"| {r['expert']} {r['shape']} | {r['batch']} | {r['tier']} | {r['variant']} | {r['eager_us']:.1f} | "
              f"{r['graph_us']:.1f} | {ratio:.2f}x |")

    def best(expert: str, batch: int, tier: str) -> tuple[float, str]:
        cands = [(r["graph_us"], r["variant"]) for r in rows_out
                 if r["expert"] == expert and r["batch"] == batch and r["tier"] == tier]
        return min(cands)

    print("\n## targets (graph times, best kernel per tier)\n")
    for name in a.shapes.split(","):  # each target needs its batch among --batches
        if (name, 1) in base:
            b1 = base[(name, 1)]
            i4, k4 = best(name, 1, "INT4 g64")
            i2, k2 = best(name, 1, "INT2 g32")
            print(f"- {name}: INT4 batch 1 {i4:.1f} us ({k4}) = {i4 / b1:.2f}x bf16 {b1:.1f} us "
                  f"[target <= 1.5x: {'met' if i4 <= 1.5 * b1 else 'MISSED'}]")
            print(f"- {name}: INT2 batch 1 {i2:.1f} us ({k2}) vs INT4 {i4:.1f} us "
                  f"[target INT2 <= INT4: {'met' if i2 <= i4 * 1.02 else 'MISSED'}]")
        if (name, 512) in base:
            p16 = base[(name, 512)]
            p4, kp = best(name, 512, "INT4 g64")
            print(f"- {name}: INT4 prefill 512 {p4:.1f} us ({kp}) = {p4 / p16:.2f}x bf16 {p16:.1f} us "
                  f"[target <= 1.3x: {'met' if p4 <= 1.3 * p16 else 'MISSED'}]")
    print(f"\ncorrectness: {'all kernels within their bands' if all_ok else 'SOME KERNELS OUT OF BAND'}")
    if a.out:
        a.out.write_text(json.dumps({"device": dev, "rows": rows_out, "checks": checks, "sweep": sweeps}, indent=1))
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
