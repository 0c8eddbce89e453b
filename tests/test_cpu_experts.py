"""The CPU expert kernels (quant/cpu_kernels.py behind quant/cpu_experts.cpu_moe) against the plain-torch
reference, on random experts of every tier: INT4 g64, INT2 g32, INT8 g64, the 16-bit dense tiers, with and
without gpt_oss's biases and clamped activation, widths that do not fill a word or a group, 1 to 5 tokens."""

from __future__ import annotations

import pytest
import torch

from quant import cpu_experts, cpu_kernels, kernels
from quant.expert_act import ClampedSwiGLU
from quant.layout import ExpertLayout
from quant.packing import num_groups, num_words

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="numba is not installed")


def random_expert(layout: ExpertLayout, gen: torch.Generator) -> torch.Tensor:
    """One expert's buffer of random codes, scales and zeros (or 16-bit weights) and biases."""
    parts = {}
    for seg in layout.segments:
        if seg.name.endswith(".codes"):
            rows, words = seg.shape
            parts[seg.name] = torch.randint(-2**31, 2**31 - 1, (rows, words), generator=gen, dtype=torch.int64
                                            ).to(torch.int32)
        elif seg.name.endswith(".scale"):
            parts[seg.name] = (torch.rand(seg.shape, generator=gen) * 0.02 + 1e-3).half()
            parts[seg.name][0, 0] = 3e-6  # a float16 subnormal: widened exactly
        elif seg.name.endswith(".zero"):
            parts[seg.name] = (torch.rand(seg.shape, generator=gen) * (2**layout.bits - 1)).half()
        else:  # dense weights, biases
            parts[seg.name] = (torch.randn(seg.shape, generator=gen) * 0.05).to(getattr(torch, seg.dtype))
    if layout.kind == "quantized":  # codes past the row's width are zero, as pack_codes writes them
        for prefix, k in (("gate_up", layout.hidden), ("down", layout.intermediate)):
            cpw = 32 // layout.bits
            words = parts[f"{prefix}.codes"]
            if k % cpw:
                keep = (1 << (layout.bits * (k % cpw))) - 1
                words[:, -1] &= keep
    return layout.assemble(parts)


def host_tier(layout: ExpertLayout, n: int, seed: int = 0) -> torch.Tensor:
    """n experts as rows of one tensor, the way cache/host_tier.py holds a tier."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([random_expert(layout, gen) for _ in range(n)])


LAYOUTS = {
    "int4-g64": ExpertLayout.quantized(256, 128, 4, 64),
    "int2-g32": ExpertLayout.quantized(256, 128, 2, 32),
    "int8-g64": ExpertLayout.quantized(256, 128, 8, 64),
    "int4-g64-short-group": ExpertLayout.quantized(160, 64, 4, 64),  # the bundled model's widths: 160 % 64 != 0
    "int2-g32-short-word": ExpertLayout.quantized(72, 40, 2, 32),  # 72 % 16 != 0: a part-filled last word
    "bf16": ExpertLayout.dense(256, 128, "bfloat16"),
    "fp16": ExpertLayout.dense(160, 64, "float16"),
    "int4-g64-bias": ExpertLayout.quantized(256, 128, 4, 64, bias="bfloat16"),
    "bf16-bias": ExpertLayout.dense(256, 128, "bfloat16", bias="bfloat16"),
}


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal within float32 rounding: the kernels sum in another order (per group, then scale)."""
    scale = ref.abs().max().item()
    assert scale > 0
    assert (out - ref).abs().max().item() <= 2e-5 * scale


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("tokens", [1, 3])
def test_kernels_match_reference(name: str, tokens: int) -> None:
    layout = LAYOUTS[name]
    tier = host_tier(layout, 6, seed=tokens)
    experts = [(tier[i], layout) for i in (4, 0, 3)]  # rows of the host tier, in no particular order
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, layout.hidden, generator=gen)
    w = torch.rand(tokens, len(experts), generator=gen)
    if tokens > 1:
        w[0, 1] = 0  # a token that does not route to an expert
    act = ClampedSwiGLU(1.702, 7.0) if layout.bias else None
    ref = cpu_experts.cpu_moe_reference(x, experts, w, act)
    out = cpu_experts.cpu_moe(x, experts, w, act)
    assert cpu_experts.use_kernels(layout)
    check(out, ref)


