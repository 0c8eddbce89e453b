"""gpt_oss's biased clamped-SwiGLU experts in the fused Triton MoE kernels and the captured decode step (skipped
without CUDA and Triton): the kernels against moe_ffn_reference, and greedy tokens of the captured step against
the eager path, resident at 16 bits and under an offloading cache over the tier store."""

from __future__ import annotations

import pytest
import torch

from cache.offload import OffloadedExperts
from cache.policies import PolicyContext, make_policy
from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.engine.stores import quantize_model
from fate_cli.model.loader import load_model
from quant.expert_act import ClampedSwiGLU
from quant.layout import ExpertLayout
from quant.moe_kernels import FUSED, DenseBank, PackedBank, backend_for, moe_ffn, moe_ffn_reference
from quant.store import QuantParams, TierStore
from quant.synthetic import random_quantized
from quant.triton_kernels import HAVE_TRITON
from tests.helpers import fixed_plan
from tests.tiny_gpt_oss import make_tiny_gpt_oss

pytestmark = pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")
CUDA = torch.device("cuda")
ACT = ClampedSwiGLU(alpha=1.702, limit=1.5)  # a low limit, so that inputs of std ~2 are clamped often


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def _routing(tokens: int, k: int, experts: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]).to(CUDA)
    return torch.rand(tokens, k, generator=gen).to(CUDA), ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,inter,tokens", [(256, 384, 1), (2880, 2880, 1), (512, 640, 4)])
def test_biased_clamped_dense_bank_against_the_reference(dtype, hidden, inter, tokens):
    gen = torch.Generator().manual_seed(hidden + tokens)
    experts, k = 6, 2
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) * 2 / hidden**0.5).to(CUDA, dtype)
    down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(CUDA, dtype)
    gate_up_bias = (torch.randn(experts, 2 * inter, generator=gen) * 0.5).to(CUDA, dtype)
    down_bias = (torch.randn(experts, hidden, generator=gen) * 0.5).to(CUDA, dtype)
    table = torch.tensor([[3, 0, -1, 1, 5, 2], [0] * 6], dtype=torch.int32, device=CUDA)  # expert 2 absent
    bank = DenseBank(gate_up, down, table, gate_up_bias, down_bias, ACT)
    assert backend_for(CUDA, bank) == FUSED
    x = torch.randn(tokens, hidden, generator=gen).to(CUDA, dtype)
    weights, ids = _routing(tokens, k, experts, gen)
    ref = moe_ffn_reference(x.float(), weights, ids, bank)
    assert _rel(moe_ffn(x, weights, ids, bank).float(), ref) < (1e-5 if dtype == torch.float32 else 2e-2)
    plain = DenseBank(gate_up, down, table)  # the reference does tell the two apart
    assert _rel(moe_ffn_reference(x.float(), weights, ids, plain), ref) > 0.1


@pytest.mark.parametrize("hidden,inter", [(2880, 2880), (512, 1408), (256, 128)])
def test_biased_clamped_packed_bank_mixes_tiers_against_the_reference(hidden, inter):
    """Slots at INT4 g64 and INT2 g32 in one layer, biases in each slot's buffer, one expert absent."""
    gen = torch.Generator().manual_seed(inter)
    hot = ExpertLayout.quantized(hidden, inter, 4, 64, "bfloat16")
    cold = ExpertLayout.quantized(hidden, inter, 2, 32, "bfloat16")
    tiers = [0, 1, 0, 1, 1]
    buf = torch.zeros(len(tiers), hot.nbytes, dtype=torch.uint8)
    for s, t in enumerate(tiers):
        lay = (hot, cold)[t]
        buf[s, : lay.nbytes] = random_quantized(lay, gen)
        for name in ("gate_up.bias", "down.bias"):  # larger than the synthetic store's, so that they matter
            lay.views(buf[s, : lay.nbytes])[name].normal_(0.0, 0.5, generator=gen)
    #        expert: 0   1   2   3   4   5   6
    table = torch.tensor([[4, -1, 0, 2, 1, 3, -1], [0] * 7], dtype=torch.int32)
    table[1] = torch.tensor([tiers[s] if s >= 0 else 0 for s in table[0].tolist()])
    bank = PackedBank(buf.to(CUDA), (hot, cold), table.to(CUDA), ACT)
    assert backend_for(CUDA, bank) == FUSED
    for tokens, k in ((1, 4), (3, 2)):
        x = (torch.randn(tokens, hidden, generator=gen) * 2).to(CUDA, torch.bfloat16)
        weights, ids = _routing(tokens, k, 7, gen)
        ref = moe_ffn_reference(x.float(), weights, ids, bank)
        assert _rel(moe_ffn(x.float(), weights, ids, bank).float(), ref) < 1e-5
        assert _rel(moe_ffn(x, weights, ids, bank).float(), ref) < 2e-2
        plain = PackedBank(bank.buf, (hot, cold), bank.table)  # no clamp: the reference tells them apart
        assert _rel(moe_ffn_reference(x.float(), weights, ids, plain), ref) > 0.05


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0), CUDA)


