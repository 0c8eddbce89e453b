"""Fuzz the loaders: mutated config.json and safetensors headers load cleanly or fail with a FateError."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fate_cli.errors import FateError
from fate_cli.model.loader import load_model
from tests.tiny_models import make_tiny_model

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
    st.lists(st.integers(-2, 4), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@cache
def source(family: str) -> Path:
    return make_tiny_model(Path(tempfile.mkdtemp()) / family, family=family)


def load_or_clean_error(path: Path) -> None:
    try:
        model = load_model(path, "cpu", torch.float32).model
    except FateError as err:
        assert str(err) and "\n" not in str(err)
        return
    cache_ = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache_, 0)  # a model that loaded also runs


def fresh_copy(family: str) -> Path:
    dest = Path(tempfile.mkdtemp()) / family
    shutil.copytree(source(family), dest)
    return dest


WRONG_VALUES = [None, [], "x", -1, 10**9, "<removed>"]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_every_config_field_wrong(family):
    """Each field in turn replaced by a wrong type, a negative, a huge number, or removed."""
    path = fresh_copy(family)
    original = json.loads((path / "config.json").read_text())
    for key in sorted(original):
        for value in WRONG_VALUES:
            cfg = {k: v for k, v in original.items() if not (k == key and value == "<removed>")}
            if value != "<removed>":
                cfg[key] = value
            (path / "config.json").write_text(json.dumps(cfg))
            load_or_clean_error(path)
    shutil.rmtree(path.parent)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]), data=st.data())
def test_mutated_config(family, data):
    path = fresh_copy(family)
    cfg = json.loads((path / "config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(cfg)))
        if data.draw(st.booleans()):
            cfg.pop(key)
        else:
            cfg[key] = data.draw(JSON_VALUES)
    (path / "config.json").write_text(json.dumps(cfg))
    load_or_clean_error(path)
    shutil.rmtree(path.parent)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_safetensors_header(data):
    path = fresh_copy("qwen3_moe")
    weights = path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    action = data.draw(st.sampled_from(["flip", "truncate", "length"]))
    if action == "flip":  # damage bytes of the length prefix or the JSON header
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, 8 + header_len - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif action == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    weights.write_bytes(bytes(raw))
    load_or_clean_error(path)
    shutil.rmtree(path.parent)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_generation_config(data):
    """A generation_config.json's sampling fields either give a sampler that samples, or one clean error."""
    from fate_cli.engine.generate import Sampler, SamplingParams
    from fate_cli.model.generation_config import generation_defaults

    gen = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40}
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(gen)))
        if data.draw(st.booleans()):
            gen.pop(key, None)
        else:
            gen[key] = data.draw(st.one_of(JSON_VALUES, st.floats(0, 2), st.integers(0, 10**6)))
    try:
        d = generation_defaults(gen, Path("generation_config.json"))
    except FateError as err:
        assert str(err) and "\n" not in str(err) and "; " in str(err)
        return
    params = SamplingParams(temperature=d.temperature if d.do_sample else 0.0, top_p=d.top_p, top_k=d.top_k, seed=1)
    logits = torch.randn(2, 4096, generator=torch.Generator().manual_seed(0)) * 10
    tokens = Sampler(params, torch.device("cpu"))(logits).tolist()
    assert all(0 <= t < 4096 for t in tokens)
