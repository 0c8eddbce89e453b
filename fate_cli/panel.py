"""The chat's live panel: speed, expert cache at work, memory. Built from plain numbers at each refresh."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cache.budget import format_size


@dataclass
class AnswerMeter:
    """One answer's live numbers, updated from the token callback (cheap: a counter and a clock)."""

    prompt_tokens: int = 0
    prefill_tokens_per_s: float = 0.0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    decode_tokens_per_s: float = 0.0

    def prefill(self, tokens: int) -> None:
        """The prefill starts now, over `tokens` tokens (only the new ones when the KV cache is reused)."""
        self.prompt_tokens, self.started = tokens, time.perf_counter()

    def token(self) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self.prefill_tokens_per_s = self.prompt_tokens / max(now - self.started, 1e-9)
        self.tokens += 1
        if self.tokens > 1:
            self.decode_tokens_per_s = (self.tokens - 1) / max(now - self.first_token_at, 1e-9)


class ChatPanel:
    """Renders the answer being streamed and, below it, the panel; rich.live calls __rich__ on each refresh."""

    def __init__(self, runtime, session_stats):  # noqa: ANN001 - Runtime, SessionCounters
        self.runtime, self.session = runtime, session_stats
        self.answer = Text()
        self.meter = AnswerMeter()

    def __rich__(self) -> Group:
        return Group(self.answer, self.render())

    def render(self) -> Panel:
        rt, m = self.runtime, self.meter
        off = rt.offload
        lines = Table.grid(padding=(0, 2))
        lines.add_column(style="bold cyan")
        lines.add_column()
        lines.add_row("speed", f"prefill {m.prefill_tokens_per_s:,.1f} tok/s · decode {m.decode_tokens_per_s:,.1f} "
                      f"tok/s · {m.tokens} tokens")
        if off is not None:
            answer_hits, answer_total = self.session.answer_counts(off.stats)
            session_rate = off.stats.hit_rate
            recall = off.stats.decode_recall
            lines.add_row("experts", f"hit {_pct(answer_hits, answer_total)} this answer · "
                          f"{100 * session_rate:.1f}% session · prediction recall "
                          f"{'-' if recall is None else f'{recall:.2f}'} · moved "
                          f"{format_size(sum(off.stats.bytes_moved.values()))}")
            lines.add_row("memory", f"{_device_memory(rt)} · host tier {format_size(off.host.nbytes)}"
                          f"{' pinned' if off.host.pin else ''}")
            lines.add_row("cpu/link", _hybrid_line(off.stats))
            lines.add_row("layers", _layer_strip(off))
        else:
            lines.add_row("experts", "all resident at 16 bits (the budget holds the whole model)")
            lines.add_row("memory", _device_memory(rt))
        title = f"{rt.resolved.name} · {rt.describe().split(';')[-1].strip()}"
        return Panel(lines, title=title, title_align="left", border_style="dim")


def _hybrid_line(stats) -> str:  # noqa: ANN001 - cache.stats.CacheStats
    """Misses computed on the CPU and their time, bytes moved over the link and the time compute waited on it."""
    return (f"{stats.cpu_experts} experts on the CPU ({stats.cpu_seconds * 1000:,.0f} ms) · moved "
            f"{format_size(sum(stats.bytes_moved.values()))} · waited on the link {stats.stall_seconds * 1000:,.0f} ms")


def _pct(hits: int, total: int) -> str:
    return f"{100 * hits / total:.1f}%" if total else "-"


def _device_memory(rt) -> str:  # noqa: ANN001
    device = rt.loaded.device
    budget = f" of {format_size(rt.setup.budget)} budget" if rt.setup else ""
    if device.type == "cuda":
        return f"GPU {format_size(torch.cuda.memory_allocated(device))} used{budget}"
    planned = f"plan holds {format_size(rt.setup.plan.device_bytes)}{budget}" if rt.setup else "every weight in RAM"
    return f"CPU run (the device tier is RAM): {planned}"


def _layer_strip(off) -> Text:  # noqa: ANN001 - OffloadedExperts
    """Per MoE layer: a bar of cache occupancy, coloured by the layer's hit rate."""
    strip = Text()
    occupancy = off.occupancy()
    for layer in off.policy.ctx.moe_layers:
        if layer in off.full:
            fill, rate = 1.0, 1.0
        else:
            fill = occupancy.get(layer, 0) / max(1, off.layers[layer].capacity) if layer in off.layers else 0.0
            stats = off.stats.layers.get(layer)
            rate = stats.hit_rate if stats else 1.0
        colour = "green" if rate >= 0.9 else "yellow" if rate >= 0.6 else "red"
        strip.append("▁▂▃▄▅▆▇█"[min(7, int(fill * 7.999))], style=colour)
    strip.append("  (bar: slots filled; colour: hit rate ≥90% green, ≥60% yellow, lower red)", style="dim")
    return strip
