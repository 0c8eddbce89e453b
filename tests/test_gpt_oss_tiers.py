"""gpt_oss's biased, clamped-SwiGLU experts in the tier store, the tiered provider and the offload cache (CPU).

The tiny checkpoints of tests/tiny_gpt_oss.py, plain (rewritten in bfloat16, so that the store's 16-bit copies
hold exactly the checkpoint's values) and MXFP4."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cache.offload import OffloadedExperts
from cache.policies import PolicyContext, make_policy
from cache.setup import footprint
from cache.tiered import TieredExperts, uniform_tiers
from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.runtime import DEFAULT_CONTEXT
from fate_cli.engine.stores import quantize_model
from fate_cli.errors import BadModel
from fate_cli.model.experts import DenseExpert
from fate_cli.model.loader import Checkpoint, load_args, load_model
from quant.kernels import CPU as CPU_BACKEND
from quant.kernels import QuantExpert, dequantized_weights, expert_biases
from quant.layout import ExpertLayout
from quant.moe_kernels import PackedBank, identity_table, moe_ffn_reference
from quant.store import MANIFEST, QuantParams, TierStore, check_store
from tests.helpers import fate_in_process, fixed_plan
from tests.tiny_gpt_oss import make_tiny_gpt_oss

pytest.importorskip("transformers")
CPU = torch.device("cpu")
PROMPTS = [[5, 9, 14, 3, 27, 8, 11, 40, 41, 7, 99, 12, 60], [17, 4, 4, 80]]
PARAMS = QuantParams(method="minmax", dense_layers=4)  # every layer also at 16 bits


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0), CPU)


def to_bf16(path):  # noqa: ANN001, ANN201
    weights = path / "model.safetensors"
    tensors = {k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module", params=["plain", "mxfp4"])
def tiny(request, tmp_path_factory):
    """(checkpoint folder, its tier store) for each layout."""
    root = tmp_path_factory.mktemp(f"gpt_oss_{request.param}")
    if request.param == "plain":
        path = to_bf16(make_tiny_gpt_oss(root / "model"))
    else:
        path = make_tiny_gpt_oss(root / "model", mxfp4=True)
    quantize_model(path, root / "store", PARAMS)
    return path, TierStore.open(root / "store", path)


def test_the_store_keeps_each_experts_biases_at_16_bits(tiny):
    path, store = tiny
    args = load_args(path)
    assert store.manifest["model"]["expert_bias"] is True
    ckpt = Checkpoint(path)
    for tier in ("hot", "cold", "dense"):
        lay = store.tiers[tier].layout
        assert lay.bias == "bfloat16"
        assert [s.name for s in lay.segments][-2:] == ["gate_up.bias", "down.bias"]
        for layer, e in ((0, 0), (3, 2)):
            gate_up, down = lay.biases(store.read(tier, layer, e))
            gate, up, dn = (ckpt.get(n).bfloat16() for n in args.experts.bias_names(layer, e))
            assert torch.equal(gate_up, torch.cat((gate, up))) and torch.equal(down, dn)
            assert gate.abs().sum() > 0  # random, not transformers' zeros


def test_a_manifest_without_the_bias_flag_is_refused(tiny, tmp_path):
    """The flag decides the layouts a check recomputes: a manifest that drops it no longer matches its tiers."""
    path, store = tiny
    manifest = json.loads((store.dir / MANIFEST).read_text(encoding="utf-8"))
    del manifest["model"]["expert_bias"]
    (store.dir / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    try:
        with pytest.raises(BadModel, match="disagrees with the recorded parameters"):
            check_store(store.dir, path, deep=False)
        manifest["model"]["expert_bias"] = "yes"
        (store.dir / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
        with pytest.raises(BadModel, match="expert_bias must be true"):
            check_store(store.dir, path, deep=False)
    finally:
        manifest["model"]["expert_bias"] = True
        (store.dir / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    check_store(store.dir, path, deep=True)


def test_a_quantized_expert_is_the_dense_expert_of_its_dequantized_weights(tiny):
    path, store = tiny
    act = load_args(path).expert_act
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * 2
    for tier in ("hot", "cold"):
        lay = store.tiers[tier].layout
        buf = store.read(tier, 1, 3)
        dense = DenseExpert(*dequantized_weights(buf, lay, torch.float32), expert_biases(buf, lay, torch.float32), act)
        ours = QuantExpert(buf, lay, CPU_BACKEND, act)
        assert torch.equal(ours(x), dense(x))
        plain = QuantExpert(buf, lay, CPU_BACKEND)  # without biases and clamp: another function
        plain.biases = None
        assert not torch.allclose(plain(x), dense(x), atol=1e-2)


def test_the_16_bit_tier_gives_the_resident_tokens(tiny):
    """Every expert from the store's dense tier: bit for bit the checkpoint's own experts (plain layout in
    bfloat16; MXFP4 weights are exact in bfloat16, but its float32 biases are rounded: not compared)."""
    path, store = tiny
    resident = load_model(path, CPU, torch.float32).model
    args = resident.args
    tiered = resident.with_experts(TieredExperts(store, args, uniform_tiers(args, "dense"), CPU, torch.float32))
    if path.parent.name.startswith("gpt_oss_plain"):
        with torch.no_grad():
            tokens = torch.tensor([PROMPTS[0]])
            ours = tiered(tokens, tiered.new_cache(1, 32), 0)
            assert torch.equal(ours, resident(tokens, resident.new_cache(1, 32), 0))
    for p in PROMPTS:
        assert generate(tiered, p, 20, greedy()).token_ids == generate(resident, p, 20, greedy()).token_ids


def offloaded(model, store, policy: str, slots: int) -> OffloadedExperts:  # noqa: ANN001
    args = model.args
    plan = fixed_plan(args, store, slots)
    ctx = PolicyContext.of(args, model.routers())
    return OffloadedExperts(store, plan, make_policy(policy, ctx), CPU, torch.float32, transfer_tier="hot",
                            act=args.expert_act)


@pytest.mark.parametrize("policy", ["fate", "lru"])
def test_offloaded_experts_give_the_tiered_tokens(tiny, policy):
    """Two slots of four a layer, every expert moved at the hot tier: the tokens of every expert resident at the
    hot tier, through the eager path and the uncaptured decode step (the packed bank's reference kernels)."""
    path, store = tiny
    model = load_model(path, CPU, torch.float32).model
    args = model.args
    tiered = model.with_experts(TieredExperts(store, args, uniform_tiers(args, "hot"), CPU, torch.float32))
    provider = offloaded(model, store, policy, slots=2)
    cached = model.with_experts(provider)
    for p in PROMPTS:
        expected = generate(tiered, p, 20, greedy()).token_ids
        assert generate(cached, p, 20, greedy()).token_ids == expected
        graphs = DecodeGraphs(cached, capture=False)
        assert generate(cached, p, 20, greedy(), graphs=graphs).token_ids == expected
        assert graphs.describe() == "decode: static, uncaptured"
    assert provider.stats.misses > 0 and provider.stats.hits > 0


def test_the_packed_bank_reference_adds_the_biases(tiny):
    """The reference the Triton kernels are held to: a packed bank of biased clamped experts equals the
    quantized experts' own sum."""
    path, store = tiny
    act = load_args(path).expert_act
    lay = store.tiers["hot"].layout
    bufs = [store.read("hot", 2, e) for e in range(4)]
    bank = PackedBank(torch.stack(bufs), (lay, lay), identity_table(4, CPU), act)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    ids, weights = torch.tensor([[0, 3], [2, 1], [3, 2]]), torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    expected = torch.stack([sum(w * QuantExpert(bufs[e], lay, CPU_BACKEND, act)(x[t : t + 1])[0]
                                for e, w in zip(ids[t].tolist(), weights[t].tolist())) for t in range(3)])
    torch.testing.assert_close(moe_ffn_reference(x, weights, ids, bank), expected, rtol=1e-5, atol=1e-5)


def test_run_with_a_small_budget_tiers_the_experts(tiny, tmp_path):
    """`fate run --vram` with a budget below the 16-bit experts: planned, offloaded, every policy the same tokens."""
    path, _ = tiny
    args = load_args(path)
    fp = footprint(args, torch.float32, min(DEFAULT_CONTEXT, args.max_position_embeddings), QuantParams(), False)
    budget = fp.fixed + 3 * len(fp.moe_layers) * fp.expert_hot  # three of four slots a layer
    assert fp.expert_hot == ExpertLayout.quantized(64, 32, 4, 64, "bfloat16").nbytes  # biases counted
    assert budget < fp.fixed + len(fp.moe_layers) * args.num_experts * fp.expert_full  # below the 16-bit experts
    runs = {}
    for policy, bits in (("fate", "4"), ("lru", "4"), ("resident", "4"), ("fate", None)):
        result = fate_in_process("run", str(path), "hello there", "-n", "12", "--raw", "--temperature", "0",
                                 "--json", "--vram", str(budget), "--policy", policy,
                                 *(("--transfer-bits", bits) if bits else ()), home=tmp_path / "home")
        assert result.returncode == 0, result.stderr
        runs[policy, bits] = json.loads(result.stdout)
    same_tier = [r["token_ids"] for (_, bits), r in runs.items() if bits]
    assert all(t == same_tier[0] for t in same_tier)
    assert runs["lru", "4"]["stats"]["cache"]["misses"] > 0
    assert len(runs["fate", None]["token_ids"]) == 12  # misses at INT2, hits at INT4: tokens may differ


def test_an_mxfp4_store_is_built_one_expert_at_a_time(tmp_path, monkeypatch):
    """Building from MXFP4 reads each fused tensor one expert's slice at a time (blocks, scales, biases), each
    slice once: no full-size copy of a layer's experts, let alone the model's, is ever in memory."""
    from quant.source import SourceReader

    path = make_tiny_gpt_oss(tmp_path / "model", mxfp4=True)
    reads: list[tuple[str, int]] = []
    real = SourceReader._read

    def counted(self, name, *rest):  # noqa: ANN001, ANN002, ANN202 - the reader's own read, recorded
        reads.append((name, rest[-1]))
        return real(self, name, *rest)

    monkeypatch.setattr(SourceReader, "_read", counted)
    quantize_model(path, tmp_path / "store", QuantParams(method="minmax"))
    args = load_args(path)
    sizes = {name: t.numel() * t.element_size() for name, t in load_file(str(path / "model.safetensors")).items()}
    fused = [n for n in sizes if ".experts." in n]
    assert {n for n, _ in reads} == set(fused)  # only expert tensors are read, each of them
    for name, nbytes in reads:
        assert nbytes * args.num_experts == sizes[name]  # one expert's slice
    assert len(reads) == len(fused) * args.num_experts  # every slice once (gate and up share one read)


def test_slot_biases_read_each_pairs_expert_at_its_tier(tiny):
    """What the grouped prefill adds to a packed bank's products: each pair's expert's biases, from its slot at
    its tier's offset (slots out of expert order, two tiers of different layouts)."""
    from quant.grouped import slot_biases

    _, store = tiny
    hot, cold = store.tiers["hot"].layout, store.tiers["cold"].layout
    slot_of, tier_of = [2, 0, 3, 1], [1, 0, 0, 1]
    buf = torch.zeros(4, hot.nbytes, dtype=torch.uint8)
    for e, (s, t) in enumerate(zip(slot_of, tier_of)):
        lay = (hot, cold)[t]
        buf[s, : lay.nbytes] = store.read(("hot", "cold")[t], 1, e)
    bank = PackedBank(buf, (hot, cold), torch.tensor([slot_of, tier_of], dtype=torch.int32))
    experts = torch.tensor([0, 0, 1, 2, 3, 3])
    for part, which in (("gate_up", 0), ("down", 1)):
        expected = torch.stack([(hot, cold)[tier_of[e]].biases(store.read(("hot", "cold")[tier_of[e]], 1, e))[which]
                                for e in experts.tolist()])
        assert torch.equal(slot_biases(bank, experts, part), expected)
