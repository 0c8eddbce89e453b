"""Experts moved per decode step of a batch, per policy, on the bundled model's recorded batch traffic (CPU).

Machine-independent numbers (hits, misses, loads per tier, prefetches) from replaying the bundled model's
routing of `batch` prompts decoded together through each policy with tiny experts, at 50% of the hot-tier
expert bytes; the second of two requests is reported. Used to choose klotski's eviction and prefetch rule
(docs/bench-results.md).

    python3 benchmarks/batch_traffic.py BATCH POLICIES [NEW_TOKENS]     e.g. 16 fate,lru,klotski 32
"""

from __future__ import annotations

import sys

import torch

from fate_cli.bench import open_target, parse_budgets, prompt_set
from fate_cli.engine.replay import ReplayModel


def main() -> None:
    batch, policies = int(sys.argv[1]), sys.argv[2].split(",")
    new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    target = open_target("replay:64x128", cpu, torch.float32, None)
    prompts = prompt_set(128, 2 * batch, None)
    hot = target.store.tiers["hot"].layout.nbytes
    (_, budget), = parse_budgets("50%", target.footprint)
    for policy in policies:
        session = target.session(policy, budget)
        offload = session.offload
        print(policy, session.setup.plan.summary())
        for r in range(2):
            steps = target.steps(prompts[r * batch : (r + 1) * batch], new_tokens)
            player = ReplayModel(session.provider, target.hidden, cpu, torch.float32, max(s.tokens for s in steps))
            session.provider.begin_request()
            offload.reset_stats()
            for step in steps[:batch]:  # one prefill step per prompt
                player.step(step)
            s0 = offload.stats
            loads0, bytes0 = dict(s0.loads), sum(s0.bytes_moved.values())
            hits0, misses0, prefetches0 = s0.hits, s0.misses, s0.prefetches
            used = 0
            for step in steps[batch:]:
                player.step(step)
                used += sum(len(t.ids) for t in step.layers)
            if r == 0:
                continue
            s1, n = offload.stats, len(steps) - batch
            loads = {t: round((c - loads0.get(t, 0)) / n, 1) for t, c in s1.loads.items()}
            moved = (sum(s1.bytes_moved.values()) - bytes0) / hot / n
            print(f"  per decode step: experts used {used / n:.1f}, hits {(s1.hits - hits0) / n:.1f}, "
                  f"misses {(s1.misses - misses0) / n:.1f}, loads {loads}, "
                  f"prefetches {(s1.prefetches - prefetches0) / n:.1f}, moved {moved:.1f} hot-tier experts")
        session.close()


if __name__ == "__main__":
    main()
