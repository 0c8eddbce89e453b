"""Every policy at budgets of 25%, 50% and 75% of the hot-tier expert bytes, on the same prompt.

    python scripts/bench_offload.py [--model tiny] [--device cuda] [-p 512] [-n 128] [--json out.json]

The budget is what always lives on the device (non-expert weights, KV cache, workspace) plus the given
share of all experts at the hot tier. Rows: prefill and decode tokens/s, expert hit rate, prediction
recall, bytes moved per tier, peak device memory against the budget. With --check-tokens every row
runs greedy with --transfer-bits at the hot tier and must give the same tokens as `resident`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from cache.budget import format_size
from cache.setup import footprint
from fate_cli.bench import bench_tokens
from fate_cli.generate import Sampler, SamplingParams, generate
from fate_cli.model.loader import load_args
from fate_cli.registry import resolve
from fate_cli.runtime import DEFAULT_CONTEXT, open_model, pick_dtype
from quant.store import QuantParams

POLICIES = ["resident", "fate", "lru", "eap", "ondemand"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--shares", default="0.25,0.5,0.75")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--check-tokens", action="store_true", help="transfer at the hot tier; tokens must match")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    device = torch.device(a.device)
    resolved = resolve(a.model)
    args = load_args(resolved.path)
    dtype = pick_dtype(a.dtype, device)
    ctx = min(DEFAULT_CONTEXT, args.max_position_embeddings)
    fp = footprint(args, dtype, ctx, QuantParams(), device.type == "cuda")
    rows, reference = [], None
    transfer = 4 if a.check_tokens else None
    print(f"{resolved.name} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"fixed {format_size(fp.fixed)}, all experts at the hot tier {format_size(fp.all_hot)}")
    for share in [float(s) for s in a.shares.split(",")]:
        budget = int(fp.fixed + share * fp.all_hot)
        for policy in a.policies.split(","):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            rt = open_model(a.model, a.device, a.dtype, policy, str(budget), transfer)
            ids = bench_tokens(rt.tokenizer, a.p)
            sampler = Sampler(SamplingParams(temperature=0.0), device)
            t0 = time.perf_counter()
            result = generate(rt.model, ids, a.n, sampler)
            wall = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
            cache = rt.offload.stats.as_dict() if rt.offload else {}
            if policy == "resident":
                reference = result.token_ids
            row = {
                "model": resolved.name, "device": str(device), "policy": policy, "share": share, "budget": budget,
                "plan": rt.plan_line(), "prefill_tok_s": result.stats.prefill_tokens_per_s,
                "decode_tok_s": result.stats.decode_tokens_per_s, "wall_s": wall,
                "hit_rate": cache.get("hit_rate"), "recall": cache.get("prediction_recall"),
                "precision": cache.get("prediction_precision"), "bytes_moved": cache.get("bytes_moved"),
                "per_layer": cache.get("per_layer"), "peak_device_bytes": peak,
                "same_tokens_as_resident": reference is not None and result.token_ids == reference,
            }
            rows.append(row)
            moved = sum((row["bytes_moved"] or {}).values())
            print(
                f"{share:>4.0%} {policy:9s} pp {row['prefill_tok_s']:8.1f} tg {row['decode_tok_s']:7.1f} tok/s | "
                f"hit {row['hit_rate'] if row['hit_rate'] is not None else 1:.3f} | recall "
                f"{row['recall'] if row['recall'] is not None else float('nan'):.3f} | moved {format_size(moved)} | "
                f"peak {format_size(peak) if peak is not None else '-'} of {format_size(budget)}"
                f"{'' if peak is None or peak <= budget else ' OVER'} | same tokens {row['same_tokens_as_resident']}",
                flush=True,
            )
            del rt
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.check_tokens and not all(r["same_tokens_as_resident"] for r in rows):
        sys.exit("tokens differ between policies")


if __name__ == "__main__":
    main()
