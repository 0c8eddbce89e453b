"""Klotski's grouped prefill on the live model: each prompt's greedy tokens as alone, fewer experts moved.

Runs the bundled model at a small budget with every transfer at the hot tier, once with the group size the
planner picks from measured times, once with all prompts in one group (times scripted: copies slow) and once
with each alone (compute covering copies), and compares every prompt's tokens with `resident` alone.

    python3 scripts/check_klotski_groups.py [--device cuda] [--dtype float32] [--budget SIZE]
"""

from __future__ import annotations

import argparse

from cache.microbatch import LayerTimes
from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.engine.runtime import open_model

TEXTS = ["The hacker ethic", "What does hack mean? It is a word that", "In Python, a list comprehension", "Unix",
         "A kludge is", "The Jargon File says that a hacker"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--budget", default=None, help="default: 16MB on a CPU, 84MB on a GPU (its workspace is larger)")
    args = ap.parse_args()
    budget = args.budget or ("16MB" if args.device == "cpu" else "84MB")
    ref = open_model("tiny", args.device, args.dtype, "resident", "1GB", 4)
    greedy = Sampler(SamplingParams(temperature=0.0), ref.model.embed_tokens.weight.device)
    prompts = [ref.tokenizer.encode(t) for t in TEXTS]
    alone = [generate(ref.model, p, 12, greedy).token_ids for p in prompts]
    ok = True
    runs = (("measured", None), ("one group", LayerTimes(1.0, 0.0, 1e-9)), ("alone", LayerTimes(0.0, 0.0, 1.0)))
    for label, times in runs:
        rt = open_model("tiny", args.device, args.dtype, "klotski", budget, 4)
        if times is not None:
            rt.offload.layer_times = times
        same = [r.token_ids for r in generate_batch(rt.model, prompts, 12, greedy).results] == alone
        measured = rt.offload.layer_times.describe()
        print(f"{label}: groups {rt.offload.last_groups}, tokens as resident alone: {same}, "
              f"experts moved {rt.offload.stats.misses}, {rt.setup.plan.summary()}; {measured}")
        ok &= same
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
