"""Triton kernels that compute y = x @ W.T straight from our packed format (quant/packing.py).

W [N, K] is stored as int32 words [N, K / cpw] (cpw = 32 // bits codes per word, least significant
first, along K) with float16 scale and zero [N, K / group]; W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g].
A kernel loads each word once and walks its
codes plane by plane: plane j holds code j of every word, i.e. input columns word * cpw + j. Because a
group is a whole number of words, scale and zero are loaded per word, never per weight. Requirements
(kernels.triton_fits): bits 2, 4 or 8, group a multiple of cpw, K a multiple of group.

- `_gemv_kernel` (decode, a few rows of x): per x row and BLOCK_N output rows, walks its share of K
  (split-K with fp32 atomics when N alone gives too few programs). It never forms W: per word,
  part = sum_j q_j x_j and xs = sum_j x_j, then y += scale * (part - zero * xs); per weight that is a
  shift, a mask, a convert and a multiply-add. With ACT its input is the fp32 gate|up output of the
  previous GEMV and it applies silu(gate) * up while loading: an expert's FFN at batch 1 is two launches
  (plus a memset for split-K).
- `_gemm_kernel` (prefill): a tiled GEMM; per plane it dequantizes a [BLOCK_N, BLOCK_K / cpw] slice of W
  to the activation dtype in registers (fp32 (q - zero) * scale, then cast, as the reference does) and
  feeds tl.dot with the matching strided columns of x.
- `_dequant_kernel`: W to the activation dtype, for dequantize-then-cuBLAS at large batch.

Importing this module needs neither Triton nor a GPU; `available()` says whether the kernels can run.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from quant.packing import PackedMatrix, codes_per_word

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # no triton, or a broken install: the CPU path does not need it
    HAVE_TRITON = False

GEMV_MAX_ROWS = 4  # rows of x up to which the GEMV kernel runs (each row re-reads W, mostly from L2)
DEQUANT_MIN_ROWS = 1 << 30  # rows from which dequantize + cuBLAS replaces the fused GEMM (set by measurement)


def available() -> bool:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return HAVE_TRITON and (interpreted or torch.cuda.is_available())


if HAVE_TRITON:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        N, K, k_span, stride_xm, stride_wn, stride_sn, stride_ym,
        ACT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        row = tl.program_id(2)
        CPW: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // CPW  # words per group
        BLOCK_W: tl.constexpr = BLOCK_K // CPW
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        words_k = K // CPW
        x_row = x_ptr + row * stride_xm
        acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        for step in range(0, k_span, BLOCK_K):
            wc = (pid_k * k_span + step) // CPW + tl.arange(0, BLOCK_W)
            w_ok = wc < words_k
            tile_ok = n_ok[:, None] & w_ok[None, :]
            words = tl.load(w_ptr + n[:, None] * stride_wn + wc[None, :], mask=tile_ok, other=0)
            # a word's codes share one group, so scale and zero load per word, not per weight
            s = tl.load(s_ptr + n[:, None] * stride_sn + (wc // WPG)[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + n[:, None] * stride_sn + (wc // WPG)[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            part = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
            xs = tl.zeros([BLOCK_W], dtype=tl.float32)
            for j in tl.static_range(CPW):  # plane j: code j of every word, input column word * CPW + j
                kx = wc * CPW + j
                if ACT:
                    g = tl.load(x_row + kx, mask=w_ok, other=0.0).to(tl.float32)
                    u = tl.load(x_row + K + kx, mask=w_ok, other=0.0).to(tl.float32)
                    xj = g * tl.sigmoid(g) * u
                else:
                    xj = tl.load(x_row + kx, mask=w_ok, other=0.0).to(tl.float32)
                q = ((words >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
                part += q * xj[None, :]
                xs += xj
            acc += s * (part - z * xs[None, :])
        y = tl.sum(acc, axis=1)
        out = y_ptr + row * stride_ym + n
        if SPLIT_K == 1:
            tl.store(out, y.to(y_ptr.dtype.element_ty), mask=n_ok)
        else:
            tl.atomic_add(out, y, mask=n_ok)

    @triton.jit
    def _gemm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
        BITS: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n  # programs ordered in bands of GROUP_M row blocks, for L2 reuse of W
        first_m = (pid // width) * GROUP_M
        band = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % band
        pid_n = (pid % width) // band
        CPW: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // CPW
        BLOCK_W: tl.constexpr = BLOCK_K // CPW
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = m < M
        n_ok = n < N
        words_k = K // CPW
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for w0 in range(0, words_k, BLOCK_W):
            wc = w0 + tl.arange(0, BLOCK_W)
            w_ok = wc < words_k
            tile_ok = n_ok[:, None] & w_ok[None, :]
            words = tl.load(w_ptr + n[:, None] * stride_wn + wc[None, :], mask=tile_ok, other=0)
            s = tl.load(s_ptr + n[:, None] * stride_sn + (wc // WPG)[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + n[:, None] * stride_sn + (wc // WPG)[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            for j in tl.static_range(CPW):  # one product per plane: K-slice of BLOCK_W columns, stride CPW
                q = ((words >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
                w = ((q - z) * s).to(x_ptr.dtype.element_ty)
                a = tl.load(x_ptr + m[:, None] * stride_xm + (wc * CPW + j)[None, :],
                            mask=m_ok[:, None] & w_ok[None, :], other=0.0)
                acc = tl.dot(a, tl.trans(w), acc)
        tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _dequant_kernel(
        w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn,
        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        CPW: tl.constexpr = 32 // BITS
        GPB: tl.constexpr = BLOCK_K // GROUP
        WPB: tl.constexpr = BLOCK_K // CPW
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        n_ok = n < N
        wc = k0 // CPW + tl.arange(0, WPB)
        words = tl.load(w_ptr + n[:, None] * stride_wn + wc[None, :], mask=n_ok[:, None] & (wc[None, :] < K // CPW),
                        other=0)
        q = (words[:, :, None] >> (tl.arange(0, CPW) * BITS)[None, None, :]) & ((1 << BITS) - 1)
        q = tl.reshape(q, [BLOCK_N, GPB, GROUP]).to(tl.float32)
        gc = k0 // GROUP + tl.arange(0, GPB)
        sz_ok = n_ok[:, None] & (gc[None, :] < K // GROUP)
        s = tl.load(s_ptr + n[:, None] * stride_sn + gc[None, :], mask=sz_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n[:, None] * stride_sn + gc[None, :], mask=sz_ok, other=0.0).to(tl.float32)
        w = tl.reshape((q - z[:, :, None]) * s[:, :, None], [BLOCK_N, BLOCK_K])
        k = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + n[:, None] * K + k[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & (k[None, :] < K))


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def gemv_config(n: int, k: int, group: int, device: torch.device) -> dict:
    """Tile and split-K for the GEMV: enough programs to fill the GPU about four times over."""
    block_n = 16
    block_k = 512
    n_blocks = -(-n // block_n)
    split = max(1, min(k // block_k, (4 * _sm_count(device)) // n_blocks))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4}


def gemm_config(m: int, n: int, k: int, group: int) -> dict:
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    return {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _check(x: torch.Tensor, w: PackedMatrix) -> None:
    cpw = codes_per_word(w.bits)
    n, k = w.shape
    if w.bits == 3 or w.group_size % cpw or k % w.group_size:
        raise ValueError(f"INT{w.bits} g{w.group_size} with K={k} does not fit the Triton kernels")
    if not (w.codes.is_contiguous() and w.scale.is_contiguous() and w.zero.is_contiguous()):
        raise ValueError("packed tensors must be contiguous")


def gemv(x: torch.Tensor, w: PackedMatrix, act: bool = False, out_dtype: torch.dtype | None = None,
         config: dict | None = None) -> torch.Tensor:
    """x [M, K] (or [M, 2K] gate|up with act=True: silu(gate) * up is the input) -> [M, N]."""
    _check(x, w)
    n, k = w.shape
    x = x.contiguous()
    rows = x.shape[0]
    cfg = dict(config or gemv_config(n, k, w.group_size, x.device))
    split = cfg.pop("SPLIT_K")
    out_dtype = out_dtype or x.dtype
    if split > 1:
        y = torch.zeros(rows, n, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(rows, n, device=x.device, dtype=out_dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, rows)
    k_span = triton.cdiv(k, split * cfg["BLOCK_K"]) * cfg["BLOCK_K"]  # each split's share of K
    _gemv_kernel[grid](
        x, w.codes, w.scale, w.zero, y, n, k, k_span, x.stride(0), w.codes.stride(0), w.scale.stride(0), y.stride(0),
        ACT=act, BITS=w.bits, GROUP=w.group_size, SPLIT_K=split, **cfg,
    )
    return y if y.dtype == out_dtype else y.to(out_dtype)


def gemm(x: torch.Tensor, w: PackedMatrix, config: dict | None = None) -> torch.Tensor:
    """x [M, K] -> x @ W.T [M, N] in x's dtype, W dequantized tile by tile."""
    _check(x, w)
    n, k = w.shape
    x = x.contiguous()
    rows = x.shape[0]
    cfg = dict(config or gemm_config(rows, n, k, w.group_size))
    y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemm_kernel[grid](
        x, w.codes, w.scale, w.zero, y, rows, n, k, x.stride(0), w.codes.stride(0), w.scale.stride(0), y.stride(0),
        BITS=w.bits, GROUP=w.group_size, **cfg,
    )
    return y


