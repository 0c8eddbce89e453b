"""Peer quantized-linear libraries against Fate's expert-FFN kernels, on one MoE expert FFN on a GPU.

The peers are not dependencies of fate: install them where you run this (`python3 -m pip install bitsandbytes
gemlite hqq`), or, on a GPU machine without network, from wheels in .whl/, next to the repo, not into it:

    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_peer_kernels.py --out peers.json

    [--shapes mixtral,qwen3] [--batches 1,512] [--libs bf16,fate,bnb,gemlite,hqq] [--fuse-gate-up]
    [--gemlite-config FILE] [--gemlite-autotune fast|max|default] [--append]

One expert FFN, down(silu(gate x) * up x), for Mixtral (hidden 4096, intermediate 14336) and Qwen3-30B-A3B
(2048, 768), random bf16 weights N(0, 0.02), bf16 activations, batch (rows) 1 and 512. Rows:

- torch bf16: three cuBLAS F.linear (benchmarks/bench_kernels.py's Dense), the reference speed.
- fate INT4 g64 / INT2 g32: quant.kernels.expert_ffn on the packed gate_up and down of
  quant.hqq_quant.quantize_expert(..., method="minmax") (what the runtime runs: fused GEMVs at batch 1,
  dequantize + cuBLAS above).
- bitsandbytes: bitsandbytes.nn.Linear4bit per matrix, compute dtype bf16, blocksize 64 (Params4bit's
  default): "nf4 b64" (fp32 absmax per 64 weights: 4.5 bits/weight, like ours), "nf4 b64 dq" (the library
  default compress_statistics=True: the absmax double-quantized) and "fp4 b64". bitsandbytes quantizes the
  bf16 weights itself (absmax onto its nf4/fp4 code book); it takes no integer codes.
- gemlite: GemLiteLinear(W_nbits, group_size, ..., input/output DType.BF16).pack(W_q, scales, zeros), 4-bit
  g64 and 2-bit g32, fed the SAME min-max codes, scales and zeros as the fate rows (gemlite follows HQQ's
  convention W ~ (W_q - zeros) * scales, which is ours); the fp16 scales and zeros are cast to bf16 (gemlite's
  meta dtype follows the activations), so its weights differ from ours by that rounding only.
- hqq: hqq.core.quantize.HQQLinear with its default pytorch backend (dequantize to bf16, then torch.matmul),
  4-bit g64 and 2-bit g32, quantized by HQQ itself (BaseQuantizeConfig: axis 1, its optimiser, zero rounded
  at 4 bits), so its codes are not ours.

Peers run gate, up and down as three linears (--fuse-gate-up: one [2I, H] gate_up linear and down, like
the fate layout). Each peer library is optional: one that does not import prints one line and is skipped.

Times (microseconds per expert FFN, median of triton.testing.do_bench, the helpers of bench_kernels.py):
eager = one FFN call with the L2 flushed before each; graph = one CUDA graph that runs the FFN of R distinct
copies of the expert (R such that their weights exceed the L2 twice over), replay time / R. A row that fails
(build, call, or capture) is reported as "n/a: <reason>" and the script goes on.

Correctness: ||y - ref|| / ||ref|| against a float32 FFN on the same x, twice: "own deq" = the library's
own dequantized weights (fate: quant.packing.dequantize; bitsandbytes: bitsandbytes.functional.dequantize_4bit;
hqq: HQQLinear.dequantize(); gemlite: the fate codes with the bf16 scale and bf16 offset -zero * scale that its
pack() keeps; bf16: the weights), which measures the kernel; "bf16 W" = the original bf16 weights, which adds
the quantization error.

--gemlite-config FILE loads gemlite's autotune results from FILE if it exists and saves them there at the
end, so a second run skips gemlite's (slow) Triton autotuning; --gemlite-autotune sets its autotune mode
(library default: fast). --out writes every number as JSON, rewritten after each row, so a run cut short
keeps what it measured; with --append the rows already in that file stay (a row measured again replaces its
old one) and the table shows them all, so a run too long for one call can be split by --libs / --shapes:

    export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/bench_peer_kernels.py --libs bf16,fate,bnb,hqq --out /tmp/peers.json
    python3 benchmarks/bench_peer_kernels.py --libs gemlite --gemlite-config /tmp/gemlite_tune.json \\
        --out /tmp/peers.json --append
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from quant import triton_kernels as tk
from quant.hqq_quant import quantize_expert
from quant.packing import PackedMatrix, expand_groups, unpack_codes

import bench_kernels as bk  # benchmarks/bench_kernels.py: shapes, tiers and timing shared by the kernel benchmarks

# benchmarks/bench_kernels.py's pieces: the same shapes, tiers, experts, timing and error measure
SHAPES, TIERS, Dense, Quantized, reference, rel = bk.SHAPES, bk.TIERS, bk.Dense, bk.Quantized, bk.reference, bk.rel
bench_eager, bench_graph, rotation = bk.bench_eager, bk.bench_graph, bk.rotation

LIBS = ("bf16", "fate", "bnb", "gemlite", "hqq")
PEERS = {"bnb": ("bitsandbytes", "bitsandbytes"), "gemlite": ("gemlite", "gemlite"), "hqq": ("hqq", "hqq")}
BNB_FORMATS = (("nf4 b64", "nf4", False), ("nf4 b64 dq", "nf4", True), ("fp4 b64", "fp4", False))
BNB_BLOCK = 64

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I, H], up [I, H], down [H, I]
Linear = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], torch.Tensor], int]  # module, its W, bytes


def why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:150] if lines else ''}".rstrip(": ")


def cuda_ok() -> bool:
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2.0
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------- peer imports


def import_peer(key: str) -> tuple[ModuleType | None, str]:
    """(module, version) or (None, one-line reason). Imported only on a CUDA machine: gemlite queries the GPU."""
    dist, modname = PEERS[key]
    try:
        mod = importlib.import_module(modname)
        if key == "hqq":
            mod = importlib.import_module("hqq.core.quantize")
    except ModuleNotFoundError as e:
        if e.name and modname.startswith(e.name):
            return None, f"not installed ({why(e)})"
        return None, f"import failed ({why(e)})"
    except Exception as e:  # a wheel built for another torch / triton / CUDA can fail in many ways
        return None, f"import failed ({why(e)})"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(sys.modules.get(dist), "__version__", "unknown"))
    return mod, version


# ------------------------------------------------------------------------------- library-specific linears


def bnb_linear(bnb: ModuleType, w: torch.Tensor, quant_type: str, double_quant: bool) -> Linear:
    """bitsandbytes.nn.Linear4bit holding w [out, in] (bf16, on the GPU), quantized by bitsandbytes."""
    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16,
                            compress_statistics=double_quant, quant_type=quant_type, device="meta")
    # Params4bit.to(device) quantizes (bitsandbytes.functional.quantize_4bit) when not yet quantized
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=BNB_BLOCK, compress_statistics=double_quant,
                                   quant_type=quant_type, module=lin).to(w.device)
    qs = lin.weight.quant_state
    nbytes = lin.weight.data.nbytes + qs.absmax.nbytes + (qs.state2.absmax.nbytes if qs.nested else 0)
    return lin, lambda: bnb.functional.dequantize_4bit(lin.weight.data, qs), nbytes


def gemlite_linear(gemlite: ModuleType, m: PackedMatrix) -> Linear:
    """gemlite.GemLiteLinear fed our codes / scales / zeros (HQQ convention: W ~ (W_q - zeros) * scales)."""
    out_f, in_f = m.shape
    lin = gemlite.GemLiteLinear(m.bits, group_size=m.group_size, in_features=in_f, out_features=out_f,
                                input_dtype=gemlite.DType.BF16, output_dtype=gemlite.DType.BF16)
    scale, zero = m.scale.to(torch.bfloat16), m.zero.to(torch.bfloat16)
    lin.pack(unpack_codes(m.codes, m.bits, in_f), scale, zero, bias=None)
    nbytes = sum(t.nbytes for t in (lin.W_q, lin.scales, lin.zeros))
    return lin, lambda: gemlite_weights(m, scale, zero), nbytes


def gemlite_weights(m: PackedMatrix, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The weights gemlite holds, in float32: pack() (default fma_mode) keeps the bf16 scale and a bf16 offset
    -zero * scale, and its kernels compute W = W_q * scale + offset."""
    cols = m.shape[1]
    s = expand_groups(scale.float(), m.group_size, cols)
    offset = expand_groups((-zero.float() * scale.float()).to(torch.bfloat16).float(), m.group_size, cols)
    return unpack_codes(m.codes, m.bits, cols).float() * s + offset


