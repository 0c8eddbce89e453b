"""Bytes moved and hit rate per policy on the bundled model's recorded traffic: machine-independent numbers.

Replays the bundled model's routing (held-out text, greedy) through each policy with tiny experts on the
CPU and prints, per budget, the experts moved per request in prefill and per token in decode (in hot-tier
expert units: a cold transfer counts its share), the loads made (misses and prefetches, each one load whatever
its tier; of them the prefetches), Belady's MIN for the row's slots on the same routing
(cache/belady.py: the fewest loads any policy could make) and the decode hit rate. Used to choose fate's prefetch
thresholds (docs/bench-results.md).

    python3 benchmarks/policy_traffic.py [-p 128] [-n 64] [-r 2] [--policy fate,fate-shallow,lru,eap,fmoe,ondemand]
"""

from __future__ import annotations

import argparse

import torch

from cache.belady import min_loads
from fate_cli.bench import open_target, parse_budgets, prompt_set
from fate_cli.engine.replay import ReplayModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", type=int, default=128, help="prompt tokens")
    ap.add_argument("-n", type=int, default=64, help="generated tokens")
    ap.add_argument("-r", type=int, default=2, help="requests measured after one warm-up")
    ap.add_argument("--policy", default="fate,fate-shallow,lru,eap,fmoe,ondemand")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    target = open_target("replay:64x128", cpu, torch.float32, None)
    prompts = prompt_set(args.p, args.r + 1, None)
    hot = target.store.tiers["hot"].layout.nbytes
    for label, budget in parse_budgets("25%,50%,75%", target.footprint):
        for policy in args.policy.split(","):
            session = target.session(policy, budget, miss="link")  # every miss a load, as MIN counts them
            offload = session.offload
            prefill = decode = 0.0
            hits = misses = loads = prefetches = 0
            routing: dict[int, list[set[int]]] = {}  # per MoE layer, the experts of every step of every request
            counted: list[bool] = []  # the steps whose loads count: decode steps of the measured requests
            for i, prompt in enumerate(prompts):
                steps = target.steps([prompt], args.n)
                for k, step in enumerate(steps):
                    for traffic in step.layers:
                        routing.setdefault(traffic.layer, []).append(set(traffic.ids))
                    counted.append(i > 0 and k > 0)
                player = ReplayModel(session.provider, target.hidden, cpu, torch.float32, max(s.tokens for s in steps))
                session.provider.begin_request()
                offload.reset_stats()
                player.step(steps[0])
                stats = offload.stats
                moved0, hits0, misses0 = sum(stats.bytes_moved.values()), stats.hits, stats.misses
                loads0, prefetches0 = sum(stats.loads.values()), stats.prefetches
                for step in steps[1:]:
                    player.step(step)
                if i == 0:
                    continue  # the warm-up request
                prefill += moved0 / hot
                decode += (sum(stats.bytes_moved.values()) - moved0) / hot
                hits += stats.hits - hits0
                misses += stats.misses - misses0
                loads += sum(stats.loads.values()) - loads0
                prefetches += stats.prefetches - prefetches0
            # the floor for this row's slots: layers held whole load nothing
            floor = sum(min_loads(routing[layer], state.capacity, counted)
                        for layer, state in offload.layers.items()) / args.r / args.n
            per_token, count = decode / args.r / args.n, loads / args.r / args.n
            print(f"{label:>4} {policy:12} prefill {prefill / args.r:6.1f} experts/request  decode {per_token:5.2f}"
                  f" experts/token (MIN {floor:5.2f}, {per_token / floor if floor else 0:4.2f}x), loads {count:5.2f} "
                  f"({count / floor if floor else 0:4.2f}x; prefetched {prefetches / args.r / args.n:5.2f})"
                  f"  decode hit {hits / (hits + misses):.3f}", flush=True)
            session.close()


if __name__ == "__main__":
    main()
