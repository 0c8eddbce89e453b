"""Klotski's multi-batch pipeline planner: how many prompts pass through each layer together in prefill.

Prompts prefilled one after another each bring every expert of a layer they route to that is not on the
device, and each run every expert they route to as its own call; prompts prefilled together (micro-batches:
each keeps its own attention and KV-cache row, the MoE runs once over all their tokens) bring each expert
once for the whole group and call it once. A layer's time for a group is about the larger of its copies and
its compute (the copies hide behind the compute), so the time per token falls as the group grows until the
compute covers the copies and the calls' fixed cost is spread thin. The planner takes the smallest group
within GROUP_SLACK of the best time per token the memory allows (a larger group only holds its prompts'
first tokens back and takes more memory).

The times are measured on the running cache once: one expert copied at the tier the policy moves, and one
expert's FFN at two row counts (a fixed cost per call and a cost per row).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

FFN = Callable[[torch.Tensor], torch.Tensor]
PROBE_ROWS = (32, 512)  # rows of the expert FFN timed: its fixed cost per call and its cost per row
GROUP_SLACK = 0.1  # the smallest group within this share of the best time per token


@dataclass(frozen=True)
class LayerTimes:
    copy_s: float  # one expert from the host tier to the device
    call_s: float  # one expert FFN call's fixed cost (launches, small-matrix latency)
    row_s: float  # each row of an expert FFN call

    def describe(self) -> str:
        return (f"copy {self.copy_s * 1e3:.2f} ms an expert, expert call {self.call_s * 1e6:.1f} us + "
                f"{self.row_s * 1e6:.3f} us a row")


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up: kernels compiled, allocations made
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_layer_times(host: torch.Tensor, make_expert: Callable[[torch.Tensor], FFN], device: torch.device,
                        hidden: int, dtype: torch.dtype) -> LayerTimes:
    """host: one expert's buffer at the tier the policy moves; make_expert: its FFN from a device copy of it
    (the buffer the timed copies filled)."""
    dest = torch.empty_like(host, device=device)
    copy_s = _median_seconds(lambda: dest.copy_(host, non_blocking=True), device)
    expert = make_expert(dest)
    (r1, r2) = PROBE_ROWS
    t1, t2 = (_median_seconds(lambda x=torch.randn(r, hidden, device=device, dtype=dtype): expert(x), device)
              for r in PROBE_ROWS)
    row_s = max(0.0, (t2 - t1) / (r2 - r1))
    return LayerTimes(copy_s, max(0.0, t1 - row_s * r1), row_s)


def token_seconds(n: int, mean_len: float, times: LayerTimes, copies: float, experts: int, top_k: int) -> float:
    """A layer's time per prompt token for a group of n prompts: the larger of its copies and its compute."""
    tokens = n * mean_len
    compute = min(experts, tokens * top_k) * times.call_s + tokens * top_k * times.row_s
    return max(copies * times.copy_s, compute) / tokens


def most_together(lengths: Sequence[int], max_tokens: int) -> int:
    """The most prompts a group can hold: max_tokens of activations, for prompts up to the longest; at least one."""
    return max(1, min(len(lengths), max_tokens // max(lengths, default=1)))


def group_size(lengths: Sequence[int], times: LayerTimes, copies: float, experts: int, top_k: int,
               max_tokens: int) -> int:
    """Prompts per group: the fewest within GROUP_SLACK of the best time per token that fit max_tokens (the
    activations the plan holds room for); at least one. copies: experts a layer lacks; experts: a layer's."""
    if not lengths:
        return 1
    mean_len = sum(lengths) / len(lengths)
    cap = most_together(lengths, max_tokens)
    cost = [token_seconds(n, mean_len, times, copies, experts, top_k) for n in range(1, cap + 1)]
    best = min(cost)
    return next(n for n, c in enumerate(cost, 1) if c <= (1 + GROUP_SLACK) * best)


def plan_groups(lengths: Sequence[int], times: LayerTimes, copies: float, experts: int, top_k: int,
                max_tokens: int) -> list[list[int]]:
    """Prompt indices in groups prefilled together, in order, as even as group_size allows."""
    n = group_size(lengths, times, copies, experts, top_k, max_tokens)
    count = math.ceil(len(lengths) / n)
    base, extra = divmod(len(lengths), count)
    groups, start = [], 0
    for g in range(count):
        size = base + (g < extra)
        groups.append(list(range(start, start + size)))
        start += size
    return groups