def hqq_linear(hqq: ModuleType, w: torch.Tensor, bits: int, group: int) -> Linear:
    """hqq.core.quantize.HQQLinear of w [out, in], quantized by HQQ (its optimiser), pytorch backend."""
    cfg = hqq.BaseQuantizeConfig(nbits=bits, group_size=group)
    lin = hqq.HQQLinear.from_weights(w, None, cfg, compute_dtype=torch.bfloat16, device=str(w.device))
    nbytes = lin.W_q.nbytes + sum(t.nbytes for t in lin.meta.values() if isinstance(t, torch.Tensor))
    return lin, lin.dequantize, nbytes


# ------------------------------------------------------------------------------------------------ experts


class LinearExpert:
    """down(silu(gate x) * up x) from per-matrix callables: (gate, up, down) or (gate_up, down)."""

    def __init__(self, mods: list, inter: int, nbytes: int):
        self.mods, self.inter, self.nbytes = mods, inter, nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.mods) == 3:
            g, u, d = self.mods
            return d(F.silu(g(x)) * u(x))
        gu, d = self.mods
        h = gu(x)
        return d(F.silu(h[:, : self.inter]) * h[:, self.inter :])


@dataclass
class Built:
    fn: Callable[[torch.Tensor], torch.Tensor]
    nbytes: int
    deq: Callable[[], Weights] | None  # the library's own dequantized weights (float32); None: the bf16 weights


