"""The captured decode step and its fused expert kernels on a GPU (skipped without CUDA and Triton).

The kernels against the plain-torch reference on fresh random inputs; greedy tokens of the captured step
against the eager forward on every family, the bundled model, and under an offloading cache."""

from __future__ import annotations

import pytest
import torch

from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.engine.runtime import open_model
from fate_cli.model.loader import load_model
from quant.layout import ExpertLayout
from quant.moe_kernels import FUSED, DenseBank, PackedBank, backend_for, moe_ffn, moe_ffn_reference
from quant.synthetic import random_quantized
from quant.triton_kernels import HAVE_TRITON
from tests.helpers import fixed_plan
from tests.tiny_models import FAMILIES, make_fitting_store, make_tiny_model

pytestmark = pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")
CUDA = torch.device("cuda")


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def _routing(tokens: int, k: int, experts: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(experts, generator=gen, device="cpu")[:k] for _ in range(tokens)]).to(CUDA)
    weights = torch.rand(tokens, k, generator=gen).to(CUDA)
    return weights, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,inter,tokens", [(256, 384, 1), (2048, 768, 1), (512, 1408, 4)])
def test_dense_bank_kernel_against_the_reference(dtype, hidden, inter, tokens):
    gen = torch.Generator().manual_seed(hidden + tokens)
    experts, k = 6, 2
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(CUDA, dtype)
    down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(CUDA, dtype)
    table = torch.tensor([[3, 0, -1, 1, 5, 2], [0] * 6], dtype=torch.int32, device=CUDA)  # expert 2 absent
    bank = DenseBank(gate_up, down, table)
    assert backend_for(CUDA, bank) == FUSED
    x = torch.randn(tokens, hidden, generator=gen).to(CUDA, dtype)
    weights, ids = _routing(tokens, k, experts, gen)
    got, ref = moe_ffn(x, weights, ids, bank), moe_ffn_reference(x.float(), weights, ids, bank)
    assert _rel(got.float(), ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("hidden,inter", [(2048, 768), (512, 1408), (4096, 1024)])
def test_packed_bank_kernel_mixes_tiers_against_the_reference(hidden, inter):
    """Slots at INT4 g64 and INT2 g32 in one layer, one expert absent, several tokens."""
    gen = torch.Generator().manual_seed(inter)
    hot, cold = ExpertLayout.quantized(hidden, inter, 4, 64), ExpertLayout.quantized(hidden, inter, 2, 32)
    slots = 5
    buf = torch.zeros(slots, hot.nbytes, dtype=torch.uint8)
    tiers = [0, 1, 0, 1, 1]
    for s, t in enumerate(tiers):
        lay = (hot, cold)[t]
        buf[s, : lay.nbytes] = random_quantized(lay, gen)
    #        expert: 0   1   2   3   4   5   6
    table = torch.tensor([[4, -1, 0, 2, 1, 3, -1], [1, 0, 0, 0, 1, 1, 0]], dtype=torch.int32)
    table[1] = torch.tensor([tiers[s] if s >= 0 else 0 for s in table[0].tolist()])
    bank = PackedBank(buf.to(CUDA), (hot, cold), table.to(CUDA))
    assert backend_for(CUDA, bank) == FUSED
    for tokens, k in ((1, 4), (3, 2)):
        x = torch.randn(tokens, hidden, generator=gen).to(CUDA, torch.bfloat16)
        weights, ids = _routing(tokens, k, 7, gen)
        ref = moe_ffn_reference(x.float(), weights, ids, bank)
        assert _rel(moe_ffn(x.float(), weights, ids, bank).float(), ref) < 1e-5
        assert _rel(moe_ffn(x, weights, ids, bank).float(), ref) < 1e-2


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0), CUDA)


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_step_gives_the_eager_tokens_on_every_family(tmp_path, family):
    model = load_model(make_tiny_model(tmp_path / family, family=family), CUDA, torch.float32).model
    prompt = [5, 9, 14, 3, 27, 8, 11]
    eager = generate(model, prompt, 24, greedy()).token_ids
    graphs = DecodeGraphs(model)
    assert generate(model, prompt, 24, greedy(), graphs=graphs).token_ids == eager
    assert graphs.describe().startswith("decode: one CUDA graph per step")
    prompts = [prompt, prompt[:2], [40, 41, 42]]
    alone = [generate(model, p, 12, greedy()).token_ids for p in prompts]
    assert [r.token_ids for r in generate_batch(model, prompts, 12, greedy(), graphs=graphs).results] == alone


def test_graph_step_on_the_bundled_model():
    rt = open_model("tiny", "cuda", "float32")
    prompt = rt.tokenizer.encode("What does hack mean? It is")
    eager = generate(rt.model, prompt, 48, greedy()).token_ids
    assert generate(rt.model, prompt, 48, greedy(), graphs=rt.graphs).token_ids == eager


