"""Decode speed of the captured step (fate_cli/engine/decode_step.py) against fate's eager path and transformers' eager
generate, on synthetic shapes of real models, with each row's memory-bandwidth floor. All rows in one run.

    python3 benchmarks/bench_decode.py --shapes olmoe-1b-7b,qwen3-30b-a3b -p 128 -n 64 --out rows.jsonl

Rows per shape (bf16 activations; a 128-token prompt, then 64 greedy tokens; one warm-up request first):
- transformers: the same config through AutoModelForCausalLM.from_config (random bf16 weights), generate();
  decode tokens/s = (n - 1) / (time of n new tokens - time of 1 new token)
- fate resident bf16 / INT4, eager and graph; fate's policy at budgets holding 100% and 90% of the experts
  at the hot tier (its hit rate is reported; the warm-up request fills the cache as an earlier one would)
The floor of a row is the bytes one decode step must read (non-expert weights less the embedding table,
top_k experts per MoE layer at the row's tier, the KV cache the step attends over) divided by the device's
copy bandwidth measured in the same run. With --profile, a graph row's GPU time and kernel launches per step
are split by kernel family.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from fate_cli.bench import open_target
from fate_cli.synthetic import CONFIGS, synthetic_args


def copy_bandwidth(device: torch.device, nbytes: int = 2 * 1024**3, reps: int = 10) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes * reps / seconds


def transformers_row(shape: str, prompt: list[int], n: int) -> dict:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CONFIGS[shape])
    config = AutoConfig.for_model(**cfg)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    ids = torch.tensor([prompt], device="cuda")

    def timed(new: int, model=model) -> float:  # noqa: ANN001
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(4)  # warm-up
    one, full = timed(1), timed(n)
    experts_impl = getattr(model.config, "_experts_implementation", None)
    row = {"shape": shape, "engine": f"transformers {transformers.__version__}", "tier": "bf16", "mode": "eager",
           "decode_tokens_per_s": (n - 1) / (full - one), "end_to_end_tokens_per_s": n / full,
           "attn": getattr(model.config, "_attn_implementation", None), "experts_impl": experts_impl}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return row


def floor_bytes(shape: str, tier_bytes: int, cache_len: int) -> int:
    """Bytes one decode step reads at least: non-expert weights but the embedding table (one row of it),
    top_k experts per MoE layer at `tier_bytes` each, the keys and values of `cache_len` positions."""
    from cache.setup import non_expert_bytes

    a = synthetic_args("synthetic:" + shape)
    embed = a.vocab_size * a.hidden_size * 2
    tied = embed if a.tie_word_embeddings else 0  # a tied head reads the table anyway
    non_expert = non_expert_bytes(a, torch.bfloat16) - embed + tied + a.hidden_size * 2
    kv = 2 * a.num_layers * a.num_kv_heads * a.head_dim * cache_len * 2
    return non_expert + a.top_k * len(a.moe_layer_ids) * tier_bytes + kv


@torch.inference_mode()
def profile_step(session, steps: int = 16) -> dict:  # noqa: ANN001
    """GPU time and kernel launches per captured decode step, by kernel family (graph rows; the step replays
    at the cache's second-to-last position, which the request never reached)."""
    from torch.profiler import ProfilerActivity, profile

    step = session.graphs._step
    token = torch.zeros(step.batch, dtype=torch.long, device="cuda")
    where = [step.cache.max_len - 2] * step.batch
    step(token, where)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(token, where)
        torch.cuda.synchronize()
    groups: dict[str, list[float]] = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if not t or evt.key.startswith("cuda") or evt.key.startswith("aten::"):
            continue
        name = evt.key.lower()
        key = ("moe (fused)" if "_packed_kernel" in name or "_dense_kernel" in name or "_combine" in name
               else "norm, rotary (fused)" if "_rms_norm" in name or "_rope" in name
               else "attention" if any(a in name for a in ("attention", "fmha", "flash"))
               else "gemm" if any(g in name for g in ("gemm", "gemv", "cutlass", "nvjet", "cublas"))
               else "memcpy" if "memcpy" in name
               else "other")
        g = groups.setdefault(key, [0.0, 0])
        g[0] += t / 1000.0 / steps
        g[1] += evt.count / steps
    ordered = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return {k: {"ms": round(v[0], 3), "kernels": round(v[1], 1)} for k, v in ordered}


def fate_rows(shape: str, prompts: list[list[int]], n: int, bandwidth: float, budgets: list[float],
              want_bf16: bool, profile: bool, emit) -> None:  # noqa: ANN001
    dev, dt = torch.device("cuda"), torch.bfloat16
    target = open_target("synthetic:" + shape, dev, dt, None)
    fp = target.footprint
    hot = fp.expert_hot
    cache_len = max(256, 1 << (len(prompts[0]) + n - 1).bit_length())
    plans = []
    if want_bf16:
        plans.append(("bf16", "resident 16-bit", "fate", 10**15))
    plans.append(("INT4", "resident", "resident", 0))
    for share in budgets:
        plans.append(("INT4/INT2", f"fate {int(share * 100)}%", "fate", fp.fixed + int(share * fp.all_hot)))
    for tier, label, policy, budget in plans:
        tokens = {}
        for mode in ("eager", "graph"):
            target.eager = mode == "eager"
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            session = target.session(policy, budget)
            session.run([prompts[1]], n)  # warm-up: capture, kernels compiled, the cache filled
            if session.offload:
                session.offload.reset_stats()
            timing = session.run([prompts[0]], n)
            stats = session.offload.sync_stats().as_dict() if session.offload else {}
            tier_bytes = fp.expert_full if tier == "bf16" else hot
            floor = floor_bytes(shape, tier_bytes, cache_len if mode == "graph" else len(prompts[0]) + n // 2)
            row = {"shape": shape, "engine": "fate", "tier": tier, "policy": label, "mode": mode,
                   "decode": session.decode_mode(), "decode_tokens_per_s": timing.decode_tokens_per_s,
                   "prefill_tokens_per_s": timing.prefill_tokens_per_s, "hit_rate": stats.get("hit_rate"),
                   "gb_moved": sum(stats.get("bytes_moved", {}).values()) / 1e9 if stats else 0.0,
                   "budget_bytes": budget if policy != "resident" else None,
                   "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "floor_bytes_per_token": floor,
                   "floor_tokens_per_s": bandwidth / floor}
            row["of_floor"] = row["decode_tokens_per_s"] / row["floor_tokens_per_s"]
            tokens[mode] = timing.token_ids
            if profile and mode == "graph" and session.graphs._step is not None:
                row["profile_per_step"] = profile_step(session)
            session.close()
            emit(row)
        same = next((i for i, (a, b) in enumerate(zip(tokens["eager"], tokens["graph"])) if a != b), None)
        emit({"shape": shape, "policy": label, "tier": tier, "tokens_equal": tokens["eager"] == tokens["graph"],
              "first_difference": same, "tokens": len(tokens["graph"])})
    del target
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="olmoe-1b-7b,qwen3-30b-a3b")
    ap.add_argument("-p", "--prompt-len", type=int, default=128)
    ap.add_argument("-n", "--gen-len", type=int, default=64)
    ap.add_argument("--budgets", default="1.0,0.9", help="fate rows: shares of the hot-tier expert bytes")
    ap.add_argument("--bf16", default="olmoe-1b-7b", help="shapes that also get resident 16-bit rows")
    ap.add_argument("--budget-shapes", default="olmoe-1b-7b", help="shapes that get the fate rows at --budgets")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--profile", action="store_true", help="split the graph rows' GPU time by kernel")
    ap.add_argument("--out", default=None, help="append each row as a JSON line")
    a = ap.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(torch.device("cuda"))

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
          "copy_bandwidth_gb_s": bandwidth / 1e9})
    for shape in a.shapes.split(","):
        vocab = CONFIGS[shape]["vocab_size"]
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, vocab, (a.prompt_len,), generator=g).tolist() for _ in range(2)]
        if not a.no_transformers:
            emit(transformers_row(shape, prompts[0], a.gen_len))
        budgets = [float(b) for b in a.budgets.split(",") if b] if shape in a.budget_shapes.split(",") else []
        fate_rows(shape, prompts, a.gen_len, bandwidth, budgets, shape in a.bf16.split(","), a.profile, emit)


if __name__ == "__main__":
    main()