def linear_expert(make: Callable[[object], Linear], mats: tuple, inter: int) -> Built:
    parts = [make(m) for m in mats]
    expert = LinearExpert([p[0] for p in parts], inter, sum(p[2] for p in parts))

    def deq() -> Weights:
        ws = [p[1]().float() for p in parts]
        return (ws[0][:inter], ws[0][inter:], ws[1]) if len(ws) == 2 else tuple(ws)

    return Built(expert, expert.nbytes, deq)


@dataclass
class Entry:
    library: str
    fmt: str
    build: Callable[[int], Built]  # copy i of the expert (independent memory for every i)


def entries(lib: str, mod: ModuleType | None, dense: Weights, q: dict[str, Quantized], fuse: bool) -> list[Entry]:
    inter = dense[0].shape[0]
    if lib == "bf16":
        d0 = Dense(*dense)

        def bf16(i: int) -> Built:
            d = d0 if i == 0 else d0.clone()
            return Built(d, d.nbytes, None)

        return [Entry("torch", "bf16 (cuBLAS)", bf16)]
    if lib == "fate":
        out = []
        for label, qe0 in q.items():
            def fate(i: int, qe0: Quantized = qe0) -> Built:
                qe = qe0 if i == 0 else qe0.clone()
                return Built(qe.triton, qe.nbytes, qe.dequantized)

            out.append(Entry("fate", f"{label} min-max", fate))
        return out
    gate, up, down = dense
    mats = (torch.cat([gate, up]), down) if fuse else dense
    if lib == "bnb":
        return [Entry("bitsandbytes", label,
                      lambda i, qt=qt, dq=dq: linear_expert(lambda w: bnb_linear(mod, w, qt, dq), mats, inter))
                for label, qt, dq in BNB_FORMATS]
    if lib == "gemlite":
        out = []
        for label, qe in q.items():
            packed = (qe.gu, qe.dn) if fuse else (qe.gu.rows(0, inter), qe.gu.rows(inter, 2 * inter), qe.dn)
            out.append(Entry("gemlite", f"{label} (fate codes)",
                             lambda i, p=packed: linear_expert(lambda m: gemlite_linear(mod, m), p, inter)))
        return out
    if lib == "hqq":
        return [Entry("hqq", f"{label} (hqq opt)",
                      lambda i, b=bits, g=group: linear_expert(lambda w: hqq_linear(mod, w, b, g), mats, inter))
                for label, bits, group in TIERS]
    raise ValueError(lib)


# ---------------------------------------------------------------------------------------------- measuring


class CudaBroken(Exception):
    """A failure left the CUDA context unusable: nothing after it can be measured."""


