"""The Triton kernels against dequantize-then-matmul in float32 (runs only where CUDA and Triton are)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant import hopper_gemm as hg
from quant import triton_kernels as tk
from quant.hqq_quant import quantize_expert, quantize_matrix
from quant.kernels import TRITON, QuantExpert, dequantized_weights, select_backend
from quant.packing import dequantize, expand_groups, unpack_codes

pytestmark = pytest.mark.skipif(not (tk.HAVE_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("bits,group", [(4, 64), (2, 32), (8, 64), (4, 128)])
def test_gemv_and_dequant_against_the_reference(bits, group):
    w = torch.randn(384, 1024, device="cuda") * 0.02
    m = quantize_matrix(w, bits, group, method="minmax")
    ref_w = dequantize(m, torch.float32)
    assert torch.equal(tk.dequant(m, torch.bfloat16), dequantize(m, torch.bfloat16))
    for rows in (1, 3):
        x = torch.randn(rows, 1024, device="cuda").bfloat16()
        ref = x.float() @ ref_w.T
        h = torch.randn(rows, 2048, device="cuda")  # a gate|up output: the GEMV applies silu(gate) * up
        ref_act = (F.silu(h[:, :1024]) * h[:, 1024:]) @ ref_w.T
        for split, direct in ((1, False), (4, False), (1, True), (4, True)):
            cfg = {"BLOCK_N": 32, "BLOCK_K": max(256, group), "SPLIT_K": split, "num_warps": 4, "DIRECT": direct}
            assert _rel(tk.gemv(x, m, out_dtype=torch.float32, config=cfg), ref) < 1e-5
            assert _rel(tk.gemv(h, m, act=True, out_dtype=torch.float32, config=cfg), ref_act) < 1e-5
        assert _rel(tk.gemv(x, m).float(), ref) < 1e-2


@pytest.mark.parametrize("hidden,inter,tiers", [(2048, 768, ((4, 64), (2, 32))), (512, 1408, ((4, 64), (2, 32))),
                                                (160, 64, ((4, 32), (2, 32))),  # the bundled model's
                                                (2048, 4096, ((4, 64), (2, 32)))])  # large: 300 rows take the
# prefill path of large experts (Hopper's wgmma GEMM, elsewhere dequantize + cuBLAS)
def test_expert_ffn(hidden, inter, tiers):
    g = torch.Generator(device="cuda").manual_seed(0)
    gate, up, down = (torch.randn(s, device="cuda", generator=g).bfloat16() * 0.02
                      for s in ((inter, hidden), (inter, hidden), (hidden, inter)))
    for bits, group in tiers:
        layout, buf = quantize_expert(gate, up, down, bits, group, method="minmax")
        assert select_backend("cuda", layout) == TRITON
        expert = QuantExpert(buf, layout)
        gw, uw, dw = dequantized_weights(buf, layout, torch.float32)
        for rows in (1, 2, 64, 300):
            x = torch.randn(rows, hidden, device="cuda").bfloat16()
            ref = F.linear(F.silu(F.linear(x.float(), gw)) * F.linear(x.float(), uw), dw)
            assert _rel(expert(x).float(), ref) < 2e-2


@pytest.mark.parametrize("bits,group", [(4, 64), (2, 32), (8, 64), (4, 128)])
def test_fused_gemm_against_the_reference(bits, group):
    w = torch.randn(384, 1024, device="cuda") * 0.02
    m = quantize_matrix(w, bits, group, method="minmax")
    ref_w = dequantize(m, torch.float32)
    for rows in (2, 16, 37, 300):
        x = torch.randn(rows, 1024, device="cuda").bfloat16()
        ref = x.float() @ ref_w.T
        block_k = max(group, 128)
        configs = [None,
                   {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": block_k, "SWAP": True, "num_warps": 4, "num_stages": 2},
                   {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": block_k, "SWAP": False, "num_warps": 8, "num_stages": 3}]
        for cfg in configs:
            y = tk.gemm(x, m, cfg)
            assert y.dtype == torch.bfloat16 and y.shape == (rows, 384)
            assert _rel(y.float(), ref) < 1e-2  # bf16 output; W in bf16 exactly as the dequant kernel makes it
        # the same bf16 weights through cuBLAS: only the summation order differs
        assert _rel(tk.gemm(x, m).float(), (x @ tk.dequant(m, torch.bfloat16).T).float()) < 1e-2


def test_overlapped_dequant_ffn_matches_the_plain_one():
    """The side-stream dequantization (large experts, many rows) computes what dequantize + cuBLAS computes."""
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden, inter = 512, 1408
    gate, up, down = (torch.randn(s, device="cuda", generator=g).bfloat16() * 0.02
                      for s in ((inter, hidden), (inter, hidden), (hidden, inter)))
    layout, buf = quantize_expert(gate, up, down, 4, 64, method="minmax")
    gu, dn = layout.packed(buf)
    x = torch.randn(300, hidden, device="cuda", generator=g).bfloat16()
    gw, uw, dw = dequantized_weights(buf, layout, torch.bfloat16)
    plain = F.linear(F.silu(F.linear(x, gw)) * F.linear(x, uw), dw)
    assert torch.equal(tk.dequant_ffn_overlapped(x, gu, dn), plain)


@pytest.mark.skipif(not (torch.cuda.is_available() and hg.available(torch.device("cuda"))),
                    reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize("bits,group", [(4, 64), (2, 32), (4, 128), (2, 16)])
def test_wgmma_gemm_against_the_reference(bits, group):
    configs = [{}, {"split": 2}, {"block_x": 128, "stages": 3}]
    # 197 rows: a part-filled W tile; K = 8 groups: for groups of 16 and 32, fewer steps than the ring has slots
    for n, k in ((448, 2048), (197, 8 * group)):
        w = torch.randn(n, k, device="cuda") * 0.02
        m = quantize_matrix(w, bits, group, method="minmax")
        assert hg.tma_ready(m)
        ref_w = dequantize(m, torch.float32)
        for rows in (1, 17, 256, 300, 600):
            x = torch.randn(rows, k, device="cuda").bfloat16()
            ref = x.float() @ ref_w.T
            for cfg in configs:
                if not hg.fits(bits, group, n, k, cfg.get("split", 1)):
                    continue
                y = hg.gemm(x, m, **cfg)
                assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
                assert _rel(y.float(), ref) < 1e-2, (n, k, rows, cfg)


@pytest.mark.parametrize("bits", [2, 4])
def test_the_permutation_kernel_follows_step_order(bits):
    """The Triton kernel that permutes x's columns on the GPU writes step_order's permutation (which the CPU path
    and its tests use), and for down's input the same permutation of silu(gate) * up."""
    if not hg.HAVE_GLUON:
        pytest.skip("needs Triton's Gluon")
    x = torch.randn(7, 320, device="cuda").bfloat16()  # five 64-column steps
    cols = torch.tensor([64 * t + j for t in range(5) for j in hg.step_order(bits)], device="cuda")
    assert torch.equal(hg.interleave(x, bits), x[:, cols])
    h = torch.randn(7, 640, device="cuda").bfloat16()
    act = F.silu(h[:, :320].float()) * h[:, 320:].float()
    torch.testing.assert_close(hg.interleave(h, bits, act=True).float(), act[:, cols], rtol=2 ** -7, atol=1e-6)


