"""Many rows of x times a packed tier on a Hopper GPU (sm_90): y = x @ W.T, W dequantized in shared memory by
warps of their own while the tensor cores multiply (a warp-specialized mixed-input GEMM, in Gluon).

Why: quant/triton_kernels.py's fused GEMM dequantizes W in registers and hands the tile to `tl.dot`, which
waits for each tensor-core product before the next dequantization starts (scripts/sass_stats.py shows a
WARPGROUP.DEPBAR after every HGMMA), so at 512 rows of a Mixtral expert it loses to dequantize + cuBLAS.
Gluon, Triton's lower-level dialect, exposes shared memory, mbarriers, TMA, the asynchronous wgmma and
warp specialization, which lets the two overlap:

- producer warps (PRODUCER_WARPS, a thread per W row): W's packed words arrive by TMA into a ring RS steps ahead,
  its scales and zeros (read as int32 pairs of float16 groups) into registers two steps ahead; each 64-column
  step of the W tile is dequantized into a ring of bf16 tiles in shared memory;
- consumer warps (num_warps, two warpgroups): x's tiles arrive by TMA into their own ring; one asynchronous
  wgmma per step, W tile @ x tile^T, with the previous step's still in flight; a finished step frees its W
  slot (an mbarrier the producers wait on) and its x slot (refilled at once).

Each weight is dequantized as the other kernels do: the code is masked in place and or'd into 2^23's bits,
then one FMA, q * 2^p * (scale * 2^-p) + (-zero * scale), whose product and addend are exact in float32, so it
rounds once like quant.packing.dequantize's (q - zero) * scale. A W tile serves BLOCK_X rows of x; SPLIT > 1
splits K between programs (float32 partial sums, added on the host side), for matrices with few W tiles.
Measured against dequantize + cuBLAS in quant/README.md ("A warp-specialized prefill GEMM").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quant import triton_kernels as tk
from quant.packing import PackedMatrix

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from quant.triton_kernels import _code_times_2p, _exp2_neg

    HAVE_GLUON = True
except ImportError:  # an older Triton, or none
    HAVE_GLUON = False

BLOCK_K = 64  # columns of K per step: one 128-byte swizzled row of bf16


def available(device: torch.device) -> bool:
    """A Hopper GPU (compute capability 9.x) and a Triton with Gluon's wgmma."""
    return (HAVE_GLUON and device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] == 9)