def measure(entry: Entry, name: str, shape: str, xs: dict[int, torch.Tensor], refs: dict[int, torch.Tensor],
            emit: Callable[[dict], None]) -> None:
    """All batches of one entry: build R copies, check, time eager and graph; the copies go when it returns."""
    base = {"expert": name, "shape": shape, "library": entry.library, "format": entry.fmt}
    t0 = time.perf_counter()
    try:
        experts = [entry.build(0)]
        experts += [entry.build(i) for i in range(1, rotation(experts[0].nbytes))]
        torch.cuda.synchronize()
    except Exception as e:
        for batch in xs:
            emit({**base, "batch": batch, "error": f"build: {why(e)}"})
        if not cuda_ok():
            raise CudaBroken(f"CUDA unusable after building {entry.library} {entry.fmt}") from e
        return
    first = experts[0]
    info = {"rotation": len(experts), "nbytes": first.nbytes, "build_s": time.perf_counter() - t0}
    own, err_ref = None, "bf16 W"  # the reference of rel_err: the bf16 weights unless the library dequantizes
    if first.deq is not None:
        try:
            own, err_ref = first.deq(), "own deq"
        except Exception as e:
            err_ref = f"dequantize failed: {why(e)}"
    for batch, x in xs.items():
        row = {**base, "batch": batch, **info, "err_ref": err_ref}
        try:
            y = first.fn(x).float()
            row["rel_err_w"] = rel(y, refs[batch])
            if own is not None:
                row["rel_err"] = rel(y, reference(x, own))
            elif first.deq is None:
                row["rel_err"] = row["rel_err_w"]
            del y
        except Exception as e:
            row["call_error"] = why(e)
        for kind, run in (("eager", lambda x=x: bench_eager(first.fn, x)),
                          ("graph", lambda x=x: bench_graph(lambda b: b.fn, experts, x))):
            try:
                row[f"{kind}_us"] = run()
            except Exception as e:
                row[f"{kind}_error"] = why(e)
                if not cuda_ok():
                    row[f"{kind}_error"] += " (CUDA context broken)"
                    emit(row)
                    raise CudaBroken(f"CUDA unusable after {entry.library} {entry.fmt} {kind}") from e
        emit(row)


# ------------------------------------------------------------------------------------------------- output


def cell(row: dict, kind: str) -> str:
    if f"{kind}_us" in row:
        return f"{row[f'{kind}_us']:.1f}"
    reason = row.get(f"{kind}_error") or row.get("error") or row.get("call_error") or "not run"
    return f"n/a: {reason}"


