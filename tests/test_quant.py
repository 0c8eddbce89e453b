"""Quantized tiers on CPU: packing, HQQ, the CPU kernel, the tier store, the tiered provider, verify."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from cache.tiered import TieredExperts, mixed_tiers, tiered_provider, uniform_tiers
from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.stores import quantize_model
from fate_cli.errors import BadModel, ModelNotFound
from fate_cli.model.experts import DenseExpert, ResidentExperts
from fate_cli.model.loader import load_model
from quant.hqq_quant import quantize_expert, quantize_matrix
from quant.kernels import CPU, CPU_FUSED, CPU_KERNEL_MAX_TOKENS, QuantExpert, dequantized_weights, triton_fits
from quant.layout import ExpertLayout
from quant.packing import codes_per_word, dequantize, pack_codes, unpack_codes
from quant.store import QuantParams, TierStore, check_store
from tests.helpers import one_thread  # noqa: F401 - autouse fixture
from tests.tiny_models import make_tiny_model

# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 31, 64, 77])
def test_pack_unpack_round_trip(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    q = torch.randint(0, 2**bits, (5, cols), generator=g, dtype=torch.int64).to(torch.uint8)
    words = pack_codes(q, bits)
    assert words.dtype == torch.int32 and words.shape == (5, -(-cols // codes_per_word(bits)))
    assert torch.equal(unpack_codes(words, bits, cols), q)


def test_pack_layout_is_lsb_first_along_the_row():
    q = torch.tensor([[1, 2, 3, 0, 1, 2, 3, 0, 3, 3, 3, 3, 3, 3, 3, 3]], dtype=torch.uint8)
    (word,) = pack_codes(q, 2)[0].tolist()
    assert word & 0xFFFFFFFF == sum(int(c) << (2 * i) for i, c in enumerate(q[0].tolist()))
    q4 = torch.arange(8, dtype=torch.uint8).view(1, 8) + 8
    assert pack_codes(q4, 4)[0, 0].item() & 0xFFFFFFFF == 0xFEDCBA98


# ------------------------------------------------------------------------------------------ HQQ


def test_our_hqq_route_equals_hqq_quantizer_bitwise():
    Quantizer = pytest.importorskip("hqq.core.quantize").Quantizer
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    for bits, group in ((4, 64), (2, 32)):
        p = quantize_matrix(w, bits, group)
        q, meta = Quantizer.quantize(w, nbits=bits, group_size=group, axis=1, bitpack=False, device="cpu")
        assert torch.equal(unpack_codes(p.codes, bits, 256).float(), q.reshape(48, 256).float())
        assert torch.equal(p.scale, meta["scale"].reshape(48, -1).half())
        assert torch.equal(p.zero, meta["zero"].reshape(48, -1).half())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_reconstruction_error_bands():
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    err = {}
    for bits, group in ((8, 64), (4, 64), (2, 32)):
        for method in ("hqq", "minmax"):
            err[bits, method] = _rel(dequantize(quantize_matrix(w, bits, group, method)), w)
    assert err[8, "hqq"] < 0.01
    assert 0.05 < err[4, "hqq"] < 0.11
    assert 0.3 < err[2, "hqq"] < 0.45
    assert err[4, "hqq"] < err[2, "hqq"] / 3
    for bits in (4, 2):  # the optimiser never does worse than its min-max start
        assert err[bits, "hqq"] <= err[bits, "minmax"]


def test_rows_not_a_multiple_of_the_group():
    w = torch.randn(6, 80, generator=torch.Generator().manual_seed(2))
    p = quantize_matrix(w, 4, 64)
    assert p.scale.shape == (6, 2) and p.codes.shape == (6, 10)
    assert _rel(dequantize(p), w) < 0.12


# ------------------------------------------------------------------------------------------ CPU kernel


def _random_expert(hidden: int, inter: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    return tuple(torch.randn(shape, generator=g) * 0.05 for shape in shapes)


@pytest.mark.parametrize("bits,group", [(4, 64), (2, 32), (8, 64), (3, 64)])
def test_cpu_kernel_equals_dequantize_then_matmul(bits, group):
    gate, up, down = _random_expert(128, 96, seed=bits)
    layout, buf = quantize_expert(gate, up, down, bits, group, method="minmax")
    expert = QuantExpert(buf, layout, backend=CPU)
    fused = QuantExpert(buf, layout)  # the default on a CPU: the fused kernel, except for INT3 (10 codes a word)
    assert fused.backend == (CPU if bits == 3 else CPU_FUSED)
    ref = DenseExpert(*dequantized_weights(buf, layout, torch.float32))
    for tokens in (1, 7, CPU_KERNEL_MAX_TOKENS + 1):  # decode, a small prefill and one past the fused kernel's
        x = torch.randn(tokens, 128)
        assert torch.equal(expert(x), ref(x))
        # the same function as float64 dequantize-then-matmul, within float32 rounding
        w64 = [w.double() for w in dequantized_weights(buf, layout, torch.float32)]
        exact = DenseExpert(*w64)(x.double())
        assert _rel(expert(x), exact) < 1e-5
        assert _rel(fused(x), exact) < 1e-5
        if tokens > CPU_KERNEL_MAX_TOKENS:  # more tokens: dequantized once, as the reference backend
            assert torch.equal(fused(x), ref(x))
        # bfloat16 activations: within bfloat16 rounding of the float32 result
        assert _rel(expert(x.bfloat16()).float(), exact) < 2e-2
        assert _rel(fused(x.bfloat16()).float(), exact) < 2e-2


def test_which_banks_fit_the_fused_moe_pass():
    """The captured step's packed pass runs the GEMV step over 256-column tiles: power-of-two groups up to 256."""
    from quant.moe_kernels import PackedBank, fused_fits

    def bank(*tiers):
        layouts = tuple(ExpertLayout.quantized(1536, 1536, bits, group) for bits, group in tiers)
        return PackedBank(torch.zeros(2, max(lay.nbytes for lay in layouts), dtype=torch.uint8), layouts,
                          torch.zeros(2, 4, dtype=torch.int32))

    assert fused_fits(bank((4, 64), (2, 32)))
    assert fused_fits(bank((8, 256), (4, 128)))
    assert not fused_fits(bank((4, 64), (4, 48)))  # 48 divides 1536 but is not a power of two
    assert not fused_fits(bank((4, 256), (2, 512)))  # a group wider than a tile
    assert not fused_fits(bank((4, 64), (3, 64)))  # INT3 codes straddle words


