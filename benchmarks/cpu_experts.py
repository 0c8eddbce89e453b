"""CPU expert kernels against the host's memory bandwidth: one expert FFN at batch 1 (and a few tokens) per
tier and kernel, per thread count, and (with --decode) a model's decode tokens/s on --device cpu.

    python3 benchmarks/cpu_experts.py                         # threads: every core, then half of them
    python3 benchmarks/cpu_experts.py --threads 16,8 --decode synthetic:qwen3-30b-a3b
    python3 benchmarks/cpu_experts.py --threads 16,8,1 --tiers int4-g64 --no-library --gap-us 500   # as in decode

Shape: a Qwen3-30B-A3B expert (hidden 2048, expert width 768) unless --hidden/--inter say otherwise. Each kernel
cycles through a pool of distinct random experts larger than --pool-mb (default 1 GiB), so every call reads its
weights from RAM, not from a cache, as a decode step does. Bandwidth, measured in the same run with the same
threads: `copy` = bytes / time of a plain copy (torch's copy_, which reads and writes that many bytes: the
read+write rate is twice it), `read` = bytes / time of a float32 sum (reads only). `floor us` = the expert's
bytes / `read`; `x floor` = time / floor (1.0: the kernel reads at the host's read rate).

Kernels (what each reads is in quant/README.md):
- `fate`: quant/cpu_experts.cpu_moe (quant/cpu_kernels.py, numba), float32, straight from the tier's buffer;
- `reference`: quant/cpu_experts.cpu_moe_reference (dequantize + matmul; a few calls only: it is slow);
- `torch-int4` : torch._weight_int4pack_mm_for_cpu with bfloat16 activations (its vectorized case) on the
  same codes, converted once into torch's layout (the conversion's time and bytes are printed);
- `torch-int8`: torch._weight_int8pack_mm (one scale per row, no groups: not fate's INT8 g64, shown for scale);
- `torch-bf16` / `torch-f32`: F.linear on plain 16-bit / 32-bit weights;
- `bnb-nf4`: bitsandbytes' 4-bit matmul on the CPU (NF4, blocks of 64), where bitsandbytes is installed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from fate_cli.model.threads import use_threads
from quant import cpu_experts, cpu_kernels
from quant.layout import ExpertLayout
from quant.synthetic import random_dense, random_quantized

GiB = 1024**3


def bandwidth(nbytes: int, repeats: int = 5) -> tuple[float, float]:
    """(copy GB/s, read GB/s) with torch's current threads: best of `repeats`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best_copy = best_read = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        best_read = min(best_read, time.perf_counter() - t)
    return nbytes / best_copy / 1e9, nbytes / best_read / 1e9


GAP_S = 0.0  # --gap-us: the host busy this long between calls, as between a decode step's layers


