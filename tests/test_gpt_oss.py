"""gpt_oss against transformers (the reference) on tiny random checkpoints, plain and MXFP4.

The tiny model has a window of 8 keys on its sliding layers and every prompt plus its 20 new tokens is
longer than that, so the window is exercised on prefill and on decode."""

from __future__ import annotations

import json

import pytest
import torch

from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.errors import BadModel
from fate_cli.model.loader import Checkpoint, load_args, load_model
from quant.gpt_oss_experts import dequantize_mxfp4, quantize_mxfp4
from quant.source import SourceReader
from tests.tiny_gpt_oss import make_tiny_gpt_oss, reference_tokens

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")
PROMPTS = [[5, 9, 14, 3, 27, 8, 11, 40, 41, 7, 99, 12, 60], [17, 4, 4, 80], [3, 1, 33, 90, 21, 22, 23, 24, 25, 26]]


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0), CPU)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = make_tiny_gpt_oss(tmp_path_factory.mktemp("gpt_oss") / "plain")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    path = make_tiny_gpt_oss(tmp_path_factory.mktemp("gpt_oss") / "mxfp4", mxfp4=True)
    ref_dir = path.parent / f"{path.name}-dequantized"
    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    return path, ref_dir, ref


def test_config_reads_the_family(plain):
    args = load_args(plain[0])
    assert args.sliding_layers == (True, False, True, False) and args.sliding_window == 8
    assert args.rope_scaling is not None and args.rope_scaling.factor == 4.0 and not args.rope_scaling.truncate
    assert args.expert_act is not None and args.expert_act.limit == 1.5 and args.expert_act.alpha == 1.702
    assert args.topk_then_softmax and args.router_bias and args.attention_sinks and args.o_proj_bias


def test_logits_and_greedy_match_transformers(plain):
    path, ref = plain
    ours = load_model(path, CPU, torch.float32).model
    prompt = torch.tensor([PROMPTS[0] + PROMPTS[2]])  # 23 tokens: three windows
    with torch.no_grad():
        logits = ours(prompt, ours.new_cache(1, 64), 0)
        expected = ref(prompt).logits
    rel = (logits - expected).norm() / expected.norm()
    assert rel < 1e-5, f"relative logit error {rel:.2e}"
    for p in PROMPTS:
        assert generate(ours, p, 20, greedy()).token_ids == reference_tokens(ref, p)


def test_chunked_prefill_across_the_window(plain):
    """A prompt fed in chunks through the cache (a chunk starting past the window) equals one pass."""
    model = load_model(plain[0]).model
    tokens = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    with torch.no_grad():
        whole = model(tokens, model.new_cache(1, 32), 0)[:, -1]
        cache = model.new_cache(1, 32)
        model(tokens[:, :11], cache, 0)
        model(tokens[:, 11:13], cache, 11)
        chunked = model(tokens[:, 13:], cache, 13)[:, -1]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_batch_rows_and_the_static_step_match_transformers(plain):
    path, ref = plain
    model = load_model(path, CPU, torch.float32).model
    expected = [reference_tokens(ref, p) for p in PROMPTS]
    assert [r.token_ids for r in generate_batch(model, PROMPTS, 20, greedy()).results] == expected
    graphs = DecodeGraphs(model, capture=False)
    assert generate(model, PROMPTS[0], 20, greedy(), graphs=graphs).token_ids == expected[0]
    assert graphs.describe() == "decode: static, uncaptured"  # the step ran, not the eager fallback
    batched = generate_batch(model, PROMPTS, 20, greedy(), graphs=DecodeGraphs(model, capture=False))
    assert [r.token_ids for r in batched.results] == expected


def test_mxfp4_packing_matches_transformers_dequantizer():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(0)) * 3  # [E, out, in]
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 8, 2, 16) and scales.shape == (3, 8, 2) and blocks.dtype == torch.uint8
    ours = dequantize_mxfp4(blocks, scales, torch.float32)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    assert torch.equal(ours, theirs)
    assert (ours - w).abs().max() <= w.abs().amax() / 4  # e2m1 steps of at most a quarter of the block's peak
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16).float(), ours)  # exact in bfloat16


def test_mxfp4_checkpoint_matches_the_dequantized_reference(mxfp4):
    path, ref_dir, ref = mxfp4
    names = set(Checkpoint(path).names())
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names
    ours = load_model(path, CPU, torch.float32).model
    prompt = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        rel = (ours(prompt, ours.new_cache(1, 64), 0) - ref(prompt).logits).norm() / ref(prompt).logits.norm()
    assert rel < 1e-5, f"relative logit error {rel:.2e}"
    assert generate(ours, PROMPTS[0], 20, greedy()).token_ids == reference_tokens(ref, PROMPTS[0])


def test_readers_give_the_same_expert_parts_in_both_layouts(mxfp4):
    """The quantize reader (pread) and the loader's reader (memory map) give each expert's parts alike, and the
    MXFP4 checkpoint's parts equal the plain dequantized ones."""
    path, ref_dir, _ = mxfp4
    args = load_args(path)
    experts = args.experts
    packed, plain_ckpt, reader = Checkpoint(path), Checkpoint(ref_dir), SourceReader(path)
    for e in range(args.num_experts):
        for name, shape in [*zip(experts.names(3, e), experts.shapes),
                            *zip(experts.bias_names(3, e), experts.bias_shapes)]:
            assert packed.shape(name) == reader.shape(name) == plain_ckpt.shape(name) == shape
            a, b, c = packed.get(name), reader.get(name), plain_ckpt.get(name)
            assert torch.equal(a, b) and torch.equal(a.float(), c)
    assert reader.dtype(experts.names(0, 0)[0]) == torch.bfloat16


def test_bad_rope_type_is_one_clear_error(tmp_path, plain):
    path = tmp_path / "m"
    path.mkdir()
    cfg = json.loads((plain[0] / "config.json").read_text(encoding="utf-8"))
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
    (path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(BadModel, match="rope type 'longrope' is not supported"):
        load_args(path)
    cfg["rope_parameters"] = None
    cfg["layer_types"] = ["full_attention"]
    (path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(BadModel, match="layer_types"):
        load_args(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_greedy_matches_through_the_captured_step(plain):
    """On a GPU the captured step takes this family's experts (biases and the clamped SwiGLU in the fused kernels,
    tests/test_gpt_oss_cuda.py): eager and captured decode both give the CPU path's tokens in float32, which the
    tests above hold to transformers. (The GPU machine's transformers 5.17 computes this family otherwise than
    the 5.25 these tests pin, on its CPU too: relative logit error 1.0 against ours on both devices.)"""
    path, _ = plain
    cpu = torch.device("cpu")
    expected = generate(load_model(path, cpu, torch.float32).model, PROMPTS[0], 20,
                        Sampler(SamplingParams(temperature=0.0), cpu)).token_ids
    model = load_model(path, torch.device("cuda"), torch.float32).model
    sampler = Sampler(SamplingParams(temperature=0.0), torch.device("cuda"))
    assert generate(model, PROMPTS[0], 20, sampler).token_ids == expected
    graphs = DecodeGraphs(model)
    tokens = generate(model, PROMPTS[0], 20, sampler, graphs=graphs).token_ids
    assert graphs.describe().startswith("decode: one CUDA graph per step"), graphs.describe()
    assert tokens == expected
