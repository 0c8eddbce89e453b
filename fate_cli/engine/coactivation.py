"""Klotski's offline co-activation counts: the model's own routing of held-out text, window by window."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch

from fate_cli.engine.replay import record
from fate_cli.model.loader import load_model
from fate_cli.model.model import Transformer
from fate_cli.registry import BUNDLED_ROOT, is_bundled_default
from fate_cli.tokenizer import Tokenizer
from predictors.coactivation import Coactivation
from predictors.cross_layer import predict_next

GATHER_TOKENS = 4096  # held-out tokens run through the bundled model for its offline counts
GATHER_WINDOW = 512


def gather(model: Transformer, token_ids: Sequence[int], window: int = GATHER_WINDOW) -> Coactivation:
    """Offline counts: the model's routing of token_ids (prefill, window by window)."""
    args = model.args
    gates = {layer: weight.float().cpu() for layer, weight in model.routers().items()}
    co = Coactivation(list(args.moe_layer_ids), args.num_experts)
    windows = [list(token_ids[i : i + window]) for i in range(0, len(token_ids) - window + 1, window)]
    for steps in record(model, windows, 1):  # the prompt's step routes every token of the window
        co.add_step({t.layer: predict_next(t.gate_input, gates[t.layer], args.top_k) for t in steps[0].layers})
    return co


@lru_cache(maxsize=1)
def bundled_coactivation() -> Coactivation:
    """The bundled model's counts on the second half of its held-out text (bench prompts come from the first)."""
    root = BUNDLED_ROOT / "tiny"
    ids = Tokenizer(root).encode((root / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False)
    model = load_model(root, torch.device("cpu"), torch.float32).model
    return gather(model, ids[len(ids) // 2 :][:GATHER_TOKENS])


def offline_coactivation(model_path: Path) -> Callable[[], Coactivation] | None:
    """Where a model's offline counts come from (for now the bundled model's only), or None: learn online."""
    return bundled_coactivation if is_bundled_default(model_path) else None