def fits(bits: int, group: int, n: int, k: int, split: int = 1) -> bool:
    """Shapes the kernel takes (any number n of W rows): each split of K in whole 64-column steps and whole
    groups, groups a power of two from 16 (at most four groups a step) holding whole words. TMA also needs
    16-byte rows (`tma_ready`)."""
    part = k // split
    return (bits in (2, 4, 8) and k % split == 0 and part % BLOCK_K == 0 and part % group == 0
            and group % (32 // bits) == 0 and group & (group - 1) == 0 and group >= 16)


def tma_ready(w: PackedMatrix) -> bool:
    """TMA reads the codes and the scales and zeros are read as int32 pairs: 16-byte aligned starts and row
    strides, contiguous rows."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 and t.stride(1) == 1
               and t.shape[1] * t.element_size() % 4 == 0 for t in (w.codes, w.scale, w.zero))


if HAVE_GLUON:

    @gluon.constexpr_function
    def _row_layout(BITS, GROUP, BLOCK_K, WARPS):  # noqa: ANN001, ANN202, N803 - constexpr arguments
        """A W tile's step as [rows, groups, words per group, codes per word], a thread holding a whole row step
        (its scale and zero once per group), a warp 32 rows."""
        cpw = 32 // BITS
        groups = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
        return gl.BlockedLayout([1, groups, BLOCK_K // cpw // groups, cpw], [32, 1, 1, 1], [WARPS, 1, 1, 1],
                                [3, 2, 1, 0])

    @gluon.constexpr_function
    def _pair_layout(GROUP, BLOCK_K, WARPS):  # noqa: ANN001, ANN202, N803 - constexpr arguments
        """A step's scales (or zeros) as int32 pairs of float16 groups [rows, pairs], a thread a row."""
        return gl.BlockedLayout([1, 2 if BLOCK_K // GROUP == 4 else 1], [32, 1], [WARPS, 1], [1, 0])

    @gluon.jit
    def _load_pairs(p_ptr, rows, rows_ok, k0, K, stride_p, GROUP: gl.constexpr, BLOCK_K: gl.constexpr,
                    WARPS: gl.constexpr):
        """The int32 pairs of groups holding step k0's scales (or zeros): from the pair of its first group on."""
        PL: gl.constexpr = _pair_layout(GROUP, BLOCK_K, WARPS)
        j = gl.arange(0, PL.size_per_thread[1], layout=gl.SliceLayout(0, PL))
        rows2 = gl.convert_layout(rows, gl.SliceLayout(1, PL), assert_trivial=True)
        ok = gl.convert_layout(rows_ok, gl.SliceLayout(1, PL), assert_trivial=True)[:, None] & (k0 < K)
        return gl.load(p_ptr + rows2[:, None] * stride_p + (k0 // GROUP // 2 + j)[None, :], mask=ok, other=0)

    @gluon.jit
    def _halves(v, k0, GROUP: gl.constexpr, GROUPS: gl.constexpr, sz_layout: gl.constexpr):
        """The step's GROUPS float16 values [rows, GROUPS] in float32 from its int32 pairs (low half first)."""
        BLOCK_W: gl.constexpr = v.shape[0]
        lo = (v & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
        hi = (v >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
        if GROUPS == 1:  # one group a step: the pair's half is the group's parity
            out = gl.where((k0 // GROUP) % 2 == 0, lo, hi)
        else:  # two or four groups a step: one or two whole pairs, low half first
            out = gl.reshape(gl.join(lo, hi), [BLOCK_W, GROUPS])
        return gl.convert_layout(out, sz_layout)

    @gluon.jit
    def _row_codes(raw_words, s_pairs, z_pairs, k0, BITS: gl.constexpr, GROUP: gl.constexpr,
                   BLOCK_K: gl.constexpr, L4: gl.constexpr):
        """One step's words [rows, groups, words per group, 1] from its raw tile in shared memory, and each
        group's scale and -zero * scale [rows, groups, 1, 1] in float32, in L4."""
        CPW: gl.constexpr = 32 // BITS
        GROUPS: gl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
        WPG: gl.constexpr = BLOCK_K // CPW // GROUPS
        BLOCK_W: gl.constexpr = raw_words.type.shape[0]
        WARPS: gl.constexpr = L4.warps_per_cta[0]
        rows_layout: gl.constexpr = gl.BlockedLayout([1, GROUPS * WPG], [32, 1], [WARPS, 1], [1, 0])
        words = gl.reshape(raw_words.load(rows_layout), [BLOCK_W, GROUPS, WPG])
        words = gl.convert_layout(words, gl.SliceLayout(3, L4), assert_trivial=True)
        sz_layout: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, L4))
        sc = _halves(s_pairs, k0, GROUP, GROUPS, sz_layout)
        zero = _halves(z_pairs, k0, GROUP, GROUPS, sz_layout)
        return words[:, :, :, None], sc[:, :, None, None], (-zero * sc)[:, :, None, None]

    @gluon.jit
    def _row_dequant(words, sc, b, magic, BITS: gl.constexpr, BLOCK_K: gl.constexpr, L4: gl.constexpr):
        """[rows, BLOCK_K] bf16. Each code is read in place: masked where it sits at bit p of its half word and
        or'd into 2^23's bits (one LOP3, `magic` in a register), it reads 2^23 + q * 2^p; less 2^23, times
        scale * 2^-p (exact) plus -zero * scale is one FMA that rounds once, as (q - zero) * scale does."""
        CPW: gl.constexpr = 32 // BITS
        c = gl.arange(0, CPW, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
        bit = (c * BITS)[None, None, None, :]
        p = bit % 16
        half = gl.where(bit >= 16, words >> 16, words)
        w = gl.fma(_code_times_2p(half, p, magic, BITS), sc * _exp2_neg(p), b)
        return gl.reshape(w.to(gl.bfloat16), [words.shape[0], BLOCK_K])

    @gluon.jit
    def _load_raw(codes_desc, raw_words, raw_ready, k0, off_w, BITS: gl.constexpr):
        """TMA of the words of W[off_w:, k0:k0 + BLOCK_K] into one raw slot."""
        mbarrier.expect(raw_ready, codes_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(codes_desc, [off_w, k0 // (32 // BITS)], raw_ready, raw_words)

    @gluon.jit
    def _producer(codes_desc, raw_words, raw_ready, w_smem, w_ready, w_empty, s_ptr, z_ptr, N, k_begin, k_end,
                  stride_p, off_w, magic, BITS: gl.constexpr, GROUP: gl.constexpr, BLOCK_K: gl.constexpr,
                  WARPS: gl.constexpr):
        """Worker warps: W's words by TMA into a ring RS steps ahead, its scales and zeros into registers two steps
        ahead; each step's tile dequantized into the W ring (a slot freed by the consumer once the product that
        read it is done)."""
        RS: gl.constexpr = raw_words.type.shape[0]
        WB: gl.constexpr = w_smem.type.shape[0]
        BLOCK_W: gl.constexpr = w_smem.type.shape[1]
        L4: gl.constexpr = _row_layout(BITS, GROUP, BLOCK_K, WARPS)
        steps = (k_end - k_begin) // BLOCK_K
        for i in gl.static_range(RS):
            if i < steps:
                _load_raw(codes_desc, raw_words.index(i), raw_ready.index(i), k_begin + i * BLOCK_K, off_w, BITS)
        rows = off_w + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
        rows_ok = rows < N
        s0 = _load_pairs(s_ptr, rows, rows_ok, k_begin, k_end, stride_p, GROUP, BLOCK_K, WARPS)
        z0 = _load_pairs(z_ptr, rows, rows_ok, k_begin, k_end, stride_p, GROUP, BLOCK_K, WARPS)
        s1 = _load_pairs(s_ptr, rows, rows_ok, k_begin + BLOCK_K, k_end, stride_p, GROUP, BLOCK_K, WARPS)
        z1 = _load_pairs(z_ptr, rows, rows_ok, k_begin + BLOCK_K, k_end, stride_p, GROUP, BLOCK_K, WARPS)
        for i in range(steps):
            k0 = k_begin + i * BLOCK_K
            rs = i % RS
            mbarrier.wait(raw_ready.index(rs), (i // RS) & 1)
            words, sc, b = _row_codes(raw_words.index(rs), s0, z0, k0, BITS, GROUP, BLOCK_K, L4)
            s0, z0 = s1, z1
            s1 = _load_pairs(s_ptr, rows, rows_ok, k0 + 2 * BLOCK_K, k_end, stride_p, GROUP, BLOCK_K, WARPS)
            z1 = _load_pairs(z_ptr, rows, rows_ok, k0 + 2 * BLOCK_K, k_end, stride_p, GROUP, BLOCK_K, WARPS)
            w = _row_dequant(words, sc, b, magic, BITS, BLOCK_K, L4)
            wb = i % WB
            mbarrier.wait(w_empty.index(wb), ((i // WB) & 1) ^ 1)
            w_smem.index(wb).store(w)
            fence_async_shared()
            gl.thread_barrier()  # every producer thread's stores (and reads of the raw slot), before the one arrive
            mbarrier.arrive(w_ready.index(wb), count=1)
            if i + RS < steps:  # the raw slot is read by every thread: TMA refills it
                _load_raw(codes_desc, raw_words.index(rs), raw_ready.index(rs), k0 + RS * BLOCK_K, off_w, BITS)

    @gluon.jit
    def _consumer(x_desc, x_smem, x_ready, w_smem, w_ready, w_empty, k_begin, k_end, off_x,
                  BLOCK_X: gl.constexpr, BLOCK_K: gl.constexpr, num_warps: gl.constexpr):
        """The default warps: one asynchronous wgmma per K step, W tile @ x tile^T, one step in flight; each x
        slot is refilled by TMA (XS steps ahead) as soon as the product that read it is done."""
        BLOCK_W: gl.constexpr = w_smem.type.shape[1]
        XS: gl.constexpr = x_smem.type.shape[0]
        WB: gl.constexpr = w_smem.type.shape[0]
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_X, 16])
        steps = (k_end - k_begin) // BLOCK_K
        for i in gl.static_range(XS):
            if i < steps:
                mbarrier.expect(x_ready.index(i), x_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(x_desc, [off_x, k_begin + i * BLOCK_K], x_ready.index(i),
                                                x_smem.index(i))
        acc = gl.zeros([BLOCK_W, BLOCK_X], gl.float32, layout=ACC)
        for i in range(steps):
            xs = i % XS
            wb = i % WB
            mbarrier.wait(w_ready.index(wb), (i // WB) & 1)
            mbarrier.wait(x_ready.index(xs), (i // XS) & 1)
            acc = warpgroup_mma(w_smem.index(wb), x_smem.index(xs).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            gl.thread_barrier()  # step i - 1's product is done in every warpgroup: free its slots
            mbarrier.arrive(w_empty.index((i + WB - 1) % WB), count=1, pred=i > 0)
            prev = (i + XS - 1) % XS
            refill = (i > 0) & (i - 1 + XS < steps)
            mbarrier.expect(x_ready.index(prev), x_desc.block_type.nbytes, pred=refill)
            tma.async_copy_global_to_shared(x_desc, [off_x, k_begin + (i - 1 + XS) * BLOCK_K], x_ready.index(prev),
                                            x_smem.index(prev), pred=refill)
        return (warpgroup_mma_wait(num_outstanding=0, deps=(acc,)),)  # warp_specialize takes a tuple

    @gluon.jit
    def _ws_gemm_kernel(
        x_desc, codes_desc, s_ptr, z_ptr, y_ptr, M, N, K, stride_p, stride_ym, magic,
        BITS: gl.constexpr, GROUP: gl.constexpr, BLOCK_W: gl.constexpr, BLOCK_X: gl.constexpr,
        BLOCK_K: gl.constexpr, XS: gl.constexpr, WB: gl.constexpr, RS: gl.constexpr, SPLIT: gl.constexpr,
        PRODUCER_WARPS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Program (tile, split): y[off_x:, off_w:] (or split's float32 partial) = x @ W.T over its part of K."""
        pid = gl.program_id(0)
        x_tiles = gl.cdiv(M, BLOCK_X)
        off_x = (pid % x_tiles) * BLOCK_X  # the programs of one W tile run side by side: W comes from HBM once
        off_w = (pid // x_tiles) * BLOCK_W
        part = K // SPLIT
        k_begin = gl.program_id(1) * part
        w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_W, BLOCK_K], gl.bfloat16)
        w_smem = gl.allocate_shared_memory(gl.bfloat16, [WB, BLOCK_W, BLOCK_K], w_layout)
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [XS, BLOCK_X, BLOCK_K], x_desc.layout)
        raw_words = gl.allocate_shared_memory(gl.int32, [RS] + codes_desc.block_type.shape, codes_desc.layout)
        w_ready = gl.allocate_shared_memory(gl.int64, [WB, 1], mbarrier.MBarrierLayout())
        w_empty = gl.allocate_shared_memory(gl.int64, [WB, 1], mbarrier.MBarrierLayout())
        x_ready = gl.allocate_shared_memory(gl.int64, [XS, 1], mbarrier.MBarrierLayout())
        raw_ready = gl.allocate_shared_memory(gl.int64, [RS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(WB):
            mbarrier.init(w_ready.index(i), count=1)
            mbarrier.init(w_empty.index(i), count=1)
        for i in gl.static_range(XS):
            mbarrier.init(x_ready.index(i), count=1)
        for i in gl.static_range(RS):
            mbarrier.init(raw_ready.index(i), count=1)
        (acc,) = gl.warp_specialize([
            (_consumer, (x_desc, x_smem, x_ready, w_smem, w_ready, w_empty, k_begin, k_begin + part, off_x,
                         BLOCK_X, BLOCK_K, num_warps)),
            (_producer, (codes_desc, raw_words, raw_ready, w_smem, w_ready, w_empty, s_ptr, z_ptr, N, k_begin,
                         k_begin + part, stride_p, off_w, magic, BITS, GROUP, BLOCK_K, PRODUCER_WARPS)),
        ], [PRODUCER_WARPS], [PRODUCER_REGS])
        ACC: gl.constexpr = acc.type.layout
        n_out = off_w + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, ACC))
        m_out = off_x + gl.arange(0, BLOCK_X, layout=gl.SliceLayout(0, ACC))
        out = y_ptr + gl.program_id(1) * M * stride_ym + m_out[None, :] * stride_ym + n_out[:, None]
        gl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(n_out < N)[:, None] & (m_out < M)[None, :])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _desc(t: torch.Tensor, block: list[int], dtype):  # noqa: ANN001, ANN202 - a Gluon dtype and descriptor
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def gemm(x: torch.Tensor, w: PackedMatrix, split: int = 1, block_w: int = 128, block_x: int = 256,
         x_stages: int = 4, w_stages: int = 3, raw_stages: int = 4, warps: int = 8, producer_warps: int = 4,
         producer_regs: int = 152) -> torch.Tensor:
    """x [M, K] bf16 @ W.T -> [M, N] bf16 (Hopper only: `available`). The defaults are the H100 sweep's best
    for Mixtral's matrices at 512 rows (quant/README.md); `split` parts of K are summed in float32."""
    n, k = w.shape
    if x.dtype != torch.bfloat16 or not fits(w.bits, w.group_size, n, k, split):
        raise ValueError(f"the wgmma GEMM takes bf16 x and K in whole {BLOCK_K}-column steps of whole groups per "
                         f"split (got {x.dtype}, K={k}, split {split}, {w.bits}-bit groups of {w.group_size})")
    if not tma_ready(w):
        raise ValueError("the wgmma GEMM reads W by TMA: its codes, scales and zeros need 16-byte aligned rows")
    x = x.contiguous()
    rows = x.shape[0]
    y = torch.empty((split, rows, n) if split > 1 else (rows, n), device=x.device,
                    dtype=torch.float32 if split > 1 else x.dtype)
    x_desc = _desc(x, [block_x, BLOCK_K], gl.bfloat16)
    codes_desc = _desc(w.codes, [block_w, BLOCK_K // (32 // w.bits)], gl.int32)
    s_pairs, z_pairs = w.scale.view(torch.int32), w.zero.view(torch.int32)  # pairs of float16 groups
    grid = (_cdiv(rows, block_x) * _cdiv(n, block_w), split)
    _ws_gemm_kernel[grid](x_desc, codes_desc, s_pairs, z_pairs, y, rows, n, k, s_pairs.stride(0), n, tk.F32_TWO_23,
                          BITS=w.bits, GROUP=w.group_size, BLOCK_W=block_w, BLOCK_X=block_x, BLOCK_K=BLOCK_K,
                          XS=x_stages, WB=w_stages, RS=raw_stages, SPLIT=split, PRODUCER_WARPS=producer_warps,
                          PRODUCER_REGS=producer_regs, num_warps=warps)
    return y.sum(0, dtype=torch.float32).to(x.dtype) if split > 1 else y


def usable(x: torch.Tensor, *matrices: PackedMatrix) -> bool:
    """Whether `expert_ffn` takes these: bf16 rows on a Hopper GPU, every matrix fits and reads by TMA."""
    return (x.dtype == torch.bfloat16 and available(x.device)
            and all(fits(m.bits, m.group_size, *m.shape) and tma_ready(m) for m in matrices))


def down_split(rows: int, n: int, k: int, bits: int, group: int, sms: int) -> int:
    """Split K in two where the tiles would leave more than a quarter of the multiprocessors idle (Mixtral's down
    at 512 rows: 64 tiles on 132 SMs) and the halves hold whole steps and groups."""
    tiles = _cdiv(rows, 256) * _cdiv(n, 128)
    return 2 if tiles < 0.75 * sms and fits(bits, group, n, k, 2) else 1


def expert_ffn(x: torch.Tensor, gate_up: PackedMatrix, down: PackedMatrix) -> torch.Tensor:
    """down(silu(gate x) * up x) for many rows of x by the warp-specialized GEMM (`usable` says when)."""
    inter = down.shape[1]
    h = gemm(x, gate_up)
    split = down_split(x.shape[0], down.shape[0], inter, down.bits, down.group_size, tk._sm_count(x.device))
    return gemm(F.silu(h[:, :inter]) * h[:, inter:], down, split=split)
