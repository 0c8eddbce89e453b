"""A synthetic shape opened as a runtime (what `fate run` and `fate serve` load): random weights, experts in the
tiers, a byte tokenizer, every policy planned as for a real model."""

from __future__ import annotations

import pytest

from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.runtime import model_args, open_model, resolve_model
from fate_cli.errors import UsageError
from tests.helpers import one_thread  # noqa: F401 - one_thread applies to this module
from tests.test_bench import SMALL_MIXTRAL

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "synthetic:small-mixtral"


@pytest.fixture(autouse=True)
def small_shape(monkeypatch):
    from fate_cli import synthetic

    monkeypatch.setitem(synthetic.CONFIGS, "small-mixtral", SMALL_MIXTRAL)


def greedy(runtime, prompt: str, n: int) -> list[int]:
    ids = runtime.tokenizer.encode(prompt)
    sampler = Sampler(SamplingParams(temperature=0.0), runtime.loaded.device)
    return generate(runtime.model, ids, n, sampler, runtime.tokenizer.eos_ids, graphs=runtime.graphs).token_ids


def test_synthetic_runtime_reads_bytes_and_runs_resident_by_default():
    runtime = open_model(NAME, device="cpu")
    assert runtime.setup.policy == "resident" and runtime.offload is not None
    assert runtime.resolved.name == NAME and "mixtral" in runtime.describe()
    tok = runtime.tokenizer
    assert tok.encode("hé") == [104, 195, 169] and tok.decode([5, 4095]) == "<5><4095>"
    assert tok.eos_ids == [] and tok.vocab_size == SMALL_MIXTRAL["vocab_size"]
    assert tok.render_chat([]) == "assistant: " and tok.encode_chat([]) == list(b"assistant: ")
    tokens = greedy(runtime, "hello", 6)
    assert len(tokens) == 6 and all(0 <= t < tok.vocab_size for t in tokens)
    assert greedy(open_model(NAME, device="cpu"), "hello", 6) == tokens  # the same seed: the same model


def test_synthetic_runtime_plans_a_policy_and_moves_experts():
    runtime = open_model(NAME, device="cpu", policy="lru", vram="8.7MB", dtype="float32")
    assert runtime.setup.policy == "lru" and not runtime.setup.full_precision
    runtime.offload.reset_stats()
    assert len(greedy(runtime, "hello", 6)) == 6
    assert sum(runtime.offload.sync_stats().as_dict()["bytes_moved"].values()) > 0


def test_synthetic_names_checked_before_loading():
    assert model_args(NAME).num_experts == SMALL_MIXTRAL["num_local_experts"]
    with pytest.raises(UsageError, match="unknown synthetic model"):
        resolve_model("synthetic:gpt-9")