@pytest.fixture(scope="module", params=["plain", "mxfp4"])
def fitting(request, tmp_path_factory):
    """A tiny gpt_oss whose widths the fused kernels take (hidden 128, experts 64 wide), and its tier store."""
    root = tmp_path_factory.mktemp(f"gpt_oss_fits_{request.param}")
    path = make_tiny_gpt_oss(root / "model", mxfp4=request.param == "mxfp4", hidden_size=128, intermediate_size=64,
                             head_dim=32)
    quantize_model(path, root / "store", QuantParams(method="minmax"))
    return path, TierStore.open(root / "store", path)


PROMPTS = [[5, 9, 14, 3, 27, 8, 11, 40, 41, 7, 99, 12, 60], [17, 4, 4, 80]]


def test_captured_step_gives_the_eager_tokens_with_resident_experts(fitting):
    """Every expert resident at 16 bits: the biased dense bank in one CUDA graph a step."""
    model = load_model(fitting[0], CUDA, torch.float32).model
    eager = [generate(model, p, 20, greedy()).token_ids for p in PROMPTS]
    graphs = DecodeGraphs(model)
    assert [generate(model, p, 20, greedy(), graphs=graphs).token_ids for p in PROMPTS] == eager
    assert graphs.describe().startswith("decode: one CUDA graph per step"), graphs.describe()
    assert [r.token_ids for r in generate_batch(model, PROMPTS, 20, greedy(), graphs=graphs).results] == eager


@pytest.mark.parametrize("policy", ["fate", "lru", "resident"])  # resident: 2 of 4 slots, every layer cut
def test_captured_step_under_offloading_keeps_tokens_and_bookkeeping(fitting, policy):
    """Two slots a layer, experts moved at the hot tier (INT4, biases in each slot): the captured step's tokens
    and the cache's counts equal the eager path's."""
    path, store = fitting
    runs = {}
    for eager in (True, False):
        model = load_model(path, CUDA, torch.float32).model
        args = model.args
        plan = fixed_plan(args, store, 2)
        ctx = PolicyContext.of(args, model.routers())
        provider = OffloadedExperts(store, plan, make_policy(policy, ctx), CUDA, torch.float32, transfer_tier="hot",
                                    act=args.expert_act)
        model = model.with_experts(provider)
        graphs = None if eager else DecodeGraphs(model)
        tokens = [generate(model, p, 20, greedy(), graphs=graphs).token_ids for p in PROMPTS]
        s = provider.sync_stats()
        runs[eager] = (tokens, s.hits, s.misses, dict(s.bytes_moved))
        if graphs is not None:
            assert "CUDA graph" in graphs.describe(), graphs.describe()
    assert runs[True] == runs[False]
    assert runs[False][2] > 0


@pytest.mark.parametrize("tokens", [5, 64])
def test_biased_clamped_packed_grouped_prefill_against_the_reference(tokens):
    """The grouped prefill path (quant/grouped.py) over biased slots at two tiers, slots out of expert order."""
    from quant.grouped import GROUPED_PACKED, grouped_backend, grouped_ffn

    hidden, inter, experts, k = 512, 640, 8, 2
    gen = torch.Generator().manual_seed(tokens)
    hot = ExpertLayout.quantized(hidden, inter, 4, 64, "bfloat16")
    cold = ExpertLayout.quantized(hidden, inter, 2, 32, "bfloat16")
    tiers = [0, 1, 0, 1, 1, 0, 0, 1]
    buf = torch.zeros(experts, hot.nbytes, dtype=torch.uint8)
    for s, t in enumerate(tiers):
        lay = (hot, cold)[t]
        buf[s, : lay.nbytes] = random_quantized(lay, gen)
        for name in ("gate_up.bias", "down.bias"):
            lay.views(buf[s, : lay.nbytes])[name].normal_(0.0, 0.5, generator=gen)
    slot_of = [4, 6, 0, 2, 1, 3, 7, 5]
    table = torch.tensor([slot_of, [tiers[s] for s in slot_of]], dtype=torch.int32)
    bank = PackedBank(buf.to(CUDA), (hot, cold), table.to(CUDA), ACT)
    x = (torch.randn(tokens, hidden, generator=gen) * 2).to(CUDA)
    weights, ids = _routing(tokens, k, experts, gen)
    assert grouped_backend(x.bfloat16(), bank) == GROUPED_PACKED
    ref = moe_ffn_reference(x, weights, ids, bank)
    assert _rel(grouped_ffn(x, weights, ids, bank).float(), ref) < 1e-5
    assert _rel(grouped_ffn(x.bfloat16(), weights, ids, bank).float(), ref) < 2e-2
