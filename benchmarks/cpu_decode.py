"""Decode on --device cpu, and where a token's time goes: the expert kernels, the dense weights' products, the rest.

    python3 benchmarks/cpu_decode.py synthetic:olmoe-1b-7b --vram 5GB --policy cpu --dense none,int8
    python3 benchmarks/cpu_decode.py synthetic:qwen3-30b-a3b --vram 24GB --policy cpu --dense int8 --threads 16,8

Per row (--dense x --threads): the model opened as `fate run MODEL --device cpu --vram V --policy P [--dense D]`
opens it, one warm-up request, then --reps greedy requests of one prompt token and --tokens new ones. Printed: decode
tokens/s and ms a token, split by timers around the calls (time.perf_counter, a few microseconds each) into
- `experts`: the CPU expert kernels (quant/cpu_kernels.py: `quantized_moe`, `quantized_ffn`);
- `dense`: the Linears' products (F.linear and torch's INT8 kernel; lm_head and the small routers included);
- `rest`: everything else a step does (norms, rotary, attention, routing, the cache's bookkeeping, Python),
  also per MoE layer;
and the floor: the bytes a token reads (the dense weights at their precision, lm_head included, and top-k experts a
MoE layer counted at the hot tier's size) over the host's read bandwidth, measured in the same run (a sum over a
512 MB float32 buffer, median of 5).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import quant.cpu_kernels as ck
from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.runtime import open_model
from fate_cli.model.model import set_dense
from fate_cli.model.threads import use_threads
from quant.dense_int8 import Int8Linear

SPENT = {"experts": 0.0, "dense": 0.0}


def timed(bucket: str, fn):  # noqa: ANN001, ANN201 - wraps a callable, adds its time to SPENT[bucket]
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[bucket] += time.perf_counter() - start

    return wrapper


@contextmanager
def timers():  # noqa: ANN201
    """Timers around the expert kernels and the dense products for the duration (restored after)."""
    saved = ck.quantized_moe, ck.quantized_ffn, F.linear, torch._weight_int8pack_mm
    ck.quantized_moe, ck.quantized_ffn = timed("experts", ck.quantized_moe), timed("experts", ck.quantized_ffn)
    F.linear, torch._weight_int8pack_mm = timed("dense", F.linear), timed("dense", torch._weight_int8pack_mm)
    try:
        yield
    finally:
        ck.quantized_moe, ck.quantized_ffn, F.linear, torch._weight_int8pack_mm = saved


def read_bandwidth() -> float:
    """Bytes a second of a sum over a 512 MB float32 buffer (median of 5 after one warm pass)."""
    buf = torch.ones(128 << 20)
    buf.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return buf.nbytes / statistics.median(times)


def token_bytes(model) -> tuple[int, int]:  # noqa: ANN001 - a Transformer
    """(dense bytes, routed expert bytes) one decode token reads: every dense Linear (the tied head's embedding
    once), the routed experts at the hot tier's size."""
    dense = 0
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            dense += m.codes.nbytes + m.scale.nbytes
        elif isinstance(m, torch.nn.Linear) and not name.endswith("mlp.gate"):
            dense += m.weight.nbytes
    if model.lm_head is None:
        dense += model.embed_tokens.weight.nbytes
    provider, args = model.provider, model.args
    layouts = getattr(provider, "layouts", None)
    per_expert = layouts["hot"].nbytes if layouts else 3 * args.hidden_size * args.moe_intermediate_size * 4
    return dense, per_expert * args.top_k * len(args.moe_layer_ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--vram", default=None, help="--vram of the run (the tiered experts' budget)")
    p.add_argument("--policy", default="cpu")
    p.add_argument("--dense", default="none,int8", help="comma-separated: none (the run's dtype) and/or int8")
    p.add_argument("--threads", default="", help="comma-separated thread counts (default: fate's default)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    bandwidth = read_bandwidth()
    print(f"host read bandwidth {bandwidth / 1e9:.1f} GB/s (sum over 512 MB, torch's default threads)")
    for dense in a.dense.split(","):
        set_dense(None if dense == "none" else dense)
        runtime = open_model(a.model, device="cpu", policy=a.policy, vram=a.vram)
        print(runtime.describe())
        model = runtime.model
        dense_b, expert_b = token_bytes(model)
        layers = len(model.args.moe_layer_ids)
        sampler = Sampler(SamplingParams(temperature=0.0), torch.device("cpu"))
        prompt = runtime.tokenizer.encode("The expert kernels run on the CPU")[:1]
        for threads in [int(t) for t in a.threads.split(",") if t] or [None]:
            n = use_threads(threads)
            generate(model, prompt, 8, sampler, graphs=runtime.graphs)  # warm-up: compiles, pages in
            for _ in range(a.reps):
                SPENT.update(experts=0.0, dense=0.0)
                with timers():
                    stats = generate(model, prompt, a.tokens + 1, sampler, graphs=runtime.graphs).stats
                steps = stats.generated_tokens - 1
                ms = stats.decode_seconds / steps * 1e3
                # the first token comes from the prefill: the timers' share of it is taken out pro rata
                share = steps / (steps + 1)
                experts, dense_ms = (SPENT[k] * share / steps * 1e3 for k in ("experts", "dense"))
                rest = ms - experts - dense_ms
                floor = (dense_b + expert_b) / bandwidth * 1e3
                print(f"dense {dense:>4} threads {n:>2}: decode {stats.decode_tokens_per_s:6.2f} tokens/s, "
                      f"{ms:6.1f} ms/token = experts {experts:5.1f} + dense {dense_ms:5.1f} + rest {rest:5.1f} "
                      f"({rest / layers * 1e3:.0f} us/layer); reads {dense_b / 1e9:.2f} + {expert_b / 1e9:.2f} GB, "
                      f"floor {floor:.1f} ms ({ms / floor:.2f}x)")
        del runtime, model
    set_dense(None)


if __name__ == "__main__":
    main()
