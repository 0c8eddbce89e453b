"""`fate bench`: prompt processing (pp) and generation (tg) speed, llama-bench style.

This first version measures one policy at one budget (`--policy`, `--vram`); sweeps of budgets and
policies side by side come with the bench issue.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

from fate_cli.errors import UsageError
from fate_cli.generate import Sampler, SamplingParams, generate
from fate_cli.registry import BUNDLED_ROOT
from fate_cli.runtime import dtype_name, open_model


def bench_tokens(tokenizer, count: int) -> list[int]:  # noqa: ANN001 - fate_cli.tokenizer.Tokenizer
    """`count` tokens of the bundled held-out text, the same for every run."""
    text = (BUNDLED_ROOT / "tiny" / "heldout.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


def bench_command(
    model: str | None,
    prompt_len: int,
    gen_len: int,
    reps: int,
    device: str | None,
    dtype: str | None,
    output: str,
    vram: str | None = None,
    policy: str | None = None,
) -> None:
    if output not in ("md", "json"):
        raise UsageError(f"unknown output format '{output}'; use md or json")
    runtime = open_model(model, device, dtype, policy, vram)
    limit = runtime.loaded.args.max_position_embeddings
    if prompt_len + gen_len > limit:
        raise UsageError(f"-p {prompt_len} plus -n {gen_len} exceeds the model's context of {limit} tokens")
    ids = bench_tokens(runtime.tokenizer, prompt_len)
    sampler = Sampler(SamplingParams(temperature=0.0), runtime.loaded.device)
    pp, tg, hit = [], [], []
    for rep in range(reps + 1):  # the first run warms up and is not counted
        before = (runtime.offload.stats.hits, runtime.offload.stats.misses) if runtime.offload else (0, 0)
        result = generate(runtime.model, ids, gen_len, sampler)
        if rep:
            pp.append(result.stats.prefill_tokens_per_s)
            tg.append(result.stats.decode_tokens_per_s)
            if runtime.offload:
                hits, misses = runtime.offload.stats.hits - before[0], runtime.offload.stats.misses - before[1]
                hit.append(hits / (hits + misses) if hits + misses else 1.0)
    a = runtime.loaded.args
    rows = [
        {
            "model": runtime.resolved.name,
            "family": a.family,
            "device": str(runtime.loaded.device),
            "dtype": dtype_name(runtime.loaded.dtype),
            "policy": runtime.setup.policy if runtime.setup else "resident",
            "plan": runtime.plan_line(),
            "hit_rate": statistics.mean(hit) if hit else 1.0,
            "test": test,
            "tokens_per_s": statistics.mean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "reps": reps,
        }
        for test, values in ((f"pp{prompt_len}", pp), (f"tg{gen_len}", tg))
    ]
    if output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    where = torch.cuda.get_device_name() if runtime.loaded.device.type == "cuda" else "CPU"
    print(f"| model | device | dtype | policy | test | t/s | hit % |  <!-- {where} -->")
    print("| --- | --- | --- | --- | --- | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['device']} | {r['dtype']} | {r['policy']} | {r['test']} | "
            f"{r['tokens_per_s']:.2f} ± {r['stdev']:.2f} | {100 * r['hit_rate']:.1f} |"
        )
