"""Where a missed expert runs: moved over the link into a slot, or computed on the CPU from the host tier.

At batch 1 an expert's product is memory-bound on either side: the CPU reads its bytes from RAM, the link
carries them to the GPU. Moving pays when the expert is then used often enough on the GPU to repay the copy;
computing on the CPU pays when the link is the slower road. The decision takes measured numbers (`Costs`,
from `measure_costs`, or scripted by a test) and the expected reuse of each missed expert, and is made per
miss by `split_misses`, greedily, keeping both sides busy: a step's time is the later of the link's copies
(then the GPU's products) and the CPU's products, which run at the same time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cache.eviction import INFLATION_LIMIT  # rebased the same way as DecayedFrequency's counts

MODES = ("auto", "cpu", "link")  # --miss: the cost model decides; every miss on the CPU; every miss moved
REUSE_DECAY = 0.9  # the weight of a layer's last step in an expert's routing frequency (about ten steps' memory)


@dataclass(frozen=True)
class Costs:
    """Measured (or scripted) costs, in seconds and bytes per second."""

    link_bytes_per_s: float  # host -> device copies from pinned memory (the emulated link, when slower)
    host_bytes_per_s: float  # the host's RAM, read and written by a plain copy
    cpu_expert_s: float  # one expert for one token on the CPU (cpu_moe)
    cpu_token_s: float  # each further token through that expert on the CPU
    gpu_expert_s: float  # one expert for one token on the device
    expert_bytes: int  # one expert's buffer at the tier misses move and the CPU computes
    threads: int = 1  # the CPU experts' threads
    measured_link: float = 0.0  # the machine's own link, bytes/s (link_bytes_per_s when no --link)
    emulated_link: float | None = None  # --link, bytes/s

    def move_s(self) -> float:
        return self.expert_bytes / self.link_bytes_per_s

    def cpu_s(self, tokens: int) -> float:
        return self.cpu_expert_s + max(0, tokens - 1) * self.cpu_token_s

    def link_share(self) -> float:
        """The share of a step's misses the link can carry in the time the host reads the rest (freetoken)."""
        return self.link_bytes_per_s / (self.link_bytes_per_s + self.host_bytes_per_s)

    def moving_wins_from(self) -> int:
        """The fewest tokens through an expert at which moving it beats computing it on the CPU, with no reuse
        (prefill moves its experts from here)."""
        if self.cpu_token_s <= 0:
            return 1 << 30
        extra = self.move_s() + self.gpu_expert_s - self.cpu_expert_s
        return max(1, int(extra / self.cpu_token_s) + 2)

    def summary(self) -> str:
        link = f"link {self.measured_link / 1e9:.1f} GB/s pinned"
        if self.emulated_link:
            link += f", emulated {self.emulated_link / 1e9:.1f} GB/s"
        return (f"{link}; host copy {self.host_bytes_per_s / 1e9:.1f} GB/s (read+write); CPU experts on "
                f"{self.threads} threads, {1e6 * self.cpu_expert_s:.0f} us an expert, device "
                f"{1e6 * self.gpu_expert_s:.0f} us; moving wins from {self.moving_wins_from()} tokens")

    def as_dict(self) -> dict:
        return {"link_gb_per_s": self.link_bytes_per_s / 1e9, "measured_link_gb_per_s": self.measured_link / 1e9,
                "emulated_link_gb_per_s": None if self.emulated_link is None else self.emulated_link / 1e9,
                "host_gb_per_s": self.host_bytes_per_s / 1e9, "cpu_expert_us": 1e6 * self.cpu_expert_s,
                "cpu_token_us": 1e6 * self.cpu_token_s, "gpu_expert_us": 1e6 * self.gpu_expert_s,
                "expert_bytes": self.expert_bytes, "cpu_threads": self.threads,
                "moving_wins_from_tokens": self.moving_wins_from()}


