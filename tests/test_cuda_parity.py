"""Greedy tokens on CUDA (float32) against the CPU's, through fate's own runtime (skipped without CUDA).

Every family's tiny random checkpoint and the bundled model give the CPU's greedy tokens on the GPU; klotski's
grouped prefill on the GPU gives each prompt's tokens from `resident` alone, with the planner's groups, one
group of all prompts, and each prompt alone."""

from __future__ import annotations

import pytest
import torch

from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.engine.runtime import open_model
from fate_cli.model.loader import load_model
from fate_cli.registry import BUNDLED_ROOT
from fate_cli.tokenizer import Tokenizer
from tests.tiny_models import FAMILIES, make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = ["Once upon a time", "What does hack mean?", "The Python interpreter"]
TEXTS = ["The hacker ethic", "What does hack mean? It is a word that", "In Python, a list comprehension", "Unix",
         "A kludge is", "The Jargon File says that a hacker"]
TOKENS = 40


def _greedy(path, device: str, prompts: list[list[int]]) -> list[list[int]]:  # noqa: ANN001 - a Path
    model = load_model(path, device, torch.float32).model
    sampler = Sampler(SamplingParams(temperature=0.0), torch.device(device))
    return [generate(model, ids, TOKENS, sampler).token_ids for ids in prompts]


@pytest.mark.parametrize("family", [*FAMILIES, "bundled"])
def test_cuda_gives_the_cpus_greedy_tokens(tmp_path, family):
    if family == "bundled":
        path = BUNDLED_ROOT / "tiny"
        if not (path / "model.safetensors").is_file():
            pytest.skip("the bundled model's weights are not here")
    else:
        path = make_tiny_model(tmp_path / family, family=family)
    tok = Tokenizer(path)
    prompts = [tok.encode(p) for p in PROMPTS]
    cpu, cuda = _greedy(path, "cpu", prompts), _greedy(path, "cuda", prompts)
    assert [len(t) for t in cpu] == [TOKENS] * len(PROMPTS)
    assert cuda == cpu


def test_klotski_groups_on_cuda_keep_each_prompts_tokens(tmp_path, monkeypatch):
    from cache.microbatch import LayerTimes
    from fate_cli.engine.stores import quantize_model_for
    from fate_cli.registry import resolve
    from quant.store import QuantParams

    monkeypatch.setenv("FATE_HOME", str(tmp_path))
    quantize_model_for(resolve("tiny"), QuantParams(method="minmax"))  # the lent GPU has no hqq
    ref = open_model("tiny", "cuda", "float32", "resident", "1GB", 4)
    greedy = Sampler(SamplingParams(temperature=0.0), torch.device("cuda"))
    prompts = [ref.tokenizer.encode(t) for t in TEXTS]
    alone = [generate(ref.model, p, 12, greedy).token_ids for p in prompts]
    del ref
    # the planner's groups from measured times; copies far slower than compute (one group); compute covering them
    for label, times in (("measured", None), ("one group", LayerTimes(1.0, 0.0, 1e-9)),
                         ("alone", LayerTimes(0.0, 0.0, 1.0))):
        rt = open_model("tiny", "cuda", "float32", "klotski", "84MB", 4)  # a GPU's workspace needs more than 16MB
        if times is not None:
            rt.offload.layer_times = times
        assert [r.token_ids for r in generate_batch(rt.model, prompts, 12, greedy).results] == alone, label
        if label == "alone":
            assert rt.offload.last_groups == [[i] for i in range(len(TEXTS))]