def test_mixed_tiers_and_copies() -> None:
    """Experts of two tiers in one call, some not rows of a host tier (stacked into a temporary arena)."""
    hot, cold = LAYOUTS["int4-g64"], LAYOUTS["int2-g32"]
    th, tc = host_tier(hot, 3, 1), host_tier(cold, 3, 2)
    experts = [(th[2], hot), (tc[0].clone(), cold), (th[0], hot), (tc[1].clone(), cold)]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, hot.hidden, generator=gen).bfloat16()
    w = torch.rand(2, 4, generator=gen)
    out = cpu_experts.cpu_moe(x, experts, w)
    assert out.dtype == torch.bfloat16
    ref = cpu_experts.cpu_moe_reference(x, experts, w)
    assert torch.equal(out, ref) or (out.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()


def test_arenas_in_place() -> None:
    """Rows of one tensor are read where they lie (no copy), a group per tensor (the host tier's chunks); others
    are stacked; a call over experts of two chunks gives the experts' sum as over one tensor."""
    layout = LAYOUTS["int4-g64"]
    tier = host_tier(layout, 4)
    [(arena, rows, places)] = cpu_experts._arenas([tier[3], tier[1]], layout.nbytes)
    assert arena.data_ptr() == tier.data_ptr() and rows.tolist() == [3, 1] and places == [0, 1]
    first, second = tier[:2].clone(), tier[2:].clone()  # the same experts in two chunks
    groups = cpu_experts._arenas([second[1], tier[3].clone(), first[0], second[0]], layout.nbytes)
    assert [(g[0].data_ptr(), g[1].tolist(), g[2]) for g in groups] == [
        (second.data_ptr(), [1, 0], [0, 3]), (first.data_ptr(), [0], [2]), (groups[2][0].data_ptr(), [0], [1])]
    assert torch.equal(groups[2][0][0], tier[3])
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, layout.hidden, generator=gen), torch.rand(2, 4, generator=gen)
    split = cpu_experts.cpu_moe(x, [(second[1], layout), (tier[3].clone(), layout), (first[0], layout),
                                    (second[0], layout)], w)
    whole = cpu_experts.cpu_moe(x, [(tier[i], layout) for i in (3, 3, 0, 2)], w)
    assert torch.equal(split, whole)


def test_threads_do_not_change_results() -> None:
    layout = LAYOUTS["int4-g64"]
    tier = host_tier(layout, 4)
    experts = [(tier[i], layout) for i in range(4)]
    x = torch.randn(2, layout.hidden, generator=torch.Generator().manual_seed(5))
    w = torch.rand(2, 4, generator=torch.Generator().manual_seed(6))
    before = cpu_kernels.numba.get_num_threads()
    try:
        one = cpu_experts.cpu_moe(x, experts, w, threads=1)
        many = cpu_experts.cpu_moe(x, experts, w, threads=cpu_kernels.max_threads())
    finally:
        cpu_kernels.set_threads(before)
    assert torch.equal(one, many)


def test_reference_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = LAYOUTS["int4-g64"]
    assert cpu_experts.cpu_expert_kernel(layout) == cpu_experts.CPU_FUSED
    monkeypatch.setenv("FATE_CPU_EXPERTS", "reference")
    assert cpu_experts.cpu_expert_kernel(layout) == cpu_experts.CPU_REFERENCE
    assert not cpu_experts.kernel_fits(ExpertLayout.quantized(160, 64, 3, 64))  # INT3: 10 codes a word


def test_empty_and_word_counts() -> None:
    layout = LAYOUTS["int2-g32-short-word"]
    assert num_words(layout.hidden, 2) == 5 and num_groups(layout.hidden, 32) == 3
    x = torch.randn(1, layout.hidden)
    assert torch.equal(cpu_experts.cpu_moe(x, [], torch.zeros(1, 0)), torch.zeros(1, layout.hidden))


# ------------------------------------------------------------------ CPU runs go through the kernels


PROMPT = "What is a kludge? Say it in a few plain words, with one example from computing."  # > 8 tokens


