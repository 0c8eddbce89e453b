"""Miss curves for the measured slot plan: a model's own decode routing of held-out text, and per MoE layer the
fewest loads (Belady's MIN) serving it with 0..experts slots.

The bundled model's curves are gathered once (`python3 scripts/gather_miss_curves.py`) and ship beside it as
miss_curves.json, from the second half of its held-out text (bench prompts come from the first); a model
without curves is planned evenly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from cache.allocation import miss_curve
from fate_cli.engine.replay import record
from fate_cli.model.model import Transformer
from fate_cli.registry import BUNDLED_ROOT, is_bundled_default

CURVES_FILE = "miss_curves.json"
PROFILE_PROMPTS = 4
PROFILE_PROMPT_LEN = 128
PROFILE_GEN = 64


def gather_miss_curves(model: Transformer, prompts: Sequence[Sequence[int]], gen_len: int) -> dict[int, list[int]]:
    """Per MoE layer, MIN's decode loads for 0..experts slots over greedy generation after each prompt, one
    request after another (prefill steps fill the cache but their loads are not counted)."""
    steps: dict[int, list[list[int]]] = {}
    counted: list[bool] = []
    for trace in record(model, prompts, gen_len):
        for k, step in enumerate(trace):
            for traffic in step.layers:
                steps.setdefault(traffic.layer, []).append(traffic.ids)
            counted.append(k > 0)
    return {layer: miss_curve(s, model.args.num_experts, counted) for layer, s in steps.items()}


def profile_prompts(token_ids: Sequence[int]) -> list[list[int]]:
    """PROFILE_PROMPTS windows of the second half of a held-out text's tokens."""
    half = list(token_ids[len(token_ids) // 2 :])
    return [half[i * PROFILE_PROMPT_LEN : (i + 1) * PROFILE_PROMPT_LEN] for i in range(PROFILE_PROMPTS)]


def read_curves(path: Path) -> dict[int, list[int]] | None:
    if not path.is_file():
        return None
    return {int(layer): curve for layer, curve in json.loads(path.read_text(encoding="utf-8")).items()}


def offline_miss_curves(model_path: Path) -> dict[int, list[int]] | None:
    """A model's miss curves, where they were gathered (for now the bundled model's), or None: plan evenly."""
    return read_curves(BUNDLED_ROOT / "tiny" / CURVES_FILE) if is_bundled_default(model_path) else None
