"""`fate run` end to end on CPU, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, fate_in_process
from tests.tiny_models import make_tiny_model

FATE = [sys.executable, "-m", "fate_cli"]


def fate_subprocess(*args: str, home: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m fate_cli ARGS` in a process of its own, as a user runs it."""
    env = dict(os.environ)
    if home is not None:
        env["FATE_HOME"] = str(home)
    return subprocess.run([*FATE, *args], capture_output=True, text=True, env=env, timeout=timeout)


def fate(*args: str, home: Path | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    """`fate ARGS` in this process (tests.helpers.fate_in_process): the same entry point without a new
    interpreter importing torch each time."""
    return fate_in_process(*args, home=home, stdin=stdin)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "qwen3", family="qwen3_moe")


def test_run_json_greedy_is_reproducible(tiny):
    first = fate("run", str(tiny), "hello there", "-n", "12", "--temperature", "0", "--json", "--device", "cpu")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert set(out) == {"model", "device", "prompt_token_ids", "token_ids", "text", "stats"}
    assert out["device"] == "cpu"
    assert 1 <= len(out["token_ids"]) <= 12
    assert out["stats"]["generated_tokens"] == len(out["token_ids"])
    assert out["stats"]["prompt_tokens"] == len(out["prompt_token_ids"])
    # the chat template wraps the prompt: <|im_start|>user ... <|im_end|> <|im_start|>assistant
    assert out["prompt_token_ids"][0] == 1 and 2 in out["prompt_token_ids"]
    second = fate_subprocess("run", str(tiny), "hello there", "-n", "12", "--temperature", "0", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["token_ids"] == out["token_ids"]  # the installed entry point, same tokens


def test_run_raw_skips_template_and_streams_text(tiny):
    raw = fate("run", str(tiny), "hello there", "-n", "5", "--raw", "--json")
    ids = json.loads(raw.stdout)["prompt_token_ids"]
    assert 1 not in ids and 2 not in ids
    streamed = fate("run", str(tiny), "hello there", "-n", "8", "--raw", "--temperature", "0")
    assert streamed.returncode == 0
    as_json = fate("run", str(tiny), "hello there", "-n", "8", "--raw", "--temperature", "0", "--json")
    assert streamed.stdout.strip() == json.loads(as_json.stdout)["text"].strip()
    assert "tok/s" in streamed.stderr


def test_sampling_with_seed(tiny):
    a = fate("run", str(tiny), "hi", "-n", "10", "--raw", "--temperature", "1.5", "--seed", "7", "--json")
    b = fate("run", str(tiny), "hi", "-n", "10", "--raw", "--temperature", "1.5", "--seed", "7", "--json")
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]



def test_unknown_alias_suggests_close_match(tmp_path):
    assert_one_line_error(fate("run", "mixtrall", "hi", home=tmp_path), 3, "did you mean", "mixtral")


def test_alias_not_pulled(tmp_path):
    assert_one_line_error(fate("run", "olmoe", "hi", home=tmp_path), 3, "fate pull olmoe")


def test_unsupported_model_type(tmp_path, tiny):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(fate("run", str(bad), "hi"), 4, "llama", "qwen3_moe", "mixtral")


def test_unsupported_rope_scaling(tmp_path, tiny):
    bad = make_tiny_model(tmp_path / "rope", family="mixtral")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(fate("run", str(bad), "hi"), 4, "yarn")


def test_missing_and_truncated_safetensors(tmp_path):
    model = make_tiny_model(tmp_path / "trunc", family="olmoe")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(fate("run", str(model), "hi"), 4, "model.safetensors")
    weights.unlink()
    assert_one_line_error(fate("run", str(model), "hi"), 3, "model.safetensors")


def test_missing_shard(tmp_path):
    model = make_tiny_model(tmp_path / "sharded", family="qwen3_moe", shards=2)
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shard.unlink()
    assert_one_line_error(fate("run", str(model), "hi"), 3, shard.name)


def test_shape_mismatch(tmp_path):
    model = make_tiny_model(tmp_path / "shape", family="qwen3_moe")
    cfg = json.loads((model / "config.json").read_text())
    cfg["moe_intermediate_size"] = 24
    (model / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(fate("run", str(model), "hi"), 4, "shape")


def test_malformed_config(tmp_path):
    model = make_tiny_model(tmp_path / "json", family="qwen3_moe")
    (model / "config.json").write_text("{not json")
    assert_one_line_error(fate("run", str(model), "hi"), 4, "config.json")


def test_cuda_unavailable_is_clear(tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_one_line_error(fate("run", str(tiny), "hi", "--device", "cuda"), 2, "--device cpu")


def test_budget_below_minimum_is_refused_before_loading(tmp_path):
    assert_one_line_error(fate("run", "tiny", "hi", "--vram", "1MB", home=tmp_path), 6, "minimum", "raise --vram")
    assert_one_line_error(fate("run", "tiny", "hi", "--vram", "8XB", home=tmp_path), 2, "8XB")