def err_cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def table(rows: list[dict], dev: str) -> str:
    base = {(r["expert"], r["batch"]): r["graph_us"] for r in rows if r["library"] == "torch" and "graph_us" in r}
    out = [f"## expert FFN time per expert, {dev} (median us; graph = CUDA-graph replay / R distinct copies)", "",
           "| expert | batch | library | format | eager us | graph us | graph vs bf16 | rel. err (own deq) "
           "| rel. err (bf16 W) |",
           "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    order = {lib: i for i, lib in enumerate(("torch", "fate", "bitsandbytes", "gemlite", "hqq"))}
    for r in sorted(rows, key=lambda r: (r["expert"] != "mixtral", r["expert"], r["batch"], order[r["library"]])):
        b = base.get((r["expert"], r["batch"]))
        ratio = f"{r['graph_us'] / b:.2f}x" if b and "graph_us" in r else "-"
        own = err_cell(r.get("rel_err"))
        if r.get("err_ref", "").startswith("dequantize failed"):
            own = f"n/a: {r['err_ref']}"
        out.append(f"| {r['expert']} {r['shape']} | {r['batch']} | {r['library']} | {r['format']} | {cell(r, 'eager')} "
                   f"| {cell(r, 'graph')} | {ratio} | {own} | {err_cell(r.get('rel_err_w'))} |")
    out += ["", "own deq: fate: quant.packing.dequantize of its min-max codes; gemlite: the same codes with the bf16 "
            "scale and bf16 offset -zero * scale its pack() keeps; bitsandbytes: "
            "bitsandbytes.functional.dequantize_4bit; hqq: HQQLinear.dequantize(); torch: the bf16 weights. "
            "bf16 W: the original weights (adds the quantization error)."]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- main


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--batches", default="1,512")
    ap.add_argument("--libs", default=",".join(LIBS), help=f"subset of {','.join(LIBS)}")
    ap.add_argument("--fuse-gate-up", action="store_true", help="peers run one [2I, H] gate_up linear, not two")
    ap.add_argument("--gemlite-config", type=Path, help="gemlite autotune cache: loaded if present, saved at the end")
    ap.add_argument("--gemlite-autotune", choices=("fast", "max", "default"), help="gemlite autotune mode")
    ap.add_argument("--out", type=Path, help="write all numbers as JSON here")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in --out that this run does not measure again (split a long run)")
    a = ap.parse_args()
    shapes = a.shapes.split(",")
    batches = [int(b) for b in a.batches.split(",")]
    libs = a.libs.split(",")
    for bad in [s for s in shapes if s not in SHAPES] + [lib for lib in libs if lib not in LIBS]:
        sys.exit(f"unknown shape or library {bad!r}: shapes {','.join(SHAPES)}, libraries {','.join(LIBS)}")
    if not torch.cuda.is_available() or not tk.available():
        sys.exit("needs a CUDA GPU and triton")

    dev = torch.cuda.get_device_name()
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": __import__("triton").__version__}
    status, mods = {}, {}
    for lib in libs:
        if lib in PEERS:
            mod, info = import_peer(lib)
            if mod is None:
                status[lib] = info
            else:
                mods[lib], versions[PEERS[lib][0]] = mod, info
    print(f"# {dev}, " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    for lib, info in status.items():
        print(f"{PEERS[lib][0]}: {info}", flush=True)
    if "hqq" in mods:
        mods["hqq"].HQQLinear.set_backend(mods["hqq"].HQQBackend.PYTORCH)  # the default, made explicit
    if "gemlite" in mods:
        gl = mods["gemlite"]
        if a.gemlite_autotune:
            gl.set_autotune(a.gemlite_autotune)
        if a.gemlite_config and a.gemlite_config.exists():
            gl.load_config(str(a.gemlite_config))
        else:
            print("gemlite: autotunes its Triton kernels on each new shape (slow); --gemlite-config FILE keeps that",
                  flush=True)

    rows: list[dict] = []
    if a.append and a.out and a.out.exists():
        rows = json.loads(a.out.read_text()).get("rows", [])

    def key(r: dict) -> tuple:
        return r["expert"], r["batch"], r["library"], r["format"]

    def save() -> None:
        if a.out:
            a.out.write_text(json.dumps({"device": dev, "versions": versions, "skipped": status,
                                         "fuse_gate_up": a.fuse_gate_up, "rows": rows}, indent=1))

    def emit(row: dict) -> None:
        row["device"] = dev
        rows[:] = [r for r in rows if key(r) != key(row)] + [row]
        print(f"  {row['expert']} b{row['batch']} {row['library']} {row['format']}: eager {cell(row, 'eager')}, "
              f"graph {cell(row, 'graph')} (R={row.get('rotation', '-')}), rel. err {err_cell(row.get('rel_err'))} "
              f"(own), {err_cell(row.get('rel_err_w'))} (bf16 W)", flush=True)
        save()

    broken = False
    for name in shapes:
        hidden, inter = SHAPES[name]
        torch.manual_seed(list(SHAPES).index(name))  # the same weights and inputs whichever shapes and libs run
        shape = f"{hidden}x{inter}"
        t0 = time.perf_counter()
        dense = tuple((torch.randn(s, device="cuda") * 0.02).bfloat16()
                      for s in ((inter, hidden), (inter, hidden), (hidden, inter)))
        q = {}
        if "fate" in libs or "gemlite" in mods:
            for label, bits, group in TIERS:
                layout, buf = quantize_expert(*dense, bits, group, method="minmax")
                q[label] = Quantized(*layout.packed(buf))
        print(f"{name}: weights and min-max codes in {time.perf_counter() - t0:.1f} s", flush=True)
        xs = {b: torch.randn(b, hidden, device="cuda").bfloat16() for b in batches}
        dense_f32 = tuple(w.float() for w in dense)
        refs = {b: reference(x, dense_f32) for b, x in xs.items()}
        del dense_f32
        for lib in libs:
            if lib in PEERS and lib not in mods:
                continue
            for entry in entries(lib, mods.get(lib), dense, q, a.fuse_gate_up):
                try:
                    measure(entry, name, shape, xs, refs, emit)
                except CudaBroken as e:
                    print(f"stopping: {e}", flush=True)
                    broken = True
                    break
                finally:
                    gc.collect()
                    torch.cuda.empty_cache()
            if broken:
                break
        del dense, q, xs, refs
        gc.collect()
        torch.cuda.empty_cache()
        if broken:
            break

    if "gemlite" in mods and a.gemlite_config:
        try:
            mods["gemlite"].cache_config(str(a.gemlite_config))
        except Exception as e:
            print(f"gemlite: could not save its autotune cache ({why(e)})")
    print()
    for lib, info in status.items():
        print(f"- {PEERS[lib][0]}: {info}")
    print(f"- peers run gate_up as {'one fused linear' if a.fuse_gate_up else 'two linears (gate, up)'}\n")
    print(table(rows, dev))
    save()
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