def test_which_tiers_fit_the_triton_kernels():
    """The GEMV sums inputs and products per group in power-of-two tiles: other group sizes (and INT3) take
    the torch dequant+matmul path on a GPU."""
    fits = {(bits, group): triton_fits(ExpertLayout.quantized(768, 384, bits, group))
            for bits, group in ((4, 64), (2, 32), (8, 64), (4, 128), (4, 48), (2, 96), (3, 64), (4, 256))}
    assert fits == {(4, 64): True, (2, 32): True, (8, 64): True, (4, 128): True, (4, 48): False, (2, 96): False,
                    (3, 64): False, (4, 256): False}  # 384 is not a multiple of 256


def test_which_matrices_the_hopper_gemm_takes():
    """The warp-specialized prefill GEMM takes 2- and 4-bit W in 64-column steps whose 16-column quarters lie in one
    group, reads the words by TMA (16-byte rows), and halves K for matrices whose tiles leave most multiprocessors
    idle (Mixtral's down at 512 rows)."""
    from quant import hopper_gemm as hg
    from quant.hqq_quant import quantize_matrix

    assert hg.fits(4, 64, 28672, 4096) and hg.fits(2, 32, 4096, 14336, split=2) and hg.fits(2, 16, 4096, 1024)
    assert not hg.fits(8, 64, 4096, 14336)  # 8 bits: dequantize + cuBLAS
    assert not hg.fits(4, 64, 4096, 14336 + 32)  # K not in whole steps
    assert not hg.fits(4, 48, 4096, 14400)  # not a power of two
    assert not hg.fits(2, 8, 4096, 14336)  # groups smaller than a thread's 16 columns
    assert not hg.fits(4, 128, 4096, 192, split=2)  # halves of 96 columns
    assert hg.tma_ready(quantize_matrix(torch.randn(64, 1024), 4, 64, method="minmax"))  # rows of 512 bytes
    assert not hg.tma_ready(quantize_matrix(torch.randn(64, 1024), 4, 64, method="minmax").map(
        lambda t: t[:, 1:] if t.dtype == torch.int32 else t))  # rows start 4 bytes in
    assert hg.down_split(512, 4096, 14336, 4, 64, sms=132) == 2  # 2 x 32 tiles on 132 SMs
    assert hg.down_split(512, 28672, 4096, 4, 64, sms=132) == 1  # gate|up: 448 tiles
    assert hg.down_split(512, 4096, 14336 + 64, 4, 64, sms=132) == 1  # halves of 7200: not whole steps
    x = torch.randn(300, 1024, dtype=torch.bfloat16)
    assert not hg.usable(x, quantize_matrix(torch.randn(64, 1024), 4, 64, method="minmax"))  # no Hopper here