def _run(home, model: str, *extra: str, reference: bool = False) -> list[int]:
    """Greedy token ids of `fate run --device cpu --policy fate` (FATE_CPU_EXPERTS=reference: the reference)."""
    import json
    import os

    from tests.helpers import fate_in_process

    saved = os.environ.get("FATE_CPU_EXPERTS")
    if reference:
        os.environ["FATE_CPU_EXPERTS"] = "reference"
    try:
        result = fate_in_process("run", model, PROMPT, "-n", "24", "--raw", "--temperature", "0", "--json",
                                 "--device", "cpu", "--policy", "fate", *extra, home=home)
    finally:
        if saved is None:
            os.environ.pop("FATE_CPU_EXPERTS", None)
        else:
            os.environ["FATE_CPU_EXPERTS"] = saved
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["token_ids"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """A tiny random qwen3_moe (8 experts, 3 layers) and its tier store."""
    from fate_cli.engine.stores import quantize_model
    from quant.store import QuantParams
    from tests.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("cpu-run")
    model = make_tiny_model(root / "model", family="qwen3_moe", num_experts=8, num_hidden_layers=3)
    quantize_model(model, root / "home" / "tiers" / "model", QuantParams(iters=2))
    return str(model), root / "home"


@pytest.mark.parametrize("bits", ["4", "2"])
def test_tiny_config_tokens_equal_the_reference(tiny_config, bits):
    """Greedy tokens of a tiered CPU run, every expert at one tier (hot INT4 or cold INT2), misses moved into the
    cache (QuantExpert) or computed from the host tier (cpu_moe): through the kernels, equal to the reference's.
    One tier, so the miss path changes no expert's precision and all four runs agree."""
    model, home = tiny_config
    runs = {(miss, ref): _run(home, model, "--vram", "1MB", "--transfer-bits", bits, "--miss", miss, reference=ref)
            for miss in ("link", "cpu") for ref in (False, True)}
    first = runs[("link", True)]
    assert len(first) > 4 and all(tokens == first for tokens in runs.values()), runs


def test_bundled_model_tokens_equal_the_reference(tmp_path, monkeypatch):
    """The bundled model `tiny` on the CPU with a budget that caches part of its experts (misses moved, and
    computed on the CPU); the describe line names the kernel."""
    from fate_cli.engine.runtime import open_model

    home = tmp_path / "home"
    runs = {(miss, ref): _run(home, "tiny", "--vram", "16MB", "--transfer-bits", "4", "--miss", miss, reference=ref)
            for miss in ("link", "cpu") for ref in (False, True)}
    first = runs[("link", True)]
    assert len(first) > 4 and all(tokens == first for tokens in runs.values()), runs
    monkeypatch.setenv("FATE_HOME", str(home))
    line = open_model("tiny", device="cpu", policy="fate", vram="16MB").describe()
    assert f"expert kernels {cpu_experts.CPU_FUSED} up to {cpu_experts.KERNEL_MAX_TOKENS} tokens a call" in line, line
    monkeypatch.setenv("FATE_CPU_EXPERTS", "reference")
    line = open_model("tiny", device="cpu", policy="fate", vram="16MB").describe()
    assert f"expert kernels {kernels.CPU};" in line, line


@pytest.mark.parametrize("name", ["int4-g64", "int2-g32", "int8-g64", "int4-g64-short-group", "int2-g32-short-word"])
def test_dequantize_kernel_is_bitwise_the_reference(name):
    """The multi-threaded dequantization a prefill uses gives packing.dequantize's float32 weights exactly, a
    subnormal scale included (under flush-to-zero, as CPU runs set it)."""
    from quant.packing import dequantize

    layout = LAYOUTS[name]
    buf = host_tier(layout, 1, seed=7)[0]
    scale = layout.views(buf)["gate_up.scale"]
    scale[0, 0] = 3e-6  # a float16 subnormal
    ref_gu, ref_d = (dequantize(m) for m in layout.packed(buf))  # float32 math: the subnormal scale is exact
    torch.set_flush_denormal(True)
    try:
        gate_up, down = cpu_experts.dequantize_expert(buf, layout)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(gate_up, ref_gu) and torch.equal(down, ref_d)
    assert ref_gu[0, :layout.group_size].abs().max() > 0  # the group with the subnormal scale is not all zero


@pytest.mark.parametrize("name", ["int4-g64", "int2-g32", "int4-g64-bias"])
def test_experts_of_many_tokens_are_dequantized_once(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An expert with more than KERNEL_MAX_TOKENS tokens in a call goes through dequantize + matmul, the others
    through the fused kernel, in one call whose sum equals the reference's; the large path runs (counted)."""
    layout = LAYOUTS[name]
    tier = host_tier(layout, 4, seed=7)
    tokens = cpu_experts.KERNEL_MAX_TOKENS + 3
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(tokens, layout.hidden, generator=gen)
    w = torch.rand(tokens, 3, generator=gen)
    w[2:, 1] = 0  # expert 1: two tokens (the kernel); experts 0 and 2: every token (dequantized once)
    experts = [(tier[2], layout), (tier[0], layout), (tier[3].clone(), layout)]  # the last in an arena of its own
    calls = []
    real = cpu_experts._dequantized_ffn
    monkeypatch.setattr(cpu_experts, "_dequantized_ffn", lambda *a: calls.append(a[1]) or real(*a))
    act = ClampedSwiGLU(1.702, 7.0) if layout.bias else None
    out = cpu_experts.cpu_moe(x, experts, w, act)
    assert [c.data_ptr() for c in calls] == [experts[0][0].data_ptr(), experts[2][0].data_ptr()]
    check(out, cpu_experts.cpu_moe_reference(x, experts, w, act))