@torch.inference_mode()
def test_graph_step_logits_in_bfloat16():
    """bf16: the captured step attends through another SDPA kernel (a mask over the whole cache) and sums
    its norms in another order, so a near tie may flip a greedy token; teacher-forced on eager's tokens, its
    logits stay within bf16 rounding of eager's and pick the same token at nearly every step."""
    rt = open_model("tiny", "cuda", "bfloat16")
    model = rt.model
    prompt = rt.tokenizer.encode("What does hack mean? It is")
    tokens = generate(model, prompt, 64, greedy()).token_ids
    eager_cache = model.new_cache(1, 256)
    graph_cache = rt.graphs.cache(1, 256)
    step = rt.graphs.step(graph_cache)
    ids = torch.tensor([prompt], device=CUDA)
    model(ids, eager_cache, 0)
    model(ids, graph_cache, 0)
    agree, errors = 0, []
    for i, t in enumerate(tokens[:-1]):
        pos = len(prompt) + i
        token = torch.tensor([t], device=CUDA)
        a = model(token.view(1, 1), eager_cache, pos)[:, -1].float()
        b = step(token, [pos]).float()
        agree += int(a.argmax() == b.argmax())
        errors.append(_rel(b, a))
    assert agree >= 0.95 * (len(tokens) - 1)
    assert sorted(errors)[len(errors) // 2] < 1e-2


@pytest.fixture(scope="module")
def fitting_model(tmp_path_factory):
    return make_fitting_store(tmp_path_factory.mktemp("fits"))


@pytest.mark.parametrize("policy", ["fate", "lru", "ondemand", "eap", "resident"])  # resident: 4 of 8 slots
def test_graph_step_under_offloading_keeps_tokens_and_bookkeeping(fitting_model, policy):
    """Four slots a layer, experts moved at the hot tier: tokens and the cache's counts equal the eager path's
    (the bundled model's 160-wide hidden size does not fit the kernels' 64-wide groups: it decodes eagerly)."""
    from cache.offload import OffloadedExperts
    from cache.policies import PolicyContext, make_policy

    path, store = fitting_model
    prompts = [[5, 9, 14, 3, 27, 8], [40, 2, 2, 17]]
    runs = {}
    for eager in (True, False):
        model = load_model(path, CUDA, torch.float32).model
        args = model.args
        ctx = PolicyContext.of(args, model.routers())
        plan = fixed_plan(args, store, 4)
        provider = OffloadedExperts(store, plan, make_policy(policy, ctx), CUDA, torch.float32, transfer_tier="hot")
        model = model.with_experts(provider)
        graphs = None if eager else DecodeGraphs(model)
        tokens = [generate(model, p, 20, greedy(), graphs=graphs).token_ids for p in prompts]
        s = provider.sync_stats()
        runs[eager] = (tokens, s.hits, s.misses, dict(s.bytes_moved), s.prefetches)
        if graphs is not None:
            assert "CUDA graph" in graphs.describe(), graphs.describe()
    assert runs[True] == runs[False]
    assert runs[False][2] > 0  # it did miss: the table and the copies were exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_and_rotary_against_torch(dtype):
    from fate_cli.model import triton_ops
    from fate_cli.model.kv_cache import RowPositions
    from fate_cli.model.layers import Rotary

    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(5, 2048, device=CUDA, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(2048, device=CUDA, generator=gen)).to(dtype)
    h = x.float()
    ref = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert _rel(triton_ops.rms_norm(x, w, 1e-6).float(), ref.float()) < (1e-6 if dtype == torch.float32 else 1e-2)
    rope = Rotary(128, 1e6, 300, CUDA)
    q = torch.randn(3, 1, 8, 128, device=CUDA, generator=gen).to(dtype).transpose(1, 2)  # as Attention lays it
    at = RowPositions.of([0, 17, 299], CUDA)
    half = 64
    cos, sin = rope.cos[at.positions][:, None, None, :].to(dtype), rope.sin[at.positions][:, None, None, :].to(dtype)
    eager = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
    fused = triton_ops.rope_rows(q, rope.cos, rope.sin, at.positions)
    # each product and the sum rounded where torch rounds them; an element may land one rounding step away
    assert _rel(fused.float(), eager.float()) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("layout", [{}, {"fused_experts": True, "text_only": True}])
def test_qwen3_5_moe_captured_step_gives_transformers_tokens_in_float32(tmp_path, layout):
    """The Gated DeltaNet hybrid through the captured step (its state replayed in place) against transformers'
    generate on the CPU, float32, one row and a batch."""
    transformers = pytest.importorskip("transformers")
    path = make_tiny_model(tmp_path / "q35", family="qwen3_5_moe", **layout)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path, CUDA, torch.float32).model
    prompts = [[5, 9, 14, 3, 27, 8, 11], [40, 41], list(range(3, 73))]  # the last over one 64-token chunk
    theirs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
        theirs.append(out[0, len(p):].tolist())
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the depthwise convolution in true float32, as on the CPU
    try:
        graphs = DecodeGraphs(model)
        assert generate(model, prompts[0], 20, greedy(), graphs=graphs).token_ids == theirs[0]
        assert graphs.describe().startswith("decode: one CUDA graph per step")
        batch = generate_batch(model, prompts, 20, greedy(), graphs=graphs)
        assert [r.token_ids for r in batch.results] == theirs
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