def dequant(w: PackedMatrix, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W [N, K] in `dtype` (the same values as quant.packing.dequantize)."""
    _check(w.codes, w)
    n, k = w.shape
    out = torch.empty(n, k, device=w.codes.device, dtype=dtype)
    block_k = max(256, w.group_size)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, block_k))
    _dequant_kernel[grid](w.codes, w.scale, w.zero, out, n, k, w.codes.stride(0), w.scale.stride(0),
                          BITS=w.bits, GROUP=w.group_size, BLOCK_N=32, BLOCK_K=block_k, num_warps=4)
    return out


def expert_ffn(x: torch.Tensor, gate_up: PackedMatrix, down: PackedMatrix) -> torch.Tensor:
    """down(silu(gate x) * up x) for x [M, H], from packed gate_up [2I, H] and down [H, I]."""
    rows = x.shape[0]
    inter = down.shape[1]
    if rows <= GEMV_MAX_ROWS:
        h = gemv(x, gate_up, out_dtype=torch.float32)
        return gemv(h, down, act=True, out_dtype=x.dtype)
    if rows >= DEQUANT_MIN_ROWS:
        h = F.linear(x, dequant(gate_up, x.dtype))
        return F.linear(F.silu(h[:, :inter]) * h[:, inter:], dequant(down, x.dtype))
    h = gemm(x, gate_up)
    return gemm(F.silu(h[:, :inter]) * h[:, inter:], down)
