"""Many rows of x times a packed 2- or 4-bit tier on a Hopper GPU (sm_90): y = x @ W.T, W dequantized straight into
the registers the tensor cores read (a warp-specialized mixed-input GEMM, in Gluon).

Why: quant/triton_kernels.py's fused GEMM hands `tl.dot` a W tile it dequantized in registers, and `tl.dot` waits
for each tensor-core product before the next dequantization starts, so at 512 rows of a Mixtral expert it loses to
dequantize + cuBLAS. Gluon, Triton's lower-level dialect, exposes mbarriers, TMA, the asynchronous wgmma (whose A
operand may sit in registers) and warp specialization. Each program computes a tile of 128 W rows x 256 x rows:

- a loader warp brings each 64-column step's x tile and packed W words by TMA into a ring of S slots;
- two MMA warpgroups each own 64 of the tile's W rows. Each loads its words of the step from shared memory,
  dequantizes them into its wgmma A registers (bf16), and multiplies by the x tile, then frees the slot. A
  warpgroup waits for its own product before the next step, since ptxas may reuse the A registers of a product
  still in flight. The two warpgroups run unsynchronized, so one's dequantization overlaps the other's product.

No bf16 W tile is written to shared memory, so shared memory carries only x, the packed words and the products'
reads of x. (quant/README.md, "A warp-specialized prefill GEMM": a W tile dequantized by producer warps into
shared memory kept the tensor cores 54% busy, ncu, against cuBLAS's 92%.)

Dequantization, a pair of weights at a time: codes i and i + 16 // bits of a word sit at the same bit of the word's
two halves. Shifted below bit 7, masked in place and or'd into bf16 128.0's bits (one LOP3), each half reads
128 + q * 2^p exactly. Two packed bf16 FMAs: less 128 + C * 2^p (C = 2^(bits-1), the codes' middle) leaves
(q - C) * 2^p exactly; times bf16(scale) * 2^-p plus bf16((C - zero) * scale), rounded once to bf16. The scale
and the offset are rounded to bf16 first. Centring on C keeps both terms small, and with them that rounding
(quant/README.md measures it against quant.packing.dequantize). A register holds weights i and i + 16 // bits,
so x's columns are permuted to match within each 64-column step (`step_order`, `interleave`). For down, the
permutation is fused with silu(gate) * up.
SPLIT > 1 splits K between programs (float32 partial sums, added on the host side), for matrices with few tiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quant import triton_kernels as tk
from quant.packing import PackedMatrix

try:
    import triton
    import triton.language as tl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from quant.triton_kernels import _act_row, _exp2_neg

    HAVE_GLUON = True
except ImportError:  # an older Triton, or none
    HAVE_GLUON = False

BLOCK_K = 64  # columns of K per step: one 128-byte swizzled row of bf16 x
BLOCK_W = 128  # W rows per tile: two MMA warpgroups of 64
BLOCK_X = 256  # x rows per tile (the default; the wgmma's N)
BF16X2_128 = 0x43004300  # bf16 128.0 in both halves: or'd with a code below bit 7 it reads 128 + the code
BF16X2_ONE = 0x3F803F80


def available(device: torch.device) -> bool:
    """A Hopper GPU (compute capability 9.x) and a Triton with Gluon's wgmma."""
    return (HAVE_GLUON and device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] == 9)


def fits(bits: int, group: int, n: int, k: int, split: int = 1) -> bool:
    """Shapes the kernel takes (any number n of W rows): 2 or 4 bits, each split of K in whole 64-column steps,
    groups a power of two from 16 (a thread's 16 columns of a step lie in one group). TMA also needs 16-byte
    rows of words (`tma_ready`)."""
    part = k // split
    return (bits in (2, 4) and k % split == 0 and part % BLOCK_K == 0 and part % group == 0
            and group & (group - 1) == 0 and group >= 16)


def tma_ready(w: PackedMatrix) -> bool:
    """TMA reads the words: a 16-byte aligned start and row stride, contiguous rows."""
    c = w.codes
    return c.data_ptr() % 16 == 0 and c.stride(0) * c.element_size() % 16 == 0 and c.stride(1) == 1