@pytest.mark.parametrize("bits", [2, 4])
def test_the_hopper_gemm_column_order(bits):
    """Each thread of the wgmma A fragment holds positions 16 b + 8 s + 2 c + hh of a step, 16 columns from one or
    two of its words, a code and the one 16 // bits further in one bf16x2 register: x's columns go in that order
    (`step_order`). It is a permutation of each step, so it changes no product; down's input, silu(gate) * up, is
    written in it directly."""
    from quant import hopper_gemm as hg

    order = hg.step_order(bits)
    assert sorted(order) == list(range(64)) and order != list(range(64))
    half = 16 // bits
    for c in range(4):  # thread c's positions: its 16 columns, and each register pair a code and its twin
        cols = [order[16 * b + 8 * s + 2 * c + hh] for b in range(4) for s in range(2) for hh in range(2)]
        assert sorted(cols) == list(range(16 * c, 16 * c + 16))
        assert all(order[p + 1] - order[p] == half for p in range(2 * c, 64, 8))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 128, generator=g), torch.randn(3, 128, generator=g)
    full = order + [64 + j for j in order]
    xi = hg.interleave(x, bits)
    assert torch.equal(xi, x[:, full])
    assert torch.allclose(xi @ w[:, full].T, x @ w.T, atol=1e-5)
    h = torch.randn(5, 256, generator=g)
    assert torch.equal(hg.interleave(h, bits, act=True), hg.interleave(F.silu(h[:, :128]) * h[:, 128:], bits))