def _pair_weights(m) -> torch.Tensor:  # noqa: ANN001 - a PackedMatrix
    """The bf16 weights the 2- and 4-bit wgmma GEMM makes: (q - C) * bf16(scale) + bf16((C - zero) * scale), C the
    codes' middle, rounded once to bf16."""
    cols, c = m.shape[1], 2 ** (m.bits - 1)
    q = unpack_codes(m.codes, m.bits, cols).double()
    scale = expand_groups(m.scale.float(), m.group_size, cols)
    rest = ((c - expand_groups(m.zero.float(), m.group_size, cols)) * scale).bfloat16().double()
    return ((q - c) * scale.bfloat16().double() + rest).float().bfloat16()


@pytest.mark.skipif(not (torch.cuda.is_available() and hg.available(torch.device("cuda"))),
                    reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize("bits,group", [(4, 64), (2, 32), (4, 128), (2, 16)])
def test_wgmma_gemm_weights_are_the_bf16x2_ones(bits, group):
    """x = I reads W back through the kernel: each weight is what `_pair_weights` says, bit for bit, and within
    bf16's rounding of the float32 reference."""
    w = torch.randn(448, 1024, device="cuda") * 0.02
    m = quantize_matrix(w, bits, group, method="minmax")
    eye = torch.eye(1024, device="cuda", dtype=torch.bfloat16)
    for cfg in ({}, {"split": 2}):
        got = hg.gemm(eye, m, **cfg).T
        assert torch.equal(got, _pair_weights(m))
    ref = dequantize(m, torch.float32)
    assert _rel(got.float(), ref) < 4e-3  # bf16 alone: 1.7e-3 (quant/README.md)