def step_order(bits: int) -> list[int]:
    """order[pos]: the column, within a 64-column step, whose x goes at position pos. The wgmma A fragment gives
    thread c (of four sharing a row) positions 16 b + 8 s + 2 c + hh of each step; its 16 columns are 16 c on, in
    one (4 bits: two) words, and position (b, s, hh) holds code i + hh * 16 // bits of its word, i = 2 b + s (4 bits:
    word b // 2, i = 2 (b % 2) + s)."""
    half = 16 // bits
    order = []
    for pos in range(BLOCK_K):
        b, s, c, hh = pos // 16, (pos // 8) % 2, (pos // 2) % 4, pos % 2
        if bits == 4:
            order.append(16 * c + 8 * (b // 2) + 2 * (b % 2) + s + half * hh)
        else:
            order.append(16 * c + 2 * b + s + half * hh)
    return order


def interleave(x: torch.Tensor, bits: int, act: bool = False) -> torch.Tensor:
    """x's columns in `step_order` within each 64-column step. act: x = h = [gate | up] and the result is
    silu(gate) * up's (computed in float32), so down's input is written once, already in that order."""
    k = x.shape[1] // 2 if act else x.shape[1]
    if not x.is_cuda:  # the reference, for CPU tests
        v = F.silu(x[:, :k].float()) * x[:, k:].float() if act else x
        order = torch.tensor(step_order(bits), device=x.device)
        return v.reshape(x.shape[0], -1, BLOCK_K)[:, :, order].reshape(x.shape[0], k).to(x.dtype)
    x = x.contiguous()
    out = torch.empty((x.shape[0], k), device=x.device, dtype=x.dtype)
    block = 1024
    _interleave_kernel[(_cdiv(k, block), x.shape[0])](x, out, k, x.stride(0), out.stride(0), ACT=act, BITS=bits,
                                                      BLOCK=block)
    return out


if HAVE_GLUON:
    _BK = gl.constexpr(BLOCK_K)
    _PART0 = gl.constexpr(0)
    _PART1 = gl.constexpr(1)

    @triton.jit
    def _interleave_kernel(src, dst, K, stride_s, stride_d, ACT: tl.constexpr, BITS: tl.constexpr,
                           BLOCK: tl.constexpr):
        """dst[row, step + pos] = v[row, step + j] with step_order[pos] = j; v = src, or silu(src[:, :K]) *
        src[:, K:] in float32 (ACT)."""
        row = tl.program_id(1)
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = n < K
        v = _act_row(src + row * stride_s, n, ok, K, ACT)
        j = n % 64
        c = j // 16
        if BITS == 4:
            pos = 16 * (2 * ((j // 8) % 2) + (j // 2) % 2) + 8 * (j % 2) + 2 * c + (j // 4) % 2
        else:
            pos = 16 * ((j // 2) % 4) + 8 * (j % 2) + 2 * c + (j // 8) % 2
        tl.store(dst + row * stride_d + n - j + pos, v.to(dst.dtype.element_ty), mask=ok)

    @gluon.constexpr_function
    def _l4(BITS, ROWS, WARPS):  # noqa: ANN001, ANN202, N803 - constexpr arguments
        """A warpgroup's step as [rows, c, words of c, pairs of a word], as the wgmma A fragment spreads it: lanes
        4 r + c, a thread rows r and r + 8 of its warp's 16, c its quarter of each 16 columns."""
        wpt = 2 if BITS == 4 else 1
        pairs = 16 // BITS
        regs = [[0, 0, 1, 0]] if wpt == 2 else []
        regs += [[0, 0, 0, 1 << j] for j in range(pairs.bit_length() - 1)] + [[8, 0, 0, 0]]
        lanes = [[0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]]
        warps = [[16 << j, 0, 0, 0] for j in range(WARPS.bit_length() - 1)]
        return gl.DistributedLinearLayout(regs, lanes, warps, [], [ROWS, 4, wpt, pairs])

    @gluon.constexpr_function
    def _words_layout(BITS, ROWS, WARPS):  # noqa: ANN001, ANN202, N803 - constexpr arguments
        """The step's words [rows, 4 * words of c] as `_l4` holds them."""
        wpt = 2 if BITS == 4 else 1
        regs = ([[0, 1]] if wpt == 2 else []) + [[8, 0]]
        lanes = [[0, wpt], [0, 2 * wpt], [1, 0], [2, 0], [4, 0]]
        warps = [[16 << j, 0] for j in range(WARPS.bit_length() - 1)]
        return gl.DistributedLinearLayout(regs, lanes, warps, [], [ROWS, 4 * wpt])

    @gluon.jit
    def _bf16x2(v):
        """int32 holding bf16(v) in both halves."""
        h = v.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return h | (h << 16)

    @gluon.jit
    def _load_sz(p_ptr, rows, rows_ok, c, k0, stride, GROUP: gl.constexpr):
        """The float16 scales (or zeros) of each thread's group in step k0, columns k0 + 16 c on, in float32."""
        ok = rows_ok[:, None] & (c >= 0)[None, :]
        v = gl.load(p_ptr + rows[:, None] * stride + ((k0 + 16 * c) // GROUP)[None, :], mask=ok, other=0.0)
        return v.to(gl.float32)

    @gluon.jit
    def _a_tile(words, sc, zero, magic, one, BITS: gl.constexpr, L4: gl.constexpr, A_LAYOUT: gl.constexpr):
        """bf16 [rows, 64] in the wgmma A layout from words [rows, 4, WPT, 1] and sc, zero [rows, 4, 1, 1] in L4
        (the module docstring says how)."""
        PAIRS: gl.constexpr = 16 // BITS
        WPT: gl.constexpr = L4.shape[2]
        ROWS: gl.constexpr = L4.shape[0]
        IN_PLACE: gl.constexpr = (7 - BITS) // BITS + 1  # codes of a half word that fit below bf16's exponent
        C: gl.constexpr = 1 << (BITS - 1)
        i = gl.arange(0, PAIRS, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))[None, None, None, :]
        p = BITS * (i % IN_PLACE)
        mask = ((1 << BITS) - 1) << p
        q = ((words >> (BITS * IN_PLACE * (i // IN_PLACE))) & (mask | (mask << 16))) | magic
        less = 0xC300 | (C << p)  # bf16 -(128 + C * 2^p): C * 2^p < 128 is the mantissa in 128's binade
        w = gl.inline_asm_elementwise(
            "{ .reg .b32 t; fma.rn.bf16x2 t, $1, $4, $5; fma.rn.bf16x2 $0, t, $2, $3; }", "=r,r,r,r,r,r",
            [q, _bf16x2(sc * _exp2_neg(p)), _bf16x2((C - zero) * sc), one, less | (less << 16)], dtype=gl.int32,
            is_pure=True, pack=1)
        lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [w],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        a = gl.reshape(gl.join(lo, hi), [ROWS, 4, WPT, PAIRS // 2, 2, 2])  # rows, c, word, b, s, hh
        a = gl.reshape(gl.permute(a, (0, 2, 3, 4, 1, 5)), [ROWS, 64])  # position 16 (word, b) + 8 s + 2 c + hh
        return gl.convert_layout(a, A_LAYOUT, assert_trivial=True)

    @gluon.jit
    def _loader(x_desc, codes_desc, x_smem, raw_smem, x_ready, raw_ready, empty, k_begin, k_end, off_x, off_w,
                BITS: gl.constexpr):
        """The loader warp: each step's x tile and W words by TMA, into a slot both warpgroups have freed."""
        S: gl.constexpr = x_smem.type.shape[0]
        for i in range((k_end - k_begin) // _BK):
            s = i % S
            k0 = k_begin + i * _BK
            mbarrier.wait(empty.index(s), ((i // S) & 1) ^ 1)
            mbarrier.expect(raw_ready.index(s), codes_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(codes_desc, [off_w, k0 // (32 // BITS)], raw_ready.index(s),
                                            raw_smem.index(s))
            mbarrier.expect(x_ready.index(s), x_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [off_x, k0], x_ready.index(s), x_smem.index(s))

    @gluon.jit
    def _mma(x_smem, raw_smem, x_ready, raw_ready, empty, s_ptr, z_ptr, y_ptr, M, N, k_begin, k_end, stride_p,
             stride_ym, off_x, off_w, magic, one, PART: gl.constexpr, BITS: gl.constexpr, GROUP: gl.constexpr,
             BLOCK_X: gl.constexpr, WARPS: gl.constexpr):
        """One MMA warpgroup: W rows off_w + 64 PART on, dequantized into the A registers step by step; its part
        of y (or of split's float32 partial) stored at the end."""
        S: gl.constexpr = x_smem.type.shape[0]
        ROWS: gl.constexpr = 16 * WARPS
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_X, 16])
        A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        L4: gl.constexpr = _l4(BITS, ROWS, WARPS)
        WPT: gl.constexpr = L4.shape[2]
        SZ: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, L4))
        row0 = off_w + PART * ROWS
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, SZ))
        rows_ok = rows < N
        c = gl.arange(0, 4, layout=gl.SliceLayout(0, SZ))
        s0 = _load_sz(s_ptr, rows, rows_ok, c, k_begin, stride_p, GROUP)  # scales and zeros two steps ahead
        z0 = _load_sz(z_ptr, rows, rows_ok, c, k_begin, stride_p, GROUP)
        s1 = _load_sz(s_ptr, rows, rows_ok, c, k_begin + _BK, stride_p, GROUP)
        z1 = _load_sz(z_ptr, rows, rows_ok, c, k_begin + _BK, stride_p, GROUP)
        acc = gl.zeros([ROWS, BLOCK_X], gl.float32, layout=ACC)
        for i in range((k_end - k_begin) // _BK):
            s = i % S
            k0 = k_begin + i * _BK
            mbarrier.wait(raw_ready.index(s), (i // S) & 1)
            words = raw_smem.index(s).slice(PART * ROWS, ROWS, dim=0).load(_words_layout(BITS, ROWS, WARPS))
            words = gl.convert_layout(gl.reshape(words, [ROWS, 4, WPT]), gl.SliceLayout(3, L4), assert_trivial=True)
            a = _a_tile(words[:, :, :, None], s0[:, :, None, None], z0[:, :, None, None], magic, one, BITS, L4,
                        A_LAYOUT)
            s0, z0 = s1, z1
            s1 = _load_sz(s_ptr, rows, rows_ok, c, k0 + 2 * _BK, stride_p, GROUP)
            z1 = _load_sz(z_ptr, rows, rows_ok, c, k0 + 2 * _BK, stride_p, GROUP)
            mbarrier.wait(x_ready.index(s), (i // S) & 1)
            acc = warpgroup_mma(a, x_smem.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            gl.thread_barrier()  # every warp of the group is done with the slot, before the one arrive
            mbarrier.arrive(empty.index(s), count=1)
        n_out = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ACC))
        m_out = off_x + gl.arange(0, BLOCK_X, layout=gl.SliceLayout(0, ACC))
        out = y_ptr + gl.program_id(1) * M * stride_ym + m_out[None, :] * stride_ym + n_out[:, None]
        gl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(n_out < N)[:, None] & (m_out < M)[None, :])

    @gluon.jit
    def _ws_gemm_kernel(
        x_desc, codes_desc, s_ptr, z_ptr, y_ptr, M, N, K, stride_p, stride_ym, magic, one,
        BITS: gl.constexpr, GROUP: gl.constexpr, BLOCK_X: gl.constexpr, S: gl.constexpr, SPLIT: gl.constexpr,
        MMA_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Program (tile, split): y[off_x:, off_w:] (or split's float32 partial) = x @ W.T over its part of K; W
        tiles of 2 x 16 num_warps rows (one per MMA warpgroup)."""
        BLOCK_W: gl.constexpr = 32 * num_warps
        pid = gl.program_id(0)
        x_tiles = gl.cdiv(M, BLOCK_X)
        off_x = (pid % x_tiles) * BLOCK_X  # the programs of one W tile run side by side: W comes from HBM once
        off_w = (pid // x_tiles) * BLOCK_W
        part = K // SPLIT
        k_begin = gl.program_id(1) * part
        k_end = k_begin + part
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [S, BLOCK_X, _BK], x_desc.layout)
        raw_smem = gl.allocate_shared_memory(gl.int32, [S] + codes_desc.block_type.shape, codes_desc.layout)
        x_ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        raw_ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(x_ready.index(i), count=1)
            mbarrier.init(raw_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrive per MMA warpgroup
        gl.warp_specialize([
            (_mma, (x_smem, raw_smem, x_ready, raw_ready, empty, s_ptr, z_ptr, y_ptr, M, N, k_begin, k_end,
                    stride_p, stride_ym, off_x, off_w, magic, one, _PART0, BITS, GROUP, BLOCK_X, num_warps)),
            (_mma, (x_smem, raw_smem, x_ready, raw_ready, empty, s_ptr, z_ptr, y_ptr, M, N, k_begin, k_end,
                    stride_p, stride_ym, off_x, off_w, magic, one, _PART1, BITS, GROUP, BLOCK_X, num_warps)),
            (_loader, (x_desc, codes_desc, x_smem, raw_smem, x_ready, raw_ready, empty, k_begin, k_end, off_x,
                       off_w, BITS)),
        ], [num_warps, 1], [MMA_REGS, LOADER_REGS])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _desc(t: torch.Tensor, block: list[int], dtype):  # noqa: ANN001, ANN202 - a Gluon dtype and descriptor
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def gemm(x: torch.Tensor, w: PackedMatrix, split: int = 1, block_x: int = BLOCK_X, stages: int = 5,
         interleaved: bool = False, mma_regs: int = 232, loader_regs: int = 40) -> torch.Tensor:
    """x [M, K] bf16 @ W.T -> [M, N] bf16 (Hopper only: `available`), W tiles of BLOCK_W rows. The defaults are the
    H100's best for Mixtral's matrices at 512 rows (quant/README.md); `split` parts of K are summed in float32.
    `interleaved`: x's columns are already in `step_order` for W's bits (`interleave`)."""
    n, k = w.shape
    if x.dtype != torch.bfloat16 or not fits(w.bits, w.group_size, n, k, split):
        raise ValueError(f"the wgmma GEMM takes bf16 x, 2- or 4-bit W, and K in whole {BLOCK_K}-column steps of "
                         f"whole groups per split (got {x.dtype}, K={k}, split {split}, {w.bits}-bit groups of "
                         f"{w.group_size})")
    if not tma_ready(w):
        raise ValueError("the wgmma GEMM reads W by TMA: its words need 16-byte aligned rows")
    x = x.contiguous() if interleaved else interleave(x, w.bits)
    rows = x.shape[0]
    y = torch.empty((split, rows, n) if split > 1 else (rows, n), device=x.device,
                    dtype=torch.float32 if split > 1 else x.dtype)
    x_desc = _desc(x, [block_x, BLOCK_K], gl.bfloat16)
    codes_desc = _desc(w.codes, [BLOCK_W, BLOCK_K // (32 // w.bits)], gl.int32)
    grid = (_cdiv(rows, block_x) * _cdiv(n, BLOCK_W), split)
    _ws_gemm_kernel[grid](x_desc, codes_desc, w.scale, w.zero, y, rows, n, k, w.scale.stride(0), n, BF16X2_128,
                          BF16X2_ONE, BITS=w.bits, GROUP=w.group_size, BLOCK_X=block_x, S=stages, SPLIT=split,
                          MMA_REGS=mma_regs, LOADER_REGS=loader_regs, num_warps=BLOCK_W // 32)
    return y.sum(0, dtype=torch.float32).to(x.dtype) if split > 1 else y


def usable(x: torch.Tensor, *matrices: PackedMatrix) -> bool:
    """Whether `expert_ffn` takes these: bf16 rows on a Hopper GPU, every matrix fits and reads by TMA."""
    return (x.dtype == torch.bfloat16 and available(x.device)
            and all(fits(m.bits, m.group_size, *m.shape) and tma_ready(m) for m in matrices))


def down_split(rows: int, n: int, k: int, bits: int, group: int, sms: int) -> int:
    """Split K in two where the tiles would leave more than a quarter of the multiprocessors idle (Mixtral's down
    at 512 rows: 64 tiles on 132 SMs) and the halves hold whole steps and groups."""
    tiles = _cdiv(rows, BLOCK_X) * _cdiv(n, BLOCK_W)
    return 2 if tiles < 0.75 * sms and fits(bits, group, n, k, 2) else 1


def expert_ffn(x: torch.Tensor, gate_up: PackedMatrix, down: PackedMatrix) -> torch.Tensor:
    """down(silu(gate x) * up x) for many rows of x by the warp-specialized GEMM (`usable` says when)."""
    inter = down.shape[1]
    h = gemm(x, gate_up)
    split = down_split(x.shape[0], down.shape[0], inter, down.bits, down.group_size, tk._sm_count(x.device))
    return gemm(interleave(h, down.bits, act=True), down, split=split, interleaved=True)
