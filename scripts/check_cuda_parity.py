"""Greedy tokens on CUDA (float32) against CPU, through fate's own runtime, for every family.

    python scripts/check_cuda_parity.py [--tokens 40]

Builds a tiny random checkpoint of each family (tests/tiny_models.py, needs transformers) and adds
the bundled model when its weights are present; prints one row per model and exits non-zero when
any differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.model.loader import load_model
from fate_cli.registry import BUNDLED_ROOT
from fate_cli.tokenizer import Tokenizer

PROMPTS = ["Once upon a time", "What does hack mean?", "The Python interpreter"]


def greedy(path: Path, device: str, prompt_ids: list[int], tokens: int) -> list[int]:
    model = load_model(path, device, torch.float32).model
    sampler = Sampler(SamplingParams(temperature=0.0), torch.device(device))
    return generate(model, prompt_ids, tokens, sampler).token_ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=40)
    a = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available here; run this on a GPU machine")
    from tests.tiny_models import FAMILIES, make_tiny_model

    models: list[tuple[str, Path]] = []
    tmp = Path(tempfile.mkdtemp())
    for family in FAMILIES:
        models.append((f"tiny random {family}", make_tiny_model(tmp / family, family=family)))
    if (BUNDLED_ROOT / "tiny" / "model.safetensors").is_file():
        models.append(("bundled tiny", BUNDLED_ROOT / "tiny"))
    failures = 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, path in models:
        tok = Tokenizer(path)
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            cpu, cuda = greedy(path, "cpu", ids, a.tokens), greedy(path, "cuda", ids, a.tokens)
            same = cpu == cuda
            failures += not same
            first = next((i for i, (x, y) in enumerate(zip(cpu, cuda)) if x != y), None)
            detail = "" if same else f" (first difference at token {first})"
            print(f"{name:28s} | {prompt!r:26s} | {len(cpu)} tokens | identical: {same}{detail}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
