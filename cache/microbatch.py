"""Klotski's multi-batch pipeline planner: how many prompts pass through each layer together in prefill.

Prompts prefilled one after another each bring every expert of a layer they route to that is not on the
device; prompts prefilled together (micro-batches: each keeps its own attention and KV-cache row, the MoE
runs once over all their tokens) bring each expert once for the whole group, and the group's compute over a
layer grows with its size. Klotski picks the smallest group whose compute over a layer covers the copies of
the experts the device lacks, within the memory the budget leaves for the group's activations.

The times are measured on the running cache (one expert copied at the tier the policy moves, one expert's
FFN over PROBE_TOKENS rows), once per cache.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

PROBE_TOKENS = 256  # rows of the expert FFN timed for the compute side


@dataclass(frozen=True)
class LayerTimes:
    copy_s: float  # one expert from the host tier to the device
    token_s: float  # one prompt token through a layer's experts (top-k expert FFNs)

    def describe(self) -> str:
        return f"copy {self.copy_s * 1e3:.2f} ms an expert, compute {self.token_s * 1e6:.2f} us a token a layer"


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
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


def measure_layer_times(host: torch.Tensor, expert: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                        hidden: int, dtype: torch.dtype, top_k: int) -> LayerTimes:
    """host: one expert's buffer at the tier the policy moves; expert: an expert FFN on the device."""
    dest = torch.empty_like(host, device=device)
    copy_s = _median_seconds(lambda: dest.copy_(host, non_blocking=True), device)
    x = torch.randn(PROBE_TOKENS, hidden, device=device, dtype=dtype)
    ffn_s = _median_seconds(lambda: expert(x), device)
    return LayerTimes(copy_s, top_k * ffn_s / PROBE_TOKENS)


def group_size(lengths: Sequence[int], times: LayerTimes, copies_per_layer: float, max_tokens: int) -> int:
    """Prompts per group: the fewest whose compute over a layer covers the layer's copies, within max_tokens
    (the activations the plan holds room for) and the number of prompts; at least one."""
    if not lengths:
        return 1
    mean_len = sum(lengths) / len(lengths)
    copy_s = copies_per_layer * times.copy_s
    cover = math.ceil(copy_s / (mean_len * times.token_s)) if times.token_s > 0 else len(lengths)
    fit = max_tokens // max(lengths)
    return max(1, min(cover, fit, len(lengths)))


def plan_groups(lengths: Sequence[int], times: LayerTimes, copies_per_layer: float,
                max_tokens: int) -> list[list[int]]:
    """Prompt indices in groups prefilled together, in order, as even as group_size allows."""
    n = group_size(lengths, times, copies_per_layer, max_tokens)
    count = math.ceil(len(lengths) / n)
    base, extra = divmod(len(lengths), count)
    groups, start = [], 0
    for g in range(count):
        size = base + (g < extra)
        groups.append(list(range(start, start + size)))
        start += size
    return groups
