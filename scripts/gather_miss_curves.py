"""Gather the bundled model's miss curves (fate_cli/engine/profile.py) into fate_cli/models/tiny/miss_curves.json.

    python3 scripts/gather_miss_curves.py
"""

from __future__ import annotations

import json

import torch

from fate_cli.engine.profile import CURVES_FILE, PROFILE_GEN, gather_miss_curves, profile_prompts
from fate_cli.model.loader import load_model
from fate_cli.registry import BUNDLED_ROOT
from fate_cli.tokenizer import Tokenizer
from quant.files import write_atomic


def main() -> None:
    root = BUNDLED_ROOT / "tiny"
    ids = Tokenizer(root).encode((root / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False)
    model = load_model(root, torch.device("cpu"), torch.float32).model
    curves = gather_miss_curves(model, profile_prompts(ids), PROFILE_GEN)
    text = json.dumps({str(layer): curve for layer, curve in sorted(curves.items())}) + "\n"
    write_atomic(root / CURVES_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(f"wrote {root / CURVES_FILE}")


if __name__ == "__main__":
    main()
