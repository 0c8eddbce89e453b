"""Decode speed of `fate chat` answers with the live panel against without it, alternating, same prompt.

    python3 benchmarks/measure_panel_cost.py [--model tiny] [--vram 16MB] [-n 200] [--rounds 4]

The panel renders into a terminal-like console that discards its output, at the chat's refresh rate.
"""

from __future__ import annotations

import argparse
import io
import statistics

from rich.console import Console
from rich.live import Live

from fate_cli.chat import PANEL_REFRESH_PER_S, ChatSession
from fate_cli.engine.generate import SamplingParams
from fate_cli.engine.runtime import open_model
from fate_cli.panel import ChatPanel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--vram", default="16MB")
    ap.add_argument("--device", default=None)
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    runtime = open_model(a.model, a.device, None, "fate", a.vram)
    speeds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(a.rounds):
        for with_panel in (False, True):
            session = ChatSession(runtime, None, SamplingParams(temperature=0.0), a.n)
            view = ChatPanel(runtime, session.counters)

            def on_token(t: int, view: ChatPanel = view) -> bool:
                view.answer.append("x")
                view.meter.token()
                return False

            if with_panel:
                console = Console(file=io.StringIO(), force_terminal=True, width=120)
                with Live(view, console=console, refresh_per_second=PANEL_REFRESH_PER_S):
                    _, stats = session.ask("Tell me a long story about hackers.", on_token, view.meter.prefill)
            else:
                _, stats = session.ask("Tell me a long story about hackers.", on_token, view.meter.prefill)
            speeds[with_panel].append(stats.decode_tokens_per_s)
    off, on = statistics.median(speeds[False]), statistics.median(speeds[True])
    print(f"{runtime.describe()}")
    print(f"decode tokens/s, median of {a.rounds}: no panel {off:.2f}, panel {on:.2f}; "
          f"cost {100 * (1 - on / off):.1f}%")


if __name__ == "__main__":
    main()
