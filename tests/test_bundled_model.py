"""The bundled trained model: size, quality through our own loader, packaging, and its training script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from fate_cli.model.loader import load_model
from fate_cli.perplexity import perplexity
from fate_cli.registry import BUNDLED_ROOT, resolve
from fate_cli.tokenizer import Tokenizer
from tests.helpers import fate_in_process

ROOT = Path(__file__).resolve().parent.parent
TINY = BUNDLED_ROOT / "tiny"


def card_figure(label: str) -> float:
    """A value from the model card's metrics table (README.md beside the weights)."""
    card = (TINY / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^\| " + re.escape(label) + r" \| ([0-9.]+) \|$", card, re.M)
    assert match, f"the model card states no '{label}'"
    return float(match.group(1))


def test_default_alias_is_the_bundled_model():
    assert resolve(None).path == TINY
    assert resolve("tiny").path == TINY


def test_bundled_files_are_small():
    weights = (TINY / "model.safetensors").stat().st_size
    assert weights <= 20_000_000
    config = json.loads((TINY / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert config["num_hidden_layers"] >= 8 and config["num_experts"] >= 16 and config["num_experts_per_tok"] >= 2


def test_heldout_perplexity_matches_the_card():
    torch.set_flush_denormal(True)  # as the CLI does on CPU; only speed depends on it
    model = load_model(TINY, "cpu", torch.float32).model
    tok = Tokenizer(TINY)
    ids = tok.encode((TINY / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False)
    windows = int(re.search(r"first (\d+) windows", (TINY / "README.md").read_text()).group(1))
    stated = card_figure(f"held-out perplexity, first {windows} windows (checked in CI)")
    measured = perplexity(model, ids, 256, windows).perplexity
    assert measured <= stated * 1.01, (measured, stated)
    assert measured > 5  # a model that scores near 1 on held-out text has seen it


def test_run_tiny_is_english_and_stable():
    cmd = ["run", "tiny", "Once upon a time", "-n", "40", "--temperature", "0", "--json"]
    first = fate_in_process(*cmd)
    assert first.returncode == 0, first.stderr
    second = fate_in_process(*cmd)
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["token_ids"] == b["token_ids"]
    words = re.findall(r"[A-Za-z]+", a["text"])
    assert len(words) >= 5
    common = {"the", "a", "of", "to", "and", "is", "in", "it", "i", "you", "that", "not", "be", "for", "time"}
    assert any(w.lower() in common for w in words), a["text"]


def test_wheel_includes_the_model(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        check=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "heldout.txt"):
        assert f"fate_cli/models/tiny/{name}" in names
    assert "fate_cli/models.toml" in names
    assert "quant/configs/gemv_tiles_NVIDIA_H100_80GB_HBM3.json" in names  # the GEMV's tuned tiles
    with zipfile.ZipFile(wheel) as z:
        # fate_cli/models.toml links to the top-level file: the wheel holds its content, not a link
        assert z.read("fate_cli/models.toml") == (ROOT / "models.toml").read_bytes()
        assert b"[models.tiny]" in z.read("fate_cli/models.toml")


def test_training_script_smoke_on_cpu(tmp_path):
    """A few CPU steps; CI has no data/ (built from Debian packages), so the held-out text stands in for it."""
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    ids = Tokenizer(TINY).encode((TINY / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False)
    np.asarray(ids[:40_000], dtype=np.uint16).tofile(data / "train.bin")
    np.asarray(ids[40_000:50_000], dtype=np.uint16).tofile(data / "heldout.bin")
    out = tmp_path / "smoke"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--device", "cpu", "--steps", "3", "--batch", "4",
         "--data-dir", str(data), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=ROOT,
    )
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and log["complete"]
    model = load_model(out, "cpu", torch.float32).model  # the export loads like any Hub checkpoint
    assert model.args.num_experts == 32 and model.args.top_k == 4
