"""Ways to run a large expert's FFN over many rows (prefill) from a packed tier, timed side by side on a GPU.

    python3 scripts/prefill_variants.py [--shape mixtral] [--rows 512] [--out FILE.json]

Dequantize + cuBLAS writes every weight to HBM in bf16 and reads it back (for a Mixtral expert at INT4, 352 MB
written against 88 MB of codes), and cuBLAS fills the GPU, so dequantizing on a side stream
(quant/triton_kernels.py `_dequant_ffn_overlapped`) hides little of it. Variants here, each checked against
float32 dequantize-then-matmul and timed as a CUDA graph over copies of the expert exceeding the L2 twice
(scripts/bench_kernels.py's bench_graph):

- bf16: three cuBLAS products on 16-bit weights (the reference time);
- runtime: quant.triton_kernels.expert_ffn (what prefill runs);
- deq+cublas: dequantize all three matrices, then three products, one stream;
- chunked C/D: gate|up dequantized C rows of gate and C of up at a time into a reused buffer (so the
  bf16 chunk can stay in L2 between its write and the product that reads it), down D input columns at a
  time, each chunk's product accumulated in float32;
- piped C/D: the same chunks, chunk i + 1 dequantized on a side stream while chunk i's product runs
  (three buffers in turn);
- carveout S: the runtime's overlapped path with cuBLAS told to leave S multiprocessors free
  (torch._C._set_sm_carveout_experimental), where this torch has it;
- wgmma S/X/ST: quant/hopper_gemm.py (Hopper only): two warpgroups dequantize W into their wgmma A registers
  while a loader warp brings x and the packed words by TMA; tiles of 128 W rows by X rows of x, a ring of ST
  steps, down's K in S parts (gate|up's whole, as in the runtime); each matrix is also timed alone, beside cuBLAS
  on its bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import hopper_gemm as hg  # noqa: E402
from quant import triton_kernels as tk  # noqa: E402
from quant.hqq_quant import quantize_matrix  # noqa: E402
from quant.packing import PackedMatrix, codes_per_word, dequantize  # noqa: E402

try:
    from scripts import bench_kernels as bk  # noqa: E402
except ImportError:  # a `scripts` package elsewhere on sys.path shadows the repo's
    import bench_kernels as bk  # noqa: E402


def dequant_cols(w: PackedMatrix, k0: int, k1: int, out: torch.Tensor) -> torch.Tensor:
    """W[:, k0:k1] in out's dtype (a column slice: strided rows of codes, scales and zeros)."""
    cpw = codes_per_word(w.bits)
    codes = w.codes[:, k0 // cpw : k1 // cpw]
    scale = w.scale[:, k0 // w.group_size : k1 // w.group_size]
    zero = w.zero[:, k0 // w.group_size : k1 // w.group_size]
    n, k = out.shape
    block_k = max(256, w.group_size)
    tk._dequant_kernel[(tk.triton.cdiv(n, 32), tk.triton.cdiv(k, block_k))](
        codes, scale, zero, out, n, k, codes.stride(0), scale.stride(0),
        BITS=w.bits, GROUP=w.group_size, BLOCK_N=32, BLOCK_K=block_k, num_warps=4)
    return out


def mm_f32(a: torch.Tensor, b_t: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    """acc + a @ b_t.T in float32 (bf16 operands): torch.mm's out_dtype where this torch has it."""
    try:
        part = torch.mm(a, b_t.t(), out_dtype=torch.float32)
    except (TypeError, NotImplementedError, RuntimeError):  # no bf16 -> float32 product here
        part = torch.mm(a, b_t.t()).float()
    return part if acc is None else acc.add_(part)


class Chunked:
    """gate|up C rows (of each) at a time, down D columns at a time, through reused bf16 buffers; with
    piped, chunk i + 1 is dequantized on a side stream while chunk i's product runs."""

    def __init__(self, gu: PackedMatrix, dn: PackedMatrix, c: int, d: int, piped: bool, dtype: torch.dtype):
        self.gu, self.dn, self.c, self.d, self.piped = gu, dn, c, d, piped
        self.inter, self.hidden = dn.shape[1], dn.shape[0]
        dev = gu.codes.device
        nbuf = 3 if piped else 1
        self.gu_bufs = [torch.empty(2 * c, self.hidden, device=dev, dtype=dtype) for _ in range(nbuf)]
        self.dn_bufs = [torch.empty(self.hidden, d, device=dev, dtype=dtype) for _ in range(nbuf)]
        self.side = torch.cuda.Stream(device=dev) if piped else None

    def _gu_fill(self, i: int, buf: torch.Tensor) -> None:
        c0 = i * self.c
        tk.dequant(self.gu.rows(c0, c0 + self.c), buf.dtype, out=buf[: self.c])
        tk.dequant(self.gu.rows(self.inter + c0, self.inter + c0 + self.c), buf.dtype, out=buf[self.c :])

    def _dn_fill(self, i: int, buf: torch.Tensor) -> None:
        dequant_cols(self.dn, i * self.d, (i + 1) * self.d, buf)

    def _run(self, steps: list, fills: list) -> None:
        """steps[i](buf) consumes what fills[i](buf) wrote."""
        if not self.piped:
            for fill, step in zip(fills, steps):
                fill()
                step()
            return
        main = torch.cuda.current_stream()
        ready = []
        self.side.wait_stream(main)
        done_with = [None] * 3  # event: main finished reading buffer b
        for i, fill in enumerate(fills):  # the side stream runs ahead up to three buffers
            with torch.cuda.stream(self.side):
                if done_with[i % 3] is not None:
                    self.side.wait_event(done_with[i % 3])
                fill()
                ev = torch.cuda.Event()
                ev.record(self.side)
                ready.append(ev)
            main.wait_event(ready[i])
            steps[i]()
            done = torch.cuda.Event()
            done.record(main)
            done_with[i % 3] = done
        main.wait_stream(self.side)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.empty(x.shape[0], self.inter, device=x.device, dtype=x.dtype)
        n_gu = self.inter // self.c
        nb = len(self.gu_bufs)

        def gu_step(i: int) -> None:
            buf = self.gu_bufs[i % nb]
            hc = F.linear(x, buf)
            c0 = i * self.c
            h[:, c0 : c0 + self.c] = F.silu(hc[:, : self.c]) * hc[:, self.c :]

        self._run([lambda i=i: gu_step(i) for i in range(n_gu)],
                  [lambda i=i: self._gu_fill(i, self.gu_bufs[i % nb]) for i in range(n_gu)])
        acc = [None]
        n_dn = self.inter // self.d

        def dn_step(i: int) -> None:
            acc[0] = mm_f32(h[:, i * self.d : (i + 1) * self.d], self.dn_bufs[i % nb], acc[0])

        self._run([lambda i=i: dn_step(i) for i in range(n_dn)],
                  [lambda i=i: self._dn_fill(i, self.dn_bufs[i % nb]) for i in range(n_dn)])
        return acc[0].to(x.dtype)


def carveout_fn(sms: int):  # noqa: ANN201
    def run(gu: PackedMatrix, dn: PackedMatrix, x: torch.Tensor) -> torch.Tensor:
        torch._C._set_sm_carveout_experimental(sms)
        try:
            return tk._dequant_ffn_overlapped(x, gu, dn)
        finally:
            torch._C._set_sm_carveout_experimental(None)
    return run


WS_KEYS = ("split", "block_x", "stages")


def wgmma_ffn(inter: int, cfg: dict):  # noqa: ANN201
    def make(w: tuple[PackedMatrix, PackedMatrix]):  # noqa: ANN202
        def run(xin: torch.Tensor) -> torch.Tensor:
            h = hg.gemm(xin, w[0], **{**cfg, "split": 1})  # the split is for down, whose W has few tiles
            return hg.gemm(hg.interleave(h, w[1].bits, act=True), w[1], **cfg, interleaved=True)
        return run
    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="mixtral")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--tiers", default="4:64,2:32")
    ap.add_argument("--chunks", default="2048/3584,1024/2048,3584/7168")
    ap.add_argument("--carveouts", default="16,32")
    ap.add_argument("--wgmma", default="2/256/5", help="S/X/ST: splits of down's K, rows of x per tile, ring "
                    "slots (the default: what the runtime runs on Mixtral at 512 rows)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    hidden, inter = bk.SHAPES[args.shape]
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.shape} {hidden}x{inter}, "
          f"{args.rows} rows", flush=True)
    g, u, d = (torch.randn(n, k, device=dev) * 0.02 for n, k in ((inter, hidden), (inter, hidden), (hidden, inter)))
    x = torch.randn(args.rows, hidden, device=dev).bfloat16()
    results = []
    dense = (g.bfloat16(), u.bfloat16(), d.bfloat16())
    dense_copies = [dense] + [tuple(t.clone() for t in dense) for _ in range(bk.rotation(3 * g.numel() * 2) - 1)]
    bf16_us = bk.bench_graph(
        lambda w: lambda xin: F.linear(F.silu(F.linear(xin, w[0])) * F.linear(xin, w[1]), w[2]), dense_copies, x)
    print(f"bf16 cublas: {bf16_us:.1f} us", flush=True)
    results.append({"variant": "bf16", "us": bf16_us})
    for tier in args.tiers.split(","):
        bits, group = (int(v) for v in tier.split(":"))
        gu = quantize_matrix(torch.cat([g, u]), bits, group, method="minmax")
        dn = quantize_matrix(d, bits, group, method="minmax")
        wg = dequantize(gu, torch.float32)
        ref = F.linear(F.silu(F.linear(x.float(), wg[:inter])) * F.linear(x.float(), wg[inter:]),
                       dequantize(dn, torch.float32))
        del wg
        copies = [(gu, dn)] + [(gu.map(torch.clone), dn.map(torch.clone))
                               for _ in range(bk.rotation(gu.nbytes + dn.nbytes) - 1)]
        variants = {
            "runtime": lambda w: lambda xin: tk.expert_ffn(xin, *w),
            "deq+cublas": lambda w: lambda xin: F.linear(
                F.silu(F.linear(xin, tk.dequant(w[0].rows(0, inter)))) * F.linear(
                    xin, tk.dequant(w[0].rows(inter, 2 * inter))), tk.dequant(w[1])),
        }
        for spec in filter(None, args.chunks.split(",")):
            c, dd = (int(v) for v in spec.split("/"))
            if inter % c or inter % dd or dd % group:
                continue
            for piped in (False, True):
                name = f"{'piped' if piped else 'chunked'} {c}/{dd}"
                variants[name] = lambda w, c=c, dd=dd, piped=piped: Chunked(w[0], w[1], c, dd, piped, x.dtype)
        if hasattr(torch._C, "_set_sm_carveout_experimental"):
            for sms in (int(v) for v in args.carveouts.split(",") if v):
                variants[f"carveout {sms}"] = lambda w, sms=sms: lambda xin, w=w: carveout_fn(sms)(w[0], w[1], xin)
        else:
            print("no torch._C._set_sm_carveout_experimental in this torch: carveout variants skipped")
        wgmma = [dict(zip(WS_KEYS, (int(v) for v in spec.split("/"))))
                 for spec in args.wgmma.split(",") if spec]
        if wgmma and not hg.available(dev):
            print("not a Hopper GPU, or no Gluon in this Triton: wgmma variants skipped")
            wgmma = []
        for cfg in wgmma:
            variants["wgmma " + "/".join(map(str, cfg.values()))] = wgmma_ffn(inter, cfg)
        for name, make in variants.items():
            try:
                err = bk.rel(make(copies[0])(x), ref)
                us = bk.bench_graph(make, copies, x)
            except Exception as exc:  # a variant this torch or GPU cannot run: say so, go on
                print(f"INT{bits} g{group} {name}: failed: {type(exc).__name__}: {exc}"[:300], flush=True)
                continue
            print(f"INT{bits} g{group} {name}: {us:.1f} us ({us / bf16_us:.2f}x bf16), rel. err {err:.2e}",
                  flush=True)
            results.append({"variant": name, "bits": bits, "group": group, "us": us, "vs_bf16": us / bf16_us,
                            "rel_err": err})
        h = torch.randn(args.rows, inter, device=dev).bfloat16()
        for i, (what, inp) in enumerate((("gate|up", x), ("down", h))):
            mats = [torch.cat(w[:2]) if i == 0 else w[2] for w in dense_copies[:4]] if bits == 4 else []
            cublas = bk.bench_graph(lambda w: lambda xi: F.linear(xi, w), mats, inp) if mats else None
            del mats
            for cfg in wgmma:
                run = {**cfg, "split": 1} if i == 0 else cfg  # gate|up whole, as in wgmma_ffn
                us = bk.bench_graph(lambda w, i=i, run=run: lambda xi: hg.gemm(xi, w[i], **run), copies, inp)
                name = "wgmma " + "/".join(map(str, cfg.values()))
                print(f"INT{bits} g{group} {what} alone: {name} {us:.1f} us"
                      + (f", cuBLAS bf16 {cublas:.1f} us" if cublas else ""), flush=True)
                results.append({"variant": f"{name} {what}", "bits": bits, "group": group, "us": us,
                                "cublas_bf16_us": cublas})
        del copies
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
