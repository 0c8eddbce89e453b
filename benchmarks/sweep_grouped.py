"""Tiles of the Triton grouped GEMM (quant/grouped.py) on a real expert shape: every config, one run.

    PYTHONPATH=. python3 benchmarks/sweep_grouped.py --hidden 2048 --inter 768 --experts 128 --top-k 8 -p 64,512,2048

A layer's worth of experts at INT4 g64 in slots (every expert resident, the hot tier), random routing of
P tokens; prints each config's time for the whole grouped_ffn and the weight-read floor (every routed expert
read once at the copy bandwidth measured in the same run). The best config per P is printed last.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from bench_decode import copy_bandwidth  # this folder is on the path of a script run from it

from quant.grouped import grouped_ffn, packed_config
from quant.layout import ExpertLayout
from quant.moe_kernels import PackedBank, identity_table
from quant.synthetic import random_quantized


def timed(fn, reps: int = 20) -> float:  # noqa: ANN001 - a callable
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("-p", "--tokens", default="64,512,2048")
    args = parser.parse_args()
    cuda = torch.device("cuda")
    lay = ExpertLayout.quantized(args.hidden, args.inter, 4, 64)
    gen = torch.Generator().manual_seed(0)
    distinct = [random_quantized(lay, gen) for _ in range(4)]
    buf = torch.stack([distinct[e % 4] for e in range(args.experts)]).to(cuda)
    bank = PackedBank(buf, (lay, lay), identity_table(args.experts, cuda))
    bandwidth = copy_bandwidth(cuda)
    configs = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
               for m, n, w, s in itertools.product((16, 32, 64, 128), (64, 128), (4, 8), (3,))]
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; expert {lay.nbytes / 1e6:.2f} MB at INT4 g64")
    for tokens in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(tokens, args.hidden, device=cuda, dtype=torch.bfloat16)
        scores = torch.rand(tokens, args.experts, device=cuda)
        weights, ids = torch.topk(scores, args.top_k, dim=-1)
        used = ids.unique().numel()
        floor = used * lay.nbytes / bandwidth
        rows = []
        for cfg in configs:
            try:
                seconds = timed(lambda cfg=cfg, x=x, w=weights, i=ids: grouped_ffn(x, w, i, bank, cfg))
            except Exception as err:  # noqa: BLE001 - a config the compiler refuses (shared memory): skipped
                print(f"P={tokens} {cfg}: {type(err).__name__}")
                continue
            rows.append((seconds, cfg))
            print(f"P={tokens:5d} {cfg}: {seconds * 1e6:8.1f} us ({floor / seconds:.0%} of the read floor)", flush=True)
        default = timed(lambda x=x, w=weights, i=ids: grouped_ffn(x, w, i, bank))
        best = min(rows, key=lambda r: r[0])
        chosen = packed_config(tokens * args.top_k, args.experts)
        print(f"== P={tokens}: best {best[1]} {best[0] * 1e6:.1f} us; default {chosen} {default * 1e6:.1f} us; "
              f"read floor {floor * 1e6:.1f} us ({used} experts)", flush=True)


if __name__ == "__main__":
    main()