def split_misses(misses: Sequence[tuple[int, int, float]], costs: Costs, mode: str = "auto") -> tuple[list[int],
                                                                                                     list[int]]:
    """misses: (expert, tokens, expected reuse) -> (experts computed on the CPU, experts moved).

    auto: the misses with most tokens first, each where the step would end sooner, a moved expert credited with
    the CPU time its expected later uses save (each would otherwise be computed on the CPU again)."""
    if mode == "link":
        return [], [e for e, _, _ in misses]
    if mode == "cpu":
        return [e for e, _, _ in misses], []
    link_end = cpu_end = 0.0
    host, move = [], []
    for e, n, reuse in sorted(misses, key=lambda m: (-m[1], m[0])):
        saved = reuse * max(0.0, costs.cpu_s(1) - costs.gpu_expert_s)
        moved = link_end + costs.move_s() + n * costs.gpu_expert_s
        if moved - saved <= cpu_end + costs.cpu_s(n):
            move.append(e)
            link_end += costs.move_s()
        else:
            host.append(e)
            cpu_end += costs.cpu_s(n)
    return host, move


class ReuseEstimate:
    """An expert's expected uses while it would stay in its layer's slots: its routing frequency per step
    (decayed) times the steps an admitted expert stays (slots over the experts a step brings in)."""

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        # per layer: frequencies times a factor that grows each step instead of every frequency decaying (the
        # host's cost per step is the step's experts, not every expert), and that factor
        self.freq: dict[int, list[float]] = {}
        self.unit: dict[int, float] = {}

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        f = self.freq.setdefault(layer, [0.0] * self.num_experts)
        unit = self.unit.get(layer, 1.0) / REUSE_DECAY
        if unit > INFLATION_LIMIT:  # rebase: every frequency scaled by the same factor
            f[:] = [v / unit for v in f]
            unit = 1.0
        self.unit[layer] = unit
        add = (1.0 - REUSE_DECAY) * unit
        for e in experts:
            f[e] += add

    def expected(self, layer: int, expert: int, capacity: int) -> float:
        f = self.freq.get(layer)
        return 0.0 if f is None else f[expert] / self.unit[layer] * capacity / max(1, self.top_k)


# ---- measurement ------------------------------------------------------------------------------------


def _best(fn: Callable[[], None], sync: Callable[[], None], reps: int = 5) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_link(host: torch.Tensor, device: torch.device) -> float:
    """Bytes per second of host -> device copies of `host` (pinned on CUDA), several in a row."""
    dest = torch.empty_like(host, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def copies() -> None:
        for _ in range(8):
            dest.copy_(host, non_blocking=True)

    return 8 * host.numel() / _best(copies, sync)


def measure_host(nbytes: int = 64 << 20) -> float:
    """Bytes per second a plain copy in RAM reads and writes (torch's threads)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best(lambda: dst.copy_(src), lambda: None, reps=3)


def measure_costs(experts: Sequence[tuple[torch.Tensor, object]], gpu_fn: Callable[[torch.Tensor], torch.Tensor],
                  hidden: int, device: torch.device, dtype: torch.dtype, cpu_fn: Callable, threads: int,
                  link: float | None = None) -> Costs:
    """The costs the decision needs, measured: experts are (host buffer, layout) of one layer at the CPU's tier
    (the first top_k of a layer), gpu_fn one expert on the device, cpu_fn quant/cpu_experts.cpu_moe. link: an
    emulated link (--link), bytes/s, slower than the measured one."""
    buf = experts[0][0]
    measured = measure_link(buf, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    n = len(experts)
    x1 = torch.randn(1, hidden).to(dtype)
    x8 = torch.randn(8, hidden).to(dtype)
    w1, w8 = torch.full((1, n), 1.0 / n), torch.full((8, n), 1.0 / n)
    one = _best(lambda: cpu_fn(x1, experts, w1), lambda: None, reps=3) / n
    eight = _best(lambda: cpu_fn(x8, experts, w8), lambda: None, reps=3) / n
    xd = x1.to(device)
    gpu = _best(lambda: gpu_fn(xd), sync)
    effective = min(measured, link) if link else measured
    return Costs(effective, measure_host(), one, max(0.0, (eight - one) / 7), gpu, buf.numel(), threads, measured,
                 link)


def clock_hz(device: torch.device) -> float:
    """Cycles per second of torch.cuda._sleep on this GPU (measured once: the emulated link's wait)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / (start.elapsed_time(end) / 1000)
