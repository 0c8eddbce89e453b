"""Prefill's grouped experts (quant/grouped.py): every routed expert of a layer in one pass, against the plain
reference and the per-expert loop; on CPU the 16-bit path, on a GPU (skipped without one) also the cache's
packed slots through the Triton grouped GEMM."""

from __future__ import annotations

import pytest
import torch

from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.model import moe
from fate_cli.model.experts import ResidentExperts
from fate_cli.model.loader import load_model
from quant.expert_act import ClampedSwiGLU
from quant.grouped import GROUPED_DENSE, GROUPED_PACKED, grouped_backend, grouped_ffn
from quant.layout import ExpertLayout
from quant.moe_kernels import DenseBank, PackedBank, identity_table, moe_ffn_reference
from quant.synthetic import random_quantized
from quant.triton_kernels import HAVE_TRITON
from tests.helpers import one_thread  # noqa: F401 - one_thread applies to this module
from tests.tiny_gpt_oss import make_tiny_gpt_oss
from tests.tiny_models import FAMILIES, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA_OK = HAVE_TRITON and torch.cuda.is_available()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def _routing(tokens: int, k: int, experts: int, gen: torch.Generator, skip: int = -1) -> tuple[torch.Tensor, ...]:
    """Random routing that never picks expert `skip` (a group of zero rows)."""
    pool = [e for e in range(experts) if e != skip]
    ids = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(tokens)])
    return torch.rand(tokens, k, generator=gen), ids


@pytest.mark.parametrize("biased", [False, True])
def test_dense_grouped_matches_the_reference(biased):
    gen = torch.Generator().manual_seed(7)
    experts, hidden, inter, tokens, k = 6, 32, 16, 11, 2
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    extra = {}
    if biased:
        extra = {"gate_up_bias": torch.randn(experts, 2 * inter, generator=gen),
                 "down_bias": torch.randn(experts, hidden, generator=gen), "act": ClampedSwiGLU(1.702, 7.0)}
    bank = DenseBank(gate_up, down, identity_table(experts, "cpu"), **extra)
    x = torch.randn(tokens, hidden, generator=gen)
    weights, ids = _routing(tokens, k, experts, gen, skip=3)
    assert grouped_backend(x, bank) == GROUPED_DENSE
    assert _rel(grouped_ffn(x, weights, ids, bank), moe_ffn_reference(x, weights, ids, bank)) < 1e-6


def test_unaligned_or_mixed_dtype_banks_take_no_grouped_path():
    bank = DenseBank(torch.zeros(4, 2 * 6, 10), torch.zeros(4, 10, 6), identity_table(4, "cpu"))
    assert grouped_backend(torch.zeros(3, 10), bank) is None  # rows of 40 bytes: not 16-byte aligned
    bank = DenseBank(torch.zeros(4, 32, 16), torch.zeros(4, 16, 16), identity_table(4, "cpu"))
    assert grouped_backend(torch.zeros(3, 16, dtype=torch.bfloat16), bank) is None


def _tiny(tmp_path, family: str):
    if family == "gpt_oss":
        return load_model(make_tiny_gpt_oss(tmp_path / family), "cpu", torch.float32).model
    return load_model(make_tiny_model(tmp_path / family, family=family), "cpu", torch.float32).model


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_oss"])
def test_prefill_runs_grouped_with_the_loops_tokens(tmp_path, family, monkeypatch):
    """Prefill never asks the provider for experts one by one, and gives the expert loop's greedy tokens."""
    model = _tiny(tmp_path, family)
    calls = []
    original = ResidentExperts.experts

    def counting(self, layer, ids, counts):  # noqa: ANN001, ANN202
        calls.append(len(ids))
        return original(self, layer, ids, counts)

    monkeypatch.setattr(ResidentExperts, "experts", counting)
    prompt = torch.randint(3, 100, (23,), generator=torch.Generator().manual_seed(5)).tolist()
    sampler = Sampler(SamplingParams(temperature=0.0), torch.device("cpu"))
    cache = model.new_cache(1, 64)
    with torch.no_grad():
        model(torch.tensor([prompt]), cache, 0)
    assert calls == []  # every MoE layer of the prompt in one grouped pass
    grouped = generate(model, prompt, 20, sampler).token_ids
    monkeypatch.setattr(moe, "GROUPED_MIN_TOKENS", 1 << 30)
    looped = generate(model, prompt, 20, sampler).token_ids
    assert calls  # the loop ran this time
    assert grouped == looped


@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA and Triton")
@pytest.mark.parametrize("hidden,inter", [(2048, 768), (512, 1408)])
@pytest.mark.parametrize("tokens", [5, 64, 512])
def test_packed_grouped_mixes_tiers_against_the_reference(hidden, inter, tokens):
    """Slots at INT4 g64 and INT2 g32 in one layer, slots out of expert order, many tokens."""
    cuda = torch.device("cuda")
    gen = torch.Generator().manual_seed(inter + tokens)
    hot, cold = ExpertLayout.quantized(hidden, inter, 4, 64), ExpertLayout.quantized(hidden, inter, 2, 32)
    experts, k = 8, 2
    buf = torch.zeros(experts, hot.nbytes, dtype=torch.uint8)
    tiers = [0, 1, 0, 1, 1, 0, 0, 1]
    for s, t in enumerate(tiers):
        buf[s, : (hot, cold)[t].nbytes] = random_quantized((hot, cold)[t], gen)
    slot_of = [4, 6, 0, 2, 1, 3, 7, 5]
    table = torch.tensor([slot_of, [tiers[s] for s in slot_of]], dtype=torch.int32)
    bank = PackedBank(buf.to(cuda), (hot, cold), table.to(cuda))
    x = torch.randn(tokens, hidden, generator=gen).to(cuda)
    weights, ids = _routing(tokens, k, experts, gen, skip=5)
    weights, ids = weights.to(cuda), ids.to(cuda)
    assert grouped_backend(x.bfloat16(), bank) == GROUPED_PACKED
    ref = moe_ffn_reference(x, weights, ids, bank)
    assert _rel(grouped_ffn(x, weights, ids, bank).float(), ref) < 1e-5
    assert _rel(grouped_ffn(x.bfloat16(), weights, ids, bank).float(), ref) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_grouped_on_the_gpu_in_bfloat16():
    cuda = torch.device("cuda")
    gen = torch.Generator().manual_seed(3)
    experts, hidden, inter, tokens, k = 16, 256, 128, 300, 4
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(cuda, torch.bfloat16)
    down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(cuda, torch.bfloat16)
    bank = DenseBank(gate_up, down, identity_table(experts, cuda))
    x = torch.randn(tokens, hidden, generator=gen).to(cuda, torch.bfloat16)
    weights, ids = (t.to(cuda) for t in _routing(tokens, k, experts, gen, skip=2))
    assert grouped_backend(x, bank) == GROUPED_DENSE
    ref = moe_ffn_reference(x.float(), weights, ids, bank)
    assert _rel(grouped_ffn(x, weights, ids, bank).float(), ref) < 2e-2


def test_the_device_line_says_which_prefill_path_runs():
    from fate_cli.engine.runtime import open_model

    assert "prefill: grouped GEMM (torch)" in open_model("tiny", "cpu").describe()
    line = open_model("tiny", "cpu", policy="resident", vram="30MB").describe()
    assert "prefill: expert by expert (CPU), attention SDPA " in line, line