def time_pool(fn, pool: list, calls: int) -> float:  # noqa: ANN001 - fn(item) runs one expert
    """Median seconds per call over `calls` calls cycling through the pool (one warm pass first)."""
    for item in pool[: min(len(pool), 8)]:
        fn(item)
    times = []
    for i in range(calls):
        item = pool[i % len(pool)]
        if GAP_S:
            until = time.perf_counter() + GAP_S
            while time.perf_counter() < until:  # busy, as the host is with the step's other work
                pass
        t = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def pool_size(expert_bytes: int, pool_mb: int) -> int:
    return max(2, -(-pool_mb * 2**20 // expert_bytes))


def fate_rows(hidden: int, inter: int, tokens: int, pool_mb: int, calls: int, tiers: list[str]) -> list[tuple]:
    """(kernel, tier, bytes, seconds per expert) for fate's kernels and the reference."""
    layouts = {
        "int4-g64": ExpertLayout.quantized(hidden, inter, 4, 64),
        "int2-g32": ExpertLayout.quantized(hidden, inter, 2, 32),
        "int8-g64": ExpertLayout.quantized(hidden, inter, 8, 64),
        "bf16": ExpertLayout.dense(hidden, inter, "bfloat16"),
    }
    unknown = sorted(set(tiers) - set(layouts))
    if unknown:
        raise SystemExit(f"error: unknown --tiers {', '.join(unknown)}; choose from {', '.join(layouts)}")
    rows = []
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen)
    w = torch.ones(tokens, 1)
    for tier in tiers:
        layout = layouts[tier]
        n = pool_size(layout.nbytes, pool_mb)
        one = random_quantized(layout, gen) if layout.kind == "quantized" else random_dense(layout, gen)
        tier_buf = one.unsqueeze(0).repeat(n, 1)  # rows of one tensor, as the host tier holds them
        pool = [tier_buf[i] for i in range(n)]
        sec = time_pool(lambda b, lay=layout: cpu_experts.cpu_moe(x, [(b, lay)], w), pool, calls)
        rows.append(("fate", tier, layout.nbytes, sec))
        if tier == "int4-g64":
            sec = time_pool(lambda b, lay=layout: cpu_experts.cpu_moe_reference(x, [(b, lay)], w), pool, 4)
            rows.append(("reference", tier, layout.nbytes, sec))
    return rows


def torch_rows(hidden: int, inter: int, tokens: int, pool_mb: int, calls: int) -> tuple[list[tuple], str]:
    """Library kernels on the same shape: (kernel, format, bytes, seconds), and a note on int4's conversion."""
    rows = []
    gen = torch.Generator().manual_seed(1)
    layout = ExpertLayout.quantized(hidden, inter, 4, 64)
    one = random_quantized(layout, gen)
    gu, dn = layout.packed(one)
    from quant.packing import unpack_codes

    def int4pack(m) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001 - a PackedMatrix
        q = unpack_codes(m.codes, 4, m.shape[1]).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        s, z = m.scale.float(), m.zero.float()
        # torch dequantizes (q - 8) * scale + zero': zero' = (8 - zero) * scale gives fate's (q - zero) * scale
        sz = torch.stack([s.t(), ((8 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
        return packed, sz

    t = time.perf_counter()
    one_pack = (int4pack(gu), int4pack(dn))
    convert_s = time.perf_counter() - t
    int4_bytes = sum(p.nbytes + sz.nbytes for p, sz in one_pack)
    note = (f"torch-int4: converting one expert from fate's layout took {convert_s * 1e3:.1f} ms; torch's layout "
            f"holds {int4_bytes / 1e6:.2f} MB against fate's {layout.nbytes / 1e6:.2f} MB")
    n = pool_size(int4_bytes, pool_mb)
    pool = [tuple((p.clone(), sz.clone()) for p, sz in one_pack) for _ in range(n)]
    xb = torch.randn(tokens, hidden, generator=gen).bfloat16()

    def run_int4(e) -> torch.Tensor:  # noqa: ANN001
        (pg, sg), (pd, sd) = e
        h = torch._weight_int4pack_mm_for_cpu(xb, pg, 64, sg)
        return torch._weight_int4pack_mm_for_cpu((F.silu(h[:, :inter]) * h[:, inter:]).contiguous(), pd, 64, sd)

    rows.append(("torch-int4", "int4-g64 (bf16 x)", int4_bytes, time_pool(run_int4, pool, calls)))

    w8 = (torch.randint(-127, 128, (2 * inter, hidden), generator=gen, dtype=torch.int8),
          torch.randint(-127, 128, (hidden, inter), generator=gen, dtype=torch.int8))
    s8 = (torch.rand(2 * inter) * 1e-3, torch.rand(hidden) * 1e-3)
    int8_bytes = sum(t.nbytes for t in (*w8, *s8))
    pool = [(w8[0].clone(), w8[1].clone()) for _ in range(pool_size(int8_bytes, pool_mb))]
    xf = torch.randn(tokens, hidden, generator=gen)

    def run_int8(e) -> torch.Tensor:  # noqa: ANN001
        h = torch._weight_int8pack_mm(xf, e[0], s8[0])
        return torch._weight_int8pack_mm(F.silu(h[:, :inter]) * h[:, inter:], e[1], s8[1])

    rows.append(("torch-int8", "int8 per row (f32 x)", int8_bytes, time_pool(run_int8, pool, calls)))

    for name, dtype, x in (("torch-bf16", torch.bfloat16, xb), ("torch-f32", torch.float32, xf)):
        w = (torch.randn(2 * inter, hidden, generator=gen).to(dtype),
             torch.randn(hidden, inter, generator=gen).to(dtype))
        nbytes = w[0].nbytes + w[1].nbytes
        pool = [(w[0].clone(), w[1].clone()) for _ in range(pool_size(nbytes, pool_mb))]

        def run_dense(e, x=x) -> torch.Tensor:  # noqa: ANN001
            h = F.linear(x, e[0])
            return F.linear(F.silu(h[:, :inter]) * h[:, inter:], e[1])

        rows.append((name, str(dtype).removeprefix("torch."), nbytes, time_pool(run_dense, pool, calls)))

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except ImportError:
        return rows, note
    wgu = torch.randn(2 * inter, hidden, generator=gen).bfloat16() * 0.02
    wd = torch.randn(hidden, inter, generator=gen).bfloat16() * 0.02
    qgu, qd = bf.quantize_4bit(wgu, blocksize=64, quant_type="nf4"), bf.quantize_4bit(wd, blocksize=64,
                                                                                        quant_type="nf4")
    nf4_bytes = sum(q.nbytes + st.absmax.nbytes for q, st in (qgu, qd))
    pool = [(qgu, qd)] * pool_size(nf4_bytes, pool_mb)  # one expert: its kernel is far from memory-bound

    def run_nf4(e) -> torch.Tensor:  # noqa: ANN001
        (q1, s1), (q2, s2) = e
        h = bnb.matmul_4bit(xb, q1.t(), s1)
        return bnb.matmul_4bit((F.silu(h[:, :inter]) * h[:, inter:]).contiguous(), q2.t(), s2)

    rows.append(("bnb-nf4", "nf4 b64 (bf16 x)", nf4_bytes, time_pool(run_nf4, pool, max(4, calls // 10))))
    return rows, note


_RUNTIMES: dict = {}


def decode_rate(model: str, threads: int, tokens: int, vram: str | None, dtype: str | None = None) -> str:
    """A greedy decode on the CPU as `fate run` does it: the runtime's describe line and decode tokens/s (the
    model is opened once, for the first thread count, and reused)."""
    from fate_cli.engine.generate import Sampler, SamplingParams, generate
    from fate_cli.engine.runtime import open_model

    if model not in _RUNTIMES:
        t = time.perf_counter()
        _RUNTIMES[model] = open_model(model, device="cpu", dtype=dtype, policy="fate" if vram else None, vram=vram)
        print(f"opened {model} on the CPU in {time.perf_counter() - t:.1f} s: {_RUNTIMES[model].describe()}")
    runtime = _RUNTIMES[model]
    prompt = runtime.tokenizer.encode("The expert kernels run on the CPU")
    sampler = Sampler(SamplingParams(temperature=0.0), torch.device("cpu"))
    generate(runtime.model, prompt, 4, sampler, graphs=runtime.graphs)  # warm-up: compiles, pages in
    stats = generate(runtime.model, prompt, tokens, sampler, graphs=runtime.graphs).stats
    return (f"decode {model} on {threads} threads: {stats.decode_tokens_per_s:.2f} tokens/s "
            f"({stats.generated_tokens} tokens), prefill {stats.prefill_tokens_per_s:.1f} tokens/s")


def main() -> None:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default=f"{cores},{max(1, cores // 2)}", help="thread counts, comma-separated")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--tokens", default="1,4", help="tokens per call, comma-separated")
    p.add_argument("--tiers", default="int4-g64,int2-g32,int8-g64,bf16")
    p.add_argument("--pool-mb", type=int, default=1024, help="distinct experts per kernel, at least this much")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--bw-mb", type=int, default=1024, help="buffer of the bandwidth measurement")
    p.add_argument("--no-library", action="store_true", help="fate's kernels only")
    p.add_argument("--gap-us", type=float, default=0.0,
                   help="the host busy this many microseconds between calls (a decode step's layers are about "
                        "300-800 us apart): shows what the kernels' idle threads cost to wake")
    p.add_argument("--decode", default="", help="also decode this model on the CPU, e.g. synthetic:olmoe-1b-7b")
    p.add_argument("--decode-vram", default=None, help="with --decode: --vram of the run (tiered experts)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-dtype", default=None, help="with --decode: --dtype of the run (default float32)")
    a = p.parse_args()
    global GAP_S
    GAP_S = a.gap_us / 1e6
    numba_version = cpu_kernels.numba.__version__ if cpu_kernels.numba else "-"
    print(f"CPU expert kernels: torch {torch.__version__}, numba {numba_version}, "
          f"{cores} cores, expert {a.hidden}x{a.inter}, {time.strftime('%Y-%m-%d')}")
    for threads in [int(t) for t in a.threads.split(",")]:
        use_threads(threads)  # torch's threads and the CPU expert kernels', as `fate --threads` sets them
        copy_bw, read_bw = bandwidth(a.bw_mb * 2**20)
        print(f"\n## {threads} threads: copy {copy_bw:.1f} GB/s (read+write {2 * copy_bw:.1f}), "
              f"read {read_bw:.1f} GB/s")
        for tokens in [int(t) for t in a.tokens.split(",")]:
            rows = fate_rows(a.hidden, a.inter, tokens, a.pool_mb, a.calls, a.tiers.split(","))
            note = ""
            if not a.no_library:
                more, note = torch_rows(a.hidden, a.inter, tokens, a.pool_mb, a.calls)
                rows += more
            print("\n| threads | tokens | kernel | format | MB | us | GB/s | floor us | x floor |")
            print("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
            for kernel, fmt, nbytes, sec in rows:
                floor = nbytes / (read_bw * 1e9)
                print(f"| {threads} | {tokens} | {kernel} | {fmt} | {nbytes / 1e6:.2f} | {sec * 1e6:.1f} | "
                      f"{nbytes / sec / 1e9:.1f} | {floor * 1e6:.1f} | {sec / floor:.2f} |")
            if note:
                print(note)
        if a.decode:
            print(decode_rate(a.decode, threads, a.decode_tokens, a.decode_vram, a.decode_dtype))
    if cpu_kernels.numba:
        print(f"numba threading layer: {cpu_kernels.numba.threading_layer()}")


if __name__ == "__main__":
    main()
