"""Our runtime against transformers (the reference) on tiny random checkpoints of every family."""

from __future__ import annotations

import pytest
import torch

from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.model.loader import load_model
from tests.tiny_models import make_tiny_model

transformers = pytest.importorskip("transformers")

CASES = {
    "mixtral": {},
    "qwen2_moe": {"mlp_only_layers": [1], "norm_topk_prob": False},
    "qwen2_moe-sparse-step": {"family": "qwen2_moe", "decoder_sparse_step": 2, "norm_topk_prob": True},
    "qwen3_moe": {"norm_topk_prob": True},
    "qwen3_moe-sharded": {"family": "qwen3_moe", "shards": 3, "tie_word_embeddings": True},
    "olmoe": {"clip_qkv": 0.5},
    "olmoe-norm": {"family": "olmoe", "norm_topk_prob": True},
}


def _build(tmp_path, case: str):
    overrides = dict(CASES[case])
    family = overrides.pop("family", case)
    path = make_tiny_model(tmp_path / case, family=family, **overrides)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(tmp_path, case):
    path, ref = _build(tmp_path, case)
    ours = load_model(path, "cpu", torch.float32).model
    vocab = ref.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (1, 17), generator=g)

    cache = ours.new_cache(1, 64)
    with torch.no_grad():
        logits = ours(prompt, cache, 0)
        expected = ref(prompt).logits
    rel = (logits - expected).norm() / expected.norm()
    assert rel < 1e-5, f"{case}: relative logit error {rel:.2e}"

    # the KV-cache decode path token by token, against transformers' own generate
    result = generate(ours, prompt[0].tolist(), 20, Sampler(SamplingParams(temperature=0), torch.device("cpu")))
    with torch.no_grad():
        theirs = ref.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, prompt.shape[1]:].tolist()
    assert result.token_ids == theirs


def test_chunked_prefill_equals_one_shot(tmp_path):
    """A prompt fed in two chunks through the cache gives the same last logits as in one pass."""
    path = make_tiny_model(tmp_path / "m", family="qwen3_moe")
    model = load_model(path).model
    tokens = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(tokens, model.new_cache(1, 32), 0)[:, -1]
        cache = model.new_cache(1, 32)
        model(tokens[:, :7], cache, 0)
        chunked = model(tokens[:, 7:], cache, 7)[:, -1]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
