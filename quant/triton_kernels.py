"""Triton kernels that compute y = x @ W.T straight from our packed format (quant/packing.py).

W [N, K] is stored as int32 words [N, K / cpw] (cpw = 32 // bits codes per word, least significant
first, along K) with float16 scale and zero [N, K / group]; W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g].
A kernel loads each word once and walks its
codes plane by plane: plane j holds code j of every word, i.e. input columns word * cpw + j. A group is
a whole number of words, so scale and zero are loaded per word or per group, never per weight. Requirements
(kernels.triton_fits): bits 2, 4 or 8, group a power of two from cpw to MAX_GROUP, K a multiple of group.

- `_planes_kernel`: the GEMV's input in plane order, float32 [M, cpw, K / cpw] (xp[j, w] = x[w * cpw + j]),
  so that a plane's inputs are contiguous, and its sum over each group; with ACT it also applies
  silu(gate) * up to a gate|up output (with CLAMP gpt_oss's clamped SwiGLU, quant/expert_act.py).
- `_gemv_kernel` (batch 1): per BLOCK_N output rows, walks its share of K (split-K with fp32 atomics when N
  alone gives too few programs; tiles from the GPU's tuned file (quant/gemv_tiles.py) where it lists the matrix,
  autotuned per shape on first use otherwise). It never forms W: per word part = sum_j q_j x_j (summed four
  codes at a time, so no thread waits on a chain of 16 adds), per group y += scale * (sum of parts - zero * xs)
  with xs the group's input sum from the planes pass; per weight that is one LOP3 (the code masked in place and
  or'd into 2^23's bits: int to float without a shift or the quarter-rate convert), a subtract and a
  multiply-add. Every tensor of a step shares the words' layout (x is loaded broadcast over the rows), so
  nothing crosses shared memory. `gemv_step` is one step of it (quant/moe_kernels.py's packed pass runs it too).
  An expert's FFN at batch 1: planes, GEMV gate|up, planes with silu * up, GEMV down (plus memsets for split-K).
- `_gemv_direct_kernel` (batch 1, where the tuned tile says DIRECT): the GEMV without the planes pass, x read
  in its own order with silu(gate) * up and the group sums computed in each program; an expert's FFN in
  two launches.
- `_gemm_kernel` (2 to quant/kernels.py's FUSED_MAX_ROWS rows, every row count of experts under LARGE_EXPERT weights):
  y = x @ W.T with W dequantized tile by tile on chip. Each word, scale and zero is loaded once; a word's
  codes become columns in order through a tree of tl.join (`_w_tile`), then tl.dot. Up to 64 rows the W
  tile is the product's wide left operand (SWAP: (W x^T)^T), so 16 rows of x fill a tensor-core tile.
  Tiles per row count from the H100 sweep (`gemm_config`, benchmarks/sweep_gemm.py).
- Many rows of a large expert (Mixtral's, at 512 rows): on a Hopper GPU, for 2- and 4-bit tiers, the
  warp-specialized GEMM of quant/hopper_gemm.py (W dequantized into the tensor cores' A registers, one
  warpgroup's dequantization overlapping the other's product; no bf16 copy of the weights); elsewhere, and for
  8 bits, `_dequant_kernel` (W to the activation dtype) and
  cuBLAS, each matrix dequantized on a side stream while the previous one's product runs
  (`dequant_ffn_overlapped`). quant/README.md has the measurements.

Importing this module needs neither Triton nor a GPU; `available()` says whether the kernels can run.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from quant import gemv_tiles
from quant.packing import PackedMatrix, codes_per_word

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # no triton, or a broken install: the CPU path does not need it
    HAVE_TRITON = False

F32_TWO_23 = 0x4B000000  # float32 2^23's bits: or'd with a code below bit 23 it reads 2^23 + the code's value
MAX_GROUP = 1024  # the GEMV's planes pass sums x over whole groups within one 1024-column block
TUNE_REPS = 20  # timed calls per tile config when tuning
GEMV_MAX_ROWS = 1  # more rows: dequantize + cuBLAS (each GEMV row re-reads W; measured in quant/README.md)


def available() -> bool:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return HAVE_TRITON and (interpreted or torch.cuda.is_available())


if HAVE_TRITON:

    # EVEN_K / EVEN_N: no GEMV tile overhangs K / N, so its loads need no mask
    _EVEN_TILES = {"EVEN_K": lambda a: a["K"] % (a["SPLIT_K"] * a["BLOCK_K"]) == 0,
                   "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0}

    @triton.jit
    def _exp2_neg(p):
        """2^-p, exactly, for integers p in [0, 126]: a float32 built from its exponent bits."""
        return ((127 - p) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _code_times_2p(half, p, magic, BITS: tl.constexpr):
        """The BITS-bit code at bit p of `half` as float32 q * 2^p, exactly, with neither a shift nor the
        quarter-rate int-to-float convert: masked in place and or'd into 2^23's bits (magic, held in a register
        so that mask-and-or is one LOP3), it reads 2^23 + q * 2^p (p + BITS <= 16 < 23); less 2^23, q * 2^p."""
        return ((half & (((1 << BITS) - 1) << p)) | magic).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def clamped_swiglu(g, u, alpha, limit, DT: tl.constexpr, ROUND: tl.constexpr):
        """quant/expert_act.ClampedSwiGLU on float32 g, u: (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'),
        g' = min(g, limit), in its order of operations; with ROUND each result rounded to DT as torch rounds
        in a 16-bit dtype."""
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        if ROUND:
            g = g.to(DT).to(tl.float32)
            u = u.to(DT).to(tl.float32)
            s = tl.sigmoid((g * alpha).to(DT).to(tl.float32)).to(DT).to(tl.float32)
            gs = (g * s).to(DT).to(tl.float32)
            return (((u + 1.0).to(DT).to(tl.float32)) * gs).to(DT).to(tl.float32)
        return (u + 1.0) * (g * tl.sigmoid(g * alpha))

    @triton.jit
    def _act_row(h_row, k, ok, K, alpha, limit, ACT: tl.constexpr, CLAMP: tl.constexpr):
        """h[row, k] in float32, or silu(h[row, k]) * h[row, K + k] (ACT, h = [gate | up]; with CLAMP the
        clamped SwiGLU of alpha and limit)."""
        if ACT:
            g = tl.load(h_row + k, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(h_row + K + k, mask=ok, other=0.0).to(tl.float32)
            if CLAMP:
                return clamped_swiglu(g, u, alpha, limit, tl.float32, False)
            return g * tl.sigmoid(g) * u
        return tl.load(h_row + k, mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _planes_kernel(h_ptr, out_ptr, xs_ptr, K, stride_hm, alpha, limit, ACT: tl.constexpr, CLAMP: tl.constexpr,
                       CPW: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
        """out[row, j, w] = v[row, w * CPW + j] and xs[row, g] = the sum of v over group g, float32;
        v = h (or silu(h[:, :K]) * h[:, K:] with ACT, the clamped SwiGLU with CLAMP). BLOCK is a multiple of
        GROUP."""
        row = tl.program_id(1)
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = k < K
        v = _act_row(h_ptr + row * stride_hm, k, ok, K, alpha, limit, ACT, CLAMP)
        # plane j's inputs scaled by 2^-p, p = its code's bit offset within a half word (see _gemv_kernel);
        # the scale is built from its exponent bits, so it is an exact power of two
        scale = _exp2_neg(((k % CPW) * (32 // CPW)) % 16)
        tl.store(out_ptr + row * K + (k % CPW) * (K // CPW) + k // CPW, v * scale, mask=ok)
        gi = tl.program_id(0) * (BLOCK // GROUP) + tl.arange(0, BLOCK // GROUP)
        xs = tl.sum(tl.reshape(v, [BLOCK // GROUP, GROUP]), axis=1)
        tl.store(xs_ptr + row * (K // GROUP) + gi, xs, mask=gi < K // GROUP)

    @triton.jit
    def _words_tile(w_ptr, n, n_ok, k0, words_k, stride_wn, CPW: tl.constexpr, BLOCK_W: tl.constexpr,
                    EVEN_K: tl.constexpr):
        """The GEMV's words for rows n from input column k0 (a multiple of the tile): columns, mask, words."""
        wc = tl.max_contiguous(tl.multiple_of(k0 // CPW, BLOCK_W) + tl.arange(0, BLOCK_W), BLOCK_W)
        w_ok = (wc < words_k) | EVEN_K
        words = tl.load(w_ptr + n[:, None] * stride_wn + wc[None, :], mask=n_ok[:, None] & w_ok[None, :], other=0)
        return wc, w_ok, words

    @triton.jit
    def _group_tile(s_ptr, z_ptr, n, n_ok, k0, groups_k, stride_sn, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                    EVEN_K: tl.constexpr):
        """The GEMV's scales and zeros for rows n from input column k0, float32: group columns, mask, s, z."""
        gc = tl.max_contiguous(tl.multiple_of(k0 // GROUP, BLOCK_G) + tl.arange(0, BLOCK_G), BLOCK_G)
        g_ok = (gc < groups_k) | EVEN_K
        sz_ok = n_ok[:, None] & g_ok[None, :]
        s = tl.load(s_ptr + n[:, None] * stride_sn + gc[None, :], mask=sz_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n[:, None] * stride_sn + gc[None, :], mask=sz_ok, other=0.0).to(tl.float32)
        return gc, g_ok, s, z

    @triton.jit
    def _store_rows(y, out, n_ok, SPLIT_K: tl.constexpr):
        if SPLIT_K == 1:
            tl.store(out, y.to(out.dtype.element_ty), mask=n_ok)
        else:
            tl.atomic_add(out, y, mask=n_ok)

    @triton.jit
    def gemv_step(w_ptr, s_ptr, z_ptr, xp_row, xs_row, n, n_ok, k0, words_k, groups_k, stride_wn, stride_sn, magic,
                  BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr):
        """One BLOCK_K-wide step of the GEMV for rows n: [BLOCK_N, BLOCK_K / GROUP] float32 terms to add up.
        xp_row / xs_row: one input row in plane order and its group sums (see _planes_kernel)."""
        CPW: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // CPW  # words per group
        BLOCK_W: tl.constexpr = BLOCK_K // CPW
        BLOCK_G: tl.constexpr = BLOCK_K // GROUP
        wc, w_ok, words = _words_tile(w_ptr, n, n_ok, k0, words_k, stride_wn, CPW, BLOCK_W, EVEN_K)
        # a sum per four codes of a word (INT8 one, INT4 two, INT2 four): INT2's 16 codes in one chain of 16
        # dependent adds made it slower than INT4's 8 on small experts
        part0 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        part1 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        part2 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        part3 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        high = words >> 16  # codes at bits 16-31, brought down once per word
        for j in tl.static_range(CPW):  # plane j: code j of every word, input column word * CPW + j
            # x loaded broadcast over the tile's rows, so it lands in the words' own layout: as a vector
            # Triton gave it another layout and converted it through shared memory, once per plane
            xj = tl.load(xp_row + j * words_k + wc[None, :] + 0 * n[:, None], mask=w_ok[None, :], other=0.0)
            # q * 2^p for code j at bit p of its half word; the planes pass scaled this plane's x by 2^-p
            half = words if j * BITS < 16 else high
            qf = _code_times_2p(half, (j * BITS) % 16, magic, BITS)
            if j % 4 == 0:
                part0 += qf * xj
            elif j % 4 == 1:
                part1 += qf * xj
            elif j % 4 == 2:
                part2 += qf * xj
            else:
                part3 += qf * xj
        part = (part0 + part1) + (part2 + part3)
        # per group: scale * (sum q x - zero * sum x), sum x from the planes kernel
        part_g = tl.sum(tl.reshape(part, [BLOCK_N, BLOCK_G, WPG]), axis=2)
        gc, g_ok, s, z = _group_tile(s_ptr, z_ptr, n, n_ok, k0, groups_k, stride_sn, GROUP, BLOCK_G, EVEN_K)
        xs = tl.load(xs_row + gc, mask=g_ok, other=0.0)
        return s * (part_g - z * xs[None, :])

    @triton.heuristics(_EVEN_TILES)
    @triton.jit
    def _gemv_kernel(
        xp_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        N, K, words_k, groups_k, stride_wn, stride_sn, stride_ym, magic,
        BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    ):
        """magic = 0x4B000000 (2^23's bits), passed at run time: as an immediate, ptxas masked and or'd each
        code in two instructions; from a register it fuses them into one LOP3. EVEN_K / EVEN_N drop the loads'
        masks (each masked load zeroed its registers first)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        row = tl.program_id(2)
        BLOCK_G: tl.constexpr = BLOCK_K // GROUP
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (n < N) | EVEN_N
        xp_row = xp_ptr + row * K  # x in plane order (see _planes_kernel): plane j is contiguous
        k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K  # each split's share of K
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        for step in range(0, k_span, BLOCK_K):
            k0 = pid_k * k_span + step
            acc += gemv_step(w_ptr, s_ptr, z_ptr, xp_row, xs_ptr + row * groups_k, n, n_ok, k0, words_k, groups_k,
                             stride_wn, stride_sn, magic, BITS, GROUP, BLOCK_N, BLOCK_K, EVEN_K)
        _store_rows(tl.sum(acc, axis=1), y_ptr + row * stride_ym + n, n_ok, SPLIT_K)

    @triton.heuristics(_EVEN_TILES)
    @triton.jit
    def _gemv_direct_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        N, K, words_k, groups_k, stride_xm, stride_wn, stride_sn, stride_ym, magic,
        ACT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    ):
        """The GEMV without the planes pass: x read in its own order (a word's codes as a third axis), with
        silu(gate) * up (ACT) and the group sums computed here, per program. One launch instead of two; the
        inputs are re-derived by every program, which pays on small experts only (the tuned tiles say where)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        row = tl.program_id(2)
        CPW: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // CPW
        BLOCK_W: tl.constexpr = BLOCK_K // CPW
        BLOCK_G: tl.constexpr = BLOCK_K // GROUP
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (n < N) | EVEN_N
        j = tl.arange(0, CPW)
        # code j sits at bit p = (j * BITS) % 16 of its half word; x is scaled by 2^-p (exact) to match
        shift = (j * BITS) % 16
        x_scale = _exp2_neg(shift)
        x_row = x_ptr + row * stride_xm
        k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        for step in range(0, k_span, BLOCK_K):
            k0 = pid_k * k_span + step
            wc, w_ok, words = _words_tile(w_ptr, n, n_ok, k0, words_k, stride_wn, CPW, BLOCK_W, EVEN_K)
            col = wc[None, :, None] * CPW + j[None, None, :] + 0 * n[:, None, None]  # broadcast over rows
            x_ok = w_ok[None, :, None] & (j[None, None, :] < CPW)
            if ACT:
                g = tl.load(x_row + col, mask=x_ok, other=0.0).to(tl.float32)
                u = tl.load(x_row + K + col, mask=x_ok, other=0.0).to(tl.float32)
                v = g * tl.sigmoid(g) * u
            else:
                v = tl.load(x_row + col, mask=x_ok, other=0.0).to(tl.float32)
            half = tl.where(j[None, None, :] * BITS < 16, words[:, :, None], words[:, :, None] >> 16)
            qf = _code_times_2p(half, shift[None, None, :], magic, BITS)
            part = tl.sum(qf * (v * x_scale[None, None, :]), axis=2)
            part_g = tl.sum(tl.reshape(part, [BLOCK_N, BLOCK_G, WPG]), axis=2)
            xs_g = tl.sum(tl.reshape(tl.sum(v, axis=2), [BLOCK_N, BLOCK_G, WPG]), axis=2)
            gc, g_ok, s, z = _group_tile(s_ptr, z_ptr, n, n_ok, k0, groups_k, stride_sn, GROUP, BLOCK_G, EVEN_K)
            acc += s * (part_g - z * xs_g)
        _store_rows(tl.sum(acc, axis=1), y_ptr + row * stride_ym + n, n_ok, SPLIT_K)

    def _bench_within_budget(fn, quantiles=None):  # noqa: ANN001, ANN202 - triton's do_bench signature
        """Time one tile config without Triton's default L2 flush: its ~256 MB scratch buffer would break
        the VRAM budget of the run that triggers tuning. The median (and quantiles) of event-timed calls."""
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(TUNE_REPS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        at = [times[min(len(times) - 1, int(q * len(times)))] for q in (quantiles or (0.5,))]
        return at if quantiles else at[0]

    # Tiles chosen by measurement on first use of each (N, K, bits, group), as the H100 sweep found no
    # single best (quant/README.md). Warm up before capturing a CUDA graph: tuning cannot run in a capture.
    _gemv_tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
            for bn, bk, w in ((4, 512, 4), (4, 1024, 4), (4, 2048, 4), (8, 1024, 4), (8, 2048, 8), (16, 2048, 8))
        ],
        key=["N", "K", "BITS", "GROUP", "SPLIT_K"],
        prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: [
            c for c in configs if c.kwargs["BLOCK_K"] % kw["GROUP"] == 0] or configs[-1:]},
        reset_to_zero=["y_ptr"],
        do_bench=_bench_within_budget,
    )(_gemv_kernel)

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


    @triton.jit
    def _plane(words, high, s, b, magic, j: tl.constexpr, BITS: tl.constexpr, DTYPE: tl.constexpr):
        """Code j of every word, dequantized: (q - zero) * scale as packing.dequantize rounds it, in DTYPE.
        The code is read as q * 2^p where it sits at bit p of its half word (_code_times_2p);
        q * 2^p * (scale * 2^-p) + b, b = -zero * scale, is one FMA whose product and b are
        exact in float32 (fp16 operands), so it rounds once, as (q - zero) * scale does."""
        half = words if j * BITS < 16 else high
        qf = _code_times_2p(half, (j * BITS) % 16, magic, BITS)
        return (qf * (s * (1.0 / (1 << ((j * BITS) % 16)))) + b).to(DTYPE)

    @triton.jit
    def _planes4(words, high, s, b, magic, c: tl.constexpr, step: tl.constexpr, BITS: tl.constexpr,
                 DTYPE: tl.constexpr):
        """Codes c, c + step, c + 2 step, c + 3 step of every word, joined into new trailing dims [.., 2, 2]
        that flatten in that order. tl.join's new dim is the last, so the outer join picks the lowest bit."""
        return tl.join(tl.join(_plane(words, high, s, b, magic, c, BITS, DTYPE),
                               _plane(words, high, s, b, magic, c + 2 * step, BITS, DTYPE)),
                       tl.join(_plane(words, high, s, b, magic, c + step, BITS, DTYPE),
                               _plane(words, high, s, b, magic, c + 3 * step, BITS, DTYPE)))

    @triton.jit
    def _w_tile(w_ptr, s_ptr, z_ptr, n, n_ok, k0, stride_wn, stride_sn, magic,
                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DTYPE: tl.constexpr):
        """W[n, k0:k0 + BLOCK_K] dequantized, [BLOCK_N, BLOCK_K] in DTYPE. Each word, scale and zero is
        loaded once; a word's codes are expanded with tl.join, whose trailing dims, flattened, give the
        columns in order (word * cpw + j)."""
        CPW: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // CPW
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        wc = k0 // CPW + tl.arange(0, WORDS)
        words = tl.load(w_ptr + n[:, None] * stride_wn + wc[None, :], mask=n_ok[:, None], other=0)
        gc = k0 // GROUP + tl.arange(0, GROUPS)
        s = tl.load(s_ptr + n[:, None] * stride_sn + gc[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n[:, None] * stride_sn + gc[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        # a group is a whole number of words: each word takes its group's scale and zero
        s = tl.reshape(tl.broadcast_to(s[:, :, None], [BLOCK_N, GROUPS, WORDS // GROUPS]), [BLOCK_N, WORDS])
        b = -tl.reshape(tl.broadcast_to(z[:, :, None], [BLOCK_N, GROUPS, WORDS // GROUPS]), [BLOCK_N, WORDS]) * s
        high = words >> 16
        if CPW == 4:
            t = _planes4(words, high, s, b, magic, 0, 1, BITS, DTYPE)
        elif CPW == 8:
            t = tl.join(_planes4(words, high, s, b, magic, 0, 2, BITS, DTYPE),
                        _planes4(words, high, s, b, magic, 1, 2, BITS, DTYPE))
        else:
            t = tl.join(tl.join(_planes4(words, high, s, b, magic, 0, 4, BITS, DTYPE),
                                _planes4(words, high, s, b, magic, 2, 4, BITS, DTYPE)),
                        tl.join(_planes4(words, high, s, b, magic, 1, 4, BITS, DTYPE),
                                _planes4(words, high, s, b, magic, 3, 4, BITS, DTYPE)))
        return tl.reshape(t, [BLOCK_N, BLOCK_K])

    @triton.jit
    def _gemm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        M, N, K, stride_xm, stride_wn, stride_sn, stride_ym, magic,
        BITS: tl.constexpr, GROUP: tl.constexpr, SWAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y[M, N] = x[M, K] @ W.T with W dequantized tile by tile on chip. SWAP computes (W x^T)^T: the
        W tile is the product's wide left operand and a few rows of x (down to 16) its narrow right one."""
        pid = tl.program_id(0)
        m_tiles = tl.cdiv(M, BLOCK_M)
        pid_m = pid % m_tiles  # the programs of one W tile run side by side: W comes from HBM once
        pid_n = pid // m_tiles
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok = n < N
        m_ok = m < M
        kk = tl.arange(0, BLOCK_K)
        DTYPE: tl.constexpr = x_ptr.dtype.element_ty
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _w_tile(w_ptr, s_ptr, z_ptr, n, n_ok, k0, stride_wn, stride_sn, magic, BITS, GROUP, BLOCK_N, BLOCK_K,
                        DTYPE)
            if SWAP:
                xt = tl.load(x_ptr + m[None, :] * stride_xm + (k0 + kk)[:, None], mask=m_ok[None, :], other=0.0)
                acc = tl.dot(w, xt, acc)
            else:
                x = tl.load(x_ptr + m[:, None] * stride_xm + (k0 + kk)[None, :], mask=m_ok[:, None], other=0.0)
                acc = tl.dot(x, tl.trans(w), acc)
        if SWAP:
            tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=n_ok[:, None] & m_ok[None, :])
        else:
            tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])


_SM_COUNT: dict[int, int] = {}


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    index = _device_index(device)
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def split_k(n: int, k: int, device: torch.device) -> int:
    """Split K only when the rows alone (16 a program) cannot fill half the GPU: on Mixtral and Qwen3
    experts the extra launches of split-K (an fp32 memset, atomics, a cast) cost more than they gain."""
    n_blocks = -(-n // 16)
    sms = _sm_count(device)
    return 1 if 2 * n_blocks >= sms else max(1, min(k // 512, sms // n_blocks))


def tier_fits(bits: int, group: int, *widths: int, max_group: int = MAX_GROUP) -> bool:
    """Whether INT{bits} in groups of `group` fits the Triton kernels for matrices of these input widths: bits 2,
    4 or 8 (INT3 codes straddle words), the group a whole number of words and a power of two up to max_group
    (the GEMV sums inputs and products per group in power-of-two tiles), every width a multiple of it."""
    if bits == 3 or group % codes_per_word(bits) or group & (group - 1) or group > max_group:
        return False
    return all(width % group == 0 for width in widths)


def _check(x: torch.Tensor, w: PackedMatrix) -> None:
    n, k = w.shape
    if not tier_fits(w.bits, w.group_size, k):
        raise ValueError(f"INT{w.bits} g{w.group_size} with K={k} does not fit the Triton kernels")
    if not (w.codes.is_contiguous() and w.scale.is_contiguous() and w.zero.is_contiguous()):
        raise ValueError("packed tensors must be contiguous")


def planes(h: torch.Tensor, bits: int, group: int, act: bool = False,
           clamp: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, K] (or [M, 2K] gate|up with act) -> the GEMV's input: float32 [M, cpw, K / cpw] in plane order,
    and float32 [M, K / group] group sums. clamp: (alpha, limit) of a clamped SwiGLU in place of silu * up."""
    cpw = codes_per_word(bits)
    rows, k = h.shape[0], h.shape[1] // 2 if act else h.shape[1]
    out = torch.empty(rows, cpw, k // cpw, device=h.device, dtype=torch.float32)
    sums = torch.empty(rows, k // group, device=h.device, dtype=torch.float32)
    block = max(1024, group)
    alpha, limit = clamp or (1.0, 0.0)
    _planes_kernel[(triton.cdiv(k, block), rows)](h, out, sums, k, h.stride(0), float(alpha), float(limit), ACT=act,
                                                  CLAMP=clamp is not None, CPW=cpw, GROUP=group, BLOCK=block)
    return out, sums


def gemv(x: torch.Tensor, w: PackedMatrix, act: bool = False, out_dtype: torch.dtype | None = None,
         config: dict | None = None) -> torch.Tensor:
    """x [M, K] (or [M, 2K] gate|up with act=True: silu(gate) * up is the input) -> [M, N].

    config: {"BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "DIRECT"} to bypass the autotuner (sweeps,
    tests); DIRECT runs `_gemv_direct_kernel` (no planes pass).
    """
    _check(x, w)
    n, k = w.shape
    x = x.contiguous()
    rows = x.shape[0]
    cfg = dict(config) if config else gemv_tiles.lookup(n, k, w.bits, w.group_size, x.device)
    if not cfg and os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter cannot time configs
        cfg = {"BLOCK_N": 16, "BLOCK_K": max(256, w.group_size), "num_warps": 4}
    split = cfg.pop("SPLIT_K", None) or split_k(n, k, x.device)
    direct = cfg.pop("DIRECT", False)
    out_dtype = out_dtype or x.dtype
    if split > 1:
        y = torch.zeros(rows, n, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(rows, n, device=x.device, dtype=out_dtype)
    shape = (n, k, k // codes_per_word(w.bits), k // w.group_size)
    if direct:
        _gemv_direct_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split, rows)](
            x, w.codes, w.scale, w.zero, y, *shape, x.stride(0), w.codes.stride(0), w.scale.stride(0), y.stride(0),
            F32_TWO_23, ACT=act, BITS=w.bits, GROUP=w.group_size, SPLIT_K=split, **cfg)
        return y if y.dtype == out_dtype else y.to(out_dtype)
    xp, sums = planes(x, w.bits, w.group_size, act)
    args = (xp, sums, w.codes, w.scale, w.zero, y, *shape, w.codes.stride(0), w.scale.stride(0), y.stride(0),
            F32_TWO_23)
    if cfg:
        _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split, rows)](
            *args, BITS=w.bits, GROUP=w.group_size, SPLIT_K=split, **cfg
        )
    else:
        _gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split, rows)](
            *args, BITS=w.bits, GROUP=w.group_size, SPLIT_K=split
        )
    return y if y.dtype == out_dtype else y.to(out_dtype)


def dequant(w: PackedMatrix, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] in `dtype` (the same values as quant.packing.dequantize), into `out` if given."""
    _check(w.codes, w)
    n, k = w.shape
    out = torch.empty(n, k, device=w.codes.device, dtype=dtype) if out is None else out
    block_k = max(256, w.group_size)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, block_k))
    _dequant_kernel[grid](w.codes, w.scale, w.zero, out, n, k, w.codes.stride(0), w.scale.stride(0),
                          BITS=w.bits, GROUP=w.group_size, BLOCK_N=32, BLOCK_K=block_k, num_warps=4)
    return out


def whole_group_tile(k: int, group: int) -> int:
    """The widest K tile of 128/64/32 columns that divides K in whole groups of `group` (0: none does)."""
    return next((b for b in (128, 64, 32) if k % b == 0 and b % group == 0), 0)


def gemm_config(rows: int, n: int, k: int, group: int, sms: int = 132) -> dict:
    """Tiles of the fused GEMM for `rows` rows of x, from the H100 sweep (benchmarks/sweep_gemm.py, quant/README.md).
    Up to 64 rows the W tile is the product's wide operand (SWAP) and x's rows its narrow one, and up to 128
    rows of a wide matrix (Mixtral's gate|up) too; more rows take 128 x 128 tiles, or 64 x 64 where those would
    leave most of the `sms` multiprocessors idle."""
    # the widest of 128/64/32 that divides K in whole groups (the bundled model's K=160 takes 32), else a group
    block_k = whole_group_tile(k, group) or group
    if rows <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 128 if n >= 16384 else 64, "BLOCK_K": block_k, "SWAP": True,
                "num_warps": 4, "num_stages": 4}
    if rows <= 64:
        return {"BLOCK_M": max(16, triton.next_power_of_2(rows)), "BLOCK_N": 64, "BLOCK_K": block_k, "SWAP": True,
                "num_warps": 4, "num_stages": 4}
    if rows <= 128 and n >= 16384:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": block_k, "SWAP": True, "num_warps": 4, "num_stages": 3}
    tile = 128 if triton.cdiv(n, 128) * triton.cdiv(rows, 128) >= sms else 64
    return {"BLOCK_M": tile, "BLOCK_N": tile, "BLOCK_K": block_k, "SWAP": False, "num_warps": 8, "num_stages": 3}


def gemm(x: torch.Tensor, w: PackedMatrix, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (16-bit) @ W.T -> [M, N] in x's dtype, W dequantized inside the product (fused GEMM)."""
    _check(x, w)
    n, k = w.shape
    cfg = dict(config) if config else gemm_config(x.shape[0], n, k, w.group_size, _sm_count(x.device))
    if k % cfg["BLOCK_K"] or cfg["BLOCK_K"] % w.group_size:
        raise ValueError(f"BLOCK_K {cfg['BLOCK_K']} must divide K={k} and hold whole groups of {w.group_size}")
    x = x.contiguous()
    rows = x.shape[0]
    y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemm_kernel[grid](x, w.codes, w.scale, w.zero, y, rows, n, k, x.stride(0), w.codes.stride(0),
                       w.scale.stride(0), y.stride(0), F32_TWO_23, BITS=w.bits, GROUP=w.group_size, **cfg)
    return y


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = _device_index(device)
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def dequant_ffn_overlapped(x: torch.Tensor, gate_up: PackedMatrix, down: PackedMatrix) -> torch.Tensor:
    """Many rows of a large expert: cuBLAS on dequantized weights, each matrix dequantized on a side stream
    while the previous one's product runs (gate first, then up under gate's product, down under up's)."""
    inter, hidden = down.shape[1], down.shape[0]
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    gate = dequant(gate_up.rows(0, inter), x.dtype)
    up = torch.empty(inter, hidden, device=x.device, dtype=x.dtype)  # allocated on main, written on side
    dn = torch.empty(hidden, inter, device=x.device, dtype=x.dtype)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        dequant(gate_up.rows(inter, 2 * inter), x.dtype, out=up)
        up_ready = torch.cuda.Event()
        up_ready.record(side)
        dequant(down, x.dtype, out=dn)
    g = F.linear(x, gate)
    main.wait_event(up_ready)
    h = F.silu(g) * F.linear(x, up)
    main.wait_stream(side)
    return F.linear(h, dn)