# ------------------------------------------------------------------------------------------ the store


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny qwen3_moe (hidden 64, 8 experts of 32, top-2, 3 layers) and its store in small shards."""
    root = tmp_path_factory.mktemp("quant")
    model = make_tiny_model(root / "model", "qwen3_moe", hidden_size=64, moe_intermediate_size=32,
                            num_experts=8, num_hidden_layers=3)
    store = root / "store"
    result = quantize_model(model, store, QuantParams(max_shard_bytes=12_000))
    return model, store, result


def test_manifest_and_files(tiny):
    model, store, result = tiny
    m = json.loads((store / "manifest.json").read_text())
    assert m["format"] == "fate-tiers" and m["format_version"] == 1 and m["complete"] is True
    assert m["model"]["num_experts"] == 8 and m["model"]["moe_layers"] == [0, 1, 2]
    assert m["params"]["hot_bits"] == 4 and m["params"]["hot_group_size"] == 64
    assert m["params"]["cold_bits"] == 2 and m["params"]["cold_group_size"] == 32
    assert m["quantizer"]["method"] == "hqq" and m["quantizer"]["opt_params"]["iters"] == 20
    assert m["tiers"]["hot"]["bits"] == 4 and m["tiers"]["cold"]["bits"] == 2
    assert m["tiers"]["dense"]["layers"] == [0] and m["tiers"]["dense"]["dtype"] == "bfloat16"
    for name, rec in m["source"]["files"].items():
        assert rec["sha256"] == hashlib.sha256((model / name).read_bytes()).hexdigest()
    assert len(m["files"]) > 3  # several shards per tier
    for name, rec in m["files"].items():
        data = (store / name).read_bytes()
        assert rec["size"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()
    assert len(m["experts"]) == 2 * 3 * 8 + 8
    for key, rec in m["experts"].items():
        with safe_open(str(store / rec["file"]), "pt") as f:
            buf = f.get_tensor(key)
        assert buf.dtype == torch.uint8 and buf.numel() == m["tiers"][key.split(".")[0]]["expert_bytes"]
        assert hashlib.sha256(buf.numpy().tobytes()).hexdigest() == rec["sha256"]
    assert not list(store.glob("*.tmp")) and not (store / "progress.json").exists()
    check_store(store, model, deep=True)


def test_store_holds_what_quantize_expert_makes(tiny):
    """The streamed shard bytes equal the in-memory quantization of the same expert."""
    model, store, _ = tiny
    from quant.source import SourceReader

    args_names = None
    reader = SourceReader(model)
    ts = TierStore.open(store, model)
    from fate_cli.model.loader import load_args

    args = load_args(model)
    args_names = args.experts.names(1, 5)
    gate, up, down = (reader.get(n) for n in args_names)
    for tier, bits, group in (("hot", 4, 64), ("cold", 2, 32)):
        layout, buf = quantize_expert(gate, up, down, bits, group)
        assert layout == ts.tiers[tier].layout
        assert torch.equal(ts.read(tier, 1, 5), buf)
    dense = ts.tiers["dense"].layout.views(ts.read("dense", 0, 3))
    names = args.experts.names(0, 3)
    assert torch.equal(dense["gate_up"], torch.cat([reader.get(names[0]), reader.get(names[1])]).bfloat16())
    assert torch.equal(dense["down"], reader.get(names[2]).bfloat16())


def _dequantized_reference(args, store: TierStore, plan):
    layers = {}
    for layer in args.moe_layer_ids:
        layers[layer] = []
        for e in range(args.num_experts):
            tier = plan[(layer, e)]
            info = store.tiers[tier]
            buf = store.read(tier, layer, e)
            if info.layout.kind == "dense":
                v = info.layout.views(buf)
                i = info.layout.intermediate
                ws = (v["gate_up"][:i].float(), v["gate_up"][i:].float(), v["down"].float())
            else:
                ws = dequantized_weights(buf, info.layout, torch.float32)
            layers[layer].append(DenseExpert(*ws))
    return ResidentExperts(layers)


@pytest.mark.parametrize("kernel", ["fused", "reference"])
@pytest.mark.parametrize("choice", ["hot", "cold", "mixed"])
def test_greedy_tokens_from_a_tier_match_dequantized_weights(tiny, choice, kernel, monkeypatch):
    """The CPU's fused expert kernel and its reference (FATE_CPU_EXPERTS=reference) give the dequantized weights'
    greedy tokens; the reference's logits are bitwise those, the fused kernel's within float32 rounding."""
    model, store, _ = tiny
    if kernel == "reference":
        monkeypatch.setenv("FATE_CPU_EXPERTS", "reference")
    ours = load_model(model, provider=tiered_provider(store, model, choice))
    provider = ours.model.layers[0].mlp.provider
    assert isinstance(provider, TieredExperts)
    ts = TierStore.open(store, model)
    plan = uniform_tiers(ours.args, choice) if choice != "mixed" else mixed_tiers(ours.args, ts)
    assert provider.plan == plan
    ref = load_model(model, provider=lambda args, ckpt: _dequantized_reference(args, ts, plan))
    sampler = lambda: Sampler(SamplingParams(temperature=0), torch.device("cpu"))  # noqa: E731
    prompt = [5, 17, 33, 8, 99, 4, 61, 12]
    a = generate(ours.model, prompt, 24, sampler()).token_ids
    b = generate(ref.model, prompt, 24, sampler()).token_ids
    assert a == b
    cache_a, cache_b = ours.model.new_cache(1, 16), ref.model.new_cache(1, 16)
    with torch.no_grad():
        la = ours.model(torch.tensor([prompt]), cache_a, 0)
        lb = ref.model(torch.tensor([prompt]), cache_b, 0)
    if kernel == "reference":
        assert torch.equal(la, lb)
    else:
        assert _rel(la, lb.double()) < 1e-5
    if choice == "hot":
        assert "INT4 g64 (hot) layers 0-2" in provider.describe()
        assert (CPU_FUSED if kernel == "fused" else CPU) in provider.describe()
    if choice == "mixed":
        assert provider.describe().startswith("experts: bfloat16 (dense) layer 0, INT4 g64 (hot) layers 1-2")


def test_quantized_model_stays_close_to_the_checkpoint(tiny):
    model, store, _ = tiny
    prompt = torch.tensor([[5, 17, 33, 8, 99, 4, 61, 12, 7, 3]])
    logits = {}
    for choice in ("bf16", "hot", "cold"):
        lm = load_model(model, provider=None if choice == "bf16" else tiered_provider(store, model, choice))
        with torch.no_grad():
            logits[choice] = lm.model(prompt, lm.model.new_cache(1, 16), 0)
    hot, cold = _rel(logits["hot"], logits["bf16"]), _rel(logits["cold"], logits["bf16"])
    assert 0 < hot < cold < 0.5


def _flip_byte(path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_store_is_refused(tmp_path):
    model = make_tiny_model(tmp_path / "model", "qwen3_moe", seed=3)
    store = tmp_path / "store"
    quantize_model(model, store, QuantParams(max_shard_bytes=4000))
    m = json.loads((store / "manifest.json").read_text())
    victim = store / m["tiers"]["hot"]["files"][0]
    stat = victim.stat()
    _flip_byte(victim)
    import os

    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only hashes can tell
    check_store(store, model, deep=False)  # sizes and headers still check out
    with pytest.raises(BadModel, match=f"damaged: {victim.name} does not match its sha256"):
        check_store(store, model, deep=True)
    with pytest.raises(BadModel, match="does not match its sha256"):
        load_model(model, provider=tiered_provider(store, model, "hot"))
    # a re-run repairs it, keeping the intact shards
    result = quantize_model(model, store, QuantParams(max_shard_bytes=4000))
    assert result.written_shards == 1 and result.reused_shards == len(m["files"]) - 1
    check_store(store, model, deep=True)
    # a truncated file and a missing one
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(BadModel, match="bytes, the manifest says"):
        check_store(store, model, deep=False)
    victim.unlink()
    with pytest.raises(BadModel, match=f"{victim.name} is missing"):
        check_store(store, model, deep=False)


def test_a_stale_store_is_refused(tmp_path):
    model = make_tiny_model(tmp_path / "model", "qwen3_moe", seed=4)
    store = tmp_path / "store"
    quantize_model(model, store, QuantParams())
    _flip_byte(model / "model.safetensors")  # the checkpoint changed after quantization
    with pytest.raises(BadModel, match="stale: model.safetensors changed since it was quantized"):
        check_store(store, model, deep=False)
    with pytest.raises(BadModel, match="stale"):
        load_model(model, provider=tiered_provider(store, model, "cold"))
    result = quantize_model(model, store, QuantParams())
    assert result.reused_shards == 0 and not result.up_to_date
    check_store(store, model, deep=True)


def test_missing_store(tmp_path):
    model = make_tiny_model(tmp_path / "model", "qwen3_moe", seed=5)
    with pytest.raises(ModelNotFound, match="no tier store"):
        check_store(tmp_path / "nothing", model)


def test_changed_parameters_rebuild_everything(tmp_path):
    model = make_tiny_model(tmp_path / "model", "mixtral", seed=6)
    store = tmp_path / "store"
    quantize_model(model, store, QuantParams(method="minmax"))
    again = quantize_model(model, store, QuantParams(method="minmax"))
    assert again.up_to_date
    other = quantize_model(model, store, QuantParams(method="minmax", hot_bits=8, cold_bits=3, dense_layers=0))
    assert not other.up_to_date and other.reused_shards == 0
    m = check_store(store, model)
    assert m["tiers"]["hot"]["bits"] == 8 and m["tiers"]["cold"]["bits"] == 3 and "dense" not in m["tiers"]
    assert sorted(p.name for p in store.glob("*.safetensors")) == sorted(m["files"])
    ExpertLayout.from_json(m["tiers"]["cold"]["layout"])


def test_bundled_model_int4_within_3_percent_of_bf16_perplexity(tmp_path):
    """The quality bar on real trained experts: all-INT4 perplexity within 3% of the checkpoint's."""
    from fate_cli.perplexity import perplexity
    from fate_cli.registry import BUNDLED_ROOT
    from fate_cli.tokenizer import Tokenizer

    model = BUNDLED_ROOT / "tiny"
    if not (model / "model.safetensors").is_file():
        pytest.skip("the bundled model's weights are not there")
    store = tmp_path / "store"
    result = quantize_model(model, store, QuantParams())
    assert result.written_shards == 3
    ids = Tokenizer(model).encode((model / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False)
    # as every command does (fate_cli.engine.runtime.open_model): trained weights make denormals, slow on CPUs;
    # torch has no getter to restore the previous state, and the commands never turn it off again
    torch.set_flush_denormal(True)
    ppl = {}
    for choice in ("bf16", "hot", "cold"):
        provider = None if choice == "bf16" else tiered_provider(store, model, choice)
        lm = load_model(model, provider=provider)
        ppl[choice] = perplexity(lm.model, ids, window=256, max_windows=8).perplexity
    assert ppl["hot"] / ppl["bf16"] < 1.03
    assert ppl["cold"] > ppl["hot"]
