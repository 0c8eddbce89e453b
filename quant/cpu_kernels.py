"""Multi-threaded CPU products of many experts' matrices at once, read straight from the host tier's buffers.

Compiled with numba (LLVM, no C compiler needed; the kernels are cached on disk after the first compile), because
no library kernel reads fate's packed format in float32: torch's `_weight_int4pack_mm_for_cpu` is vectorized
only for bfloat16 activations (with bfloat16 scales and its own zero convention) and runs a scalar loop for
float32, `_weight_int8pack_mm` has one scale per row (no groups), bitsandbytes' 4-bit CPU path reads NF4/FP4
(symmetric, no zero point), and ggml's Q4_1 blocks hold 32 weights with a float16 min; each would need a second
copy of every expert in its own layout (quant/README.md has the measurements).

`_quantized_kernel(bits, group)`: for E experts (rows of one uint8 arena [R, nbytes], all of one layout) and T
tokens, out[e, t, n] = sum_g scale[n, g] * (sum_{c in g} q[n, c] x[t, c] - zero[n, g] * sum_{c in g} x[t, c]):
the reference's (q - zero) * scale product regrouped, in float32, so it equals dequantize-then-matmul within
float32 rounding. x arrives in scaled "plane" order (plane j holds the columns word * cpw + j, times a power of
two: `plane_scale`) so that a row's words and x are read contiguously, a vector of words at a time, every
plane's products summed in registers (`plane_dot`); one kernel per (bits, group) so that a group's words are
a constant count. One parallel loop over (expert, block of rows): no Python per expert, no sum split across
threads (the result does not depend on the thread count). Tokens an expert does not serve (active[e, t] == 0) are
skipped and their rows left as given. `quantized_moe` runs a whole FFN and the weighted sum in one compiled call.

`dense(...)`: the same for a 16-bit tier (bfloat16 or float16 weights widened to float32 exactly, row by row).
"""

from __future__ import annotations

import functools

import numpy as np

try:  # numba is a dependency; without it (a broken install) cpu_experts falls back to its reference
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

# ---- the vector pass, as LLVM IR (in this file: numba's on-disk cache of the kernels that inline it is keyed on
# this file alone, so a change here must change this file)
#
# `plane_dot(bits)`: for a row of packed codes (int32 words, `32 // bits` codes a word, code j of a word in bits
# [bits * j, bits * (j + 1))) and one token's input in scaled plane order (xp [cpw, words] float32: xp[j, w] is the
# input that multiplies code j of word w, times plane_scale(bits, j)), part[w] = sum_j code_j(w) * x_j(w) for the
# first `blocks * LANES` words. Each block of LANES words is one vector, loaded once; each plane's codes are masked
# in place (code * 2^(bits j), which the scaled input undoes exactly, a power of two; INT2 within each half word),
# widened to float in registers and multiplied into one accumulator, which is stored once. numba's own loop over the
# planes keeps the accumulator in memory (a load and a store per plane and word), and its loop over words with the
# planes unrolled is not vectorized. The products and their order are those of that loop. A Qwen3-30B-A3B
# expert's gate_up (1536x2048, INT4 g64) on one core of a 2-core Xeon box, weights in cache: 183 to 213 us against
# 320 for numba's loop (16.6 against 9.8 billion multiply-adds a second).
PREFETCH = 2048  # bytes ahead of the words in use that are asked for (llvm.prefetch): a row or two of codes
LANES = 16  # words a vector: 512 bits of codes, or two 256-bit halves where the target prefers those


def in_place(bits: int) -> bool:
    """Whether codes are masked in place, q * 2^(bits j) (INT4, INT8: one op a plane less than shifting each down);
    INT2's 16 planes are masked in place within each 16-bit half of the word instead (8 masks, not 15)."""
    return 32 // bits <= 8


def plane_scale(bits: int, j: int) -> float:
    """The factor of plane j of the input: the inverse of the power of two its codes are masked at (in place: 2^(bits
    j), except the top plane, whose codes are shifted down; in halves: 2^(bits (j mod codes a half)))."""
    cpw = 32 // bits
    if in_place(bits):
        return 2.0 ** (-bits * j) if j < cpw - 1 else 1.0
    return 2.0 ** (-bits * (j % (cpw // 2)))


@functools.cache
def plane_dot(bits: int):  # noqa: ANN201 - a numba intrinsic per code width
    cpw, mask = 32 // bits, (1 << bits) - 1

    @intrinsic
    def kernel(typingctx, codes, xp, part, blocks):  # noqa: ANN001, ANN202, ARG001
        sig = types.void(codes, xp, part, blocks)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            codes_a = context.make_array(sig.args[0])(context, builder, args[0])
            xp_a = context.make_array(sig.args[1])(context, builder, args[1])
            part_a = context.make_array(sig.args[2])(context, builder, args[2])
            i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
            vi, vf = ir.VectorType(i32, LANES), ir.VectorType(f32, LANES)
            plane_bytes = cgutils.unpack_tuple(builder, xp_a.strides)[0]
            words = builder.bitcast(codes_a.data, i32.as_pointer())
            x_base = builder.bitcast(xp_a.data, i8.as_pointer())
            planes = [builder.bitcast(builder.gep(x_base, [builder.mul(ir.Constant(plane_bytes.type, j), plane_bytes)]),
                                      f32.as_pointer()) for j in range(cpw)]
            out = builder.bitcast(part_a.data, f32.as_pointer())
            with cgutils.for_range(builder, args[3]) as loop:
                first = builder.mul(loop.index, ir.Constant(loop.index.type, LANES))
                here = builder.gep(words, [first])
                if PREFETCH:  # the next rows' words: their read from RAM starts before they are needed (a hint,
                    # which never faults past the buffer's end)
                    ahead = builder.gep(builder.bitcast(here, i8.as_pointer()), [ir.Constant(ir.IntType(64), PREFETCH)])
                    fnty = ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32])
                    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
                    builder.call(fn, [ahead, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
                w = builder.load(builder.bitcast(here, vi.as_pointer()), align=4)
                upper = None if in_place(bits) else builder.lshr(w, ir.Constant(vi, [16] * LANES))
                acc = None
                for j in range(cpw):
                    if in_place(bits):
                        if j == cpw - 1:  # the top code: shifted down (in place it would need the sign bit)
                            q = builder.lshr(w, ir.Constant(vi, [bits * j] * LANES))
                        else:  # the code in place, q * 2^(bits j)
                            q = builder.and_(w, ir.Constant(vi, [mask << (bits * j)] * LANES))
                    else:  # in its half, in place
                        k = j % (cpw // 2)
                        q = builder.and_(w if j < cpw // 2 else upper, ir.Constant(vi, [mask << (bits * k)] * LANES))
                    qf = builder.sitofp(q, vf)
                    x = builder.load(builder.bitcast(builder.gep(planes[j], [first]), vf.as_pointer()), align=4)
                    product = builder.fmul(qf, x, flags=["fast"])
                    acc = product if acc is None else builder.fadd(acc, product, flags=["fast"])
                builder.store(acc, builder.bitcast(builder.gep(out, [first]), vf.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


ROWS_PER_TASK = 64  # rows of a matrix per parallel task: its scratch and scheduling stay small beside its work


def available() -> bool:
    return numba is not None


_threads: int | None = None  # what `configure_threads` set (None: every thread numba has)

# Multiply-adds of a call below which it runs on one thread: about a tenth of a millisecond of one core's work,
# where a barrier on a busy machine costs more than the threads gain (fate_cli/model/threads.py says why). A
# Qwen3-30B-A3B expert is 4.7M multiply-adds a token; the bundled model's 31K.
SMALL_CALL_MACS = 1 << 22


def configure_threads(n: int | None) -> int | None:
    """The threads the kernels use for calls large enough to spread (fate's --threads, --cpu-threads; None: all
    of numba's); -> the count configured before."""
    global _threads
    before, _threads = _threads, (None if n is None else max(1, min(int(n), max_threads())))
    return before


def threads_for(macs: int) -> int:
    return 1 if macs < SMALL_CALL_MACS else configured_threads()


def configured_threads() -> int:
    """The threads a call large enough to spread uses (`configure_threads`' count, else all of numba's)."""
    return _threads or max_threads()


def set_threads(n: int) -> int:
    """Threads the kernels use from this thread on (numba's setting is per calling thread); -> that number."""
    n = max(1, min(int(n), max_threads()))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


def max_threads() -> int:
    return numba.config.NUMBA_NUM_THREADS if numba is not None else 1


if numba is not None:

    @njit(inline="always")
    def _widen_half_exact(src, dst_bits):  # noqa: ANN001, ANN202 - float16 bits -> float32, every value exactly
        subnormal = False
        for k in range(src.shape[0]):  # the exponent rebiased (15 -> 127), the mantissa moved up 13 bits
            h = np.uint32(src[k])
            mag = h & 0x7FFF
            b = (h & 0x8000) << 16
            if mag >= 0x7C00:  # inf, nan
                b |= 0x7F800000 | ((mag & 0x3FF) << 13)
            elif mag >= 0x400:
                b |= (mag << 13) + (112 << 23)
            elif mag != 0:
                subnormal = True
            dst_bits[k] = b
        if subnormal:  # m * 2^-24, made by arithmetic: no float32 denormal to be flushed on the way
            dst = dst_bits.view(np.float32)
            for k in range(src.shape[0]):
                h = np.uint32(src[k])
                if (h & 0x7C00) == 0 and (h & 0x3FF) != 0:
                    v = np.float32(h & 0x3FF) * np.float32(2.0**-24)
                    dst[k] = -v if h & 0x8000 else v

    @njit(inline="always")
    def _widen_half(src, dst_bits):  # noqa: ANN001, ANN202 - the same, branch-free for normal numbers
        rare = False
        for k in range(src.shape[0]):
            h = np.uint32(src[k])
            mag = h & np.uint32(0x7FFF)
            dst_bits[k] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((mag << np.uint32(13)) + np.uint32(112 << 23))
            rare |= (mag < np.uint32(0x400)) | (mag >= np.uint32(0x7C00))
        if rare:  # zero, subnormal, inf or nan among them
            _widen_half_exact(src, dst_bits)


@functools.cache
def _quantized_kernel(bits: int, gs: int):  # noqa: ANN202 - a numba dispatcher per tier: constant shifts, group
    cpw = 32 // bits
    mask = (1 << bits) - 1
    wpg = gs // cpw  # words per group
    dot = plane_dot(bits)
    masked = in_place(bits)
    half = cpw // 2  # codes a 16-bit half (INT2's planes)

    @njit(parallel=True, fastmath=True, cache=True)
    def kernel(arena, rows, xsel, off_c, off_s, off_z, n_out, k_in, xp, xs, active, out):  # noqa: ANN001, ANN202
        words = (k_in + cpw - 1) // cpw
        vectors = words // LANES  # whole vectors of words a row (plane_dot)
        groups = (k_in + gs - 1) // gs
        n_exp = rows.shape[0]
        n_tok = xp.shape[1]
        blocks = (n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        for task in prange(n_exp * blocks):
            e = task // blocks
            first = (task % blocks) * ROWS_PER_TASK
            toks = np.empty(n_tok, dtype=np.int64)
            n_act = 0
            for t in range(n_tok):
                if active[e, t] != 0:
                    toks[n_act] = t
                    n_act += 1
            if n_act == 0:
                continue
            buf = arena[rows[e]]
            codes = buf[off_c: off_c + n_out * words * 4].view(np.int32)
            scale = buf[off_s: off_s + n_out * groups * 2].view(np.uint16)
            zero = buf[off_z: off_z + n_out * groups * 2].view(np.uint16)
            xi = xsel[e]
            part = np.zeros((n_act, groups * wpg), dtype=np.float32)  # words past the row's stay zero
            last = min(n_out, first + ROWS_PER_TASK)
            span = (last - first) * groups  # the task's rows' scales and zeros, widened in two calls
            s_bits = np.empty(span, dtype=np.uint32)
            z_bits = np.empty(span, dtype=np.uint32)
            _widen_half(scale[first * groups: last * groups], s_bits)
            _widen_half(zero[first * groups: last * groups], z_bits)
            s_all, z_all = s_bits.view(np.float32), z_bits.view(np.float32)
            for n in range(first, last):
                row = codes[n * words: (n + 1) * words]
                sc = s_all[(n - first) * groups: (n - first + 1) * groups]
                ze = z_all[(n - first) * groups: (n - first + 1) * groups]
                for i in range(n_act):  # each word's planes into one product per word (plane_dot)
                    x = xp[xi, toks[i]]
                    p = part[i]
                    dot(row, x, p, vectors)
                    for w in range(vectors * LANES, words):  # the words past the last whole vector, as plane_dot does
                        c = row[w]
                        acc = np.float32(c & np.int32(mask)) * x[0, w]
                        for j in range(1, cpw):
                            if not masked:  # in its half, in place
                                acc += np.float32((c >> np.int32(16 * (j // half))) & np.int32(
                                    mask << (bits * (j % half)))) * x[j, w]
                            elif j < cpw - 1:
                                acc += np.float32(c & np.int32(mask << (bits * j))) * x[j, w]
                            else:
                                acc += np.float32((c >> np.int32(bits * j)) & np.int32(mask)) * x[j, w]
                        p[w] = acc
                for i in range(n_act):
                    t = toks[i]
                    p = part[i]
                    y = np.float32(0.0)
                    for g in range(groups):
                        s = np.float32(0.0)
                        for k in range(wpg):
                            s += p[g * wpg + k]
                        y += sc[g] * (s - ze[g] * xs[xi, t, g])
                    out[e, t, n] = y

    return kernel


@functools.cache
def _dense_kernel(bfloat16: bool):  # noqa: ANN202
    kind = BF16 if bfloat16 else FP16

    @njit(parallel=True, fastmath=True, cache=True)
    def kernel(arena, rows, xsel, off_w, n_out, k_in, x, active, out):  # noqa: ANN001, ANN202
        n_exp = rows.shape[0]
        n_tok = x.shape[1]
        blocks = (n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        for task in prange(n_exp * blocks):
            e = task // blocks
            first = (task % blocks) * ROWS_PER_TASK
            w16 = arena[rows[e]][off_w: off_w + n_out * k_in * 2].view(np.uint16)
            xi = xsel[e]
            wf = np.empty(k_in, dtype=np.float32)
            for n in range(first, min(n_out, first + ROWS_PER_TASK)):
                _widen16(w16[n * k_in: (n + 1) * k_in], kind, wf)
                for t in range(n_tok):
                    if active[e, t] == 0:
                        continue
                    xr = x[xi, t]
                    acc = np.float32(0.0)
                    for k in range(k_in):
                        acc += wf[k] * xr[k]
                    out[e, t, n] = acc

    return kernel


ACT_SILU, ACT_CLAMPED = 0, 1  # silu(gate) * up; gpt-oss's clamped SwiGLU (quant/expert_act.py)
NO_BIAS, BF16, FP16 = 0, 1, 2  # a 16-bit segment's kind: an expert's biases, or a dense tier's weights


if numba is not None:

    @njit(cache=True)
    def _widen16(src, kind, dst):  # noqa: ANN001, ANN202 - 16-bit values (bfloat16 or float16 bits) -> float32
        bits = dst.view(np.uint32)
        if kind == BF16:  # the upper half of a float32
            for k in range(src.shape[0]):
                bits[k] = np.uint32(src[k]) << np.uint32(16)
        else:
            _widen_half(src, bits)

    @njit(cache=True)
    def _activate(h, inter, act, alpha, limit, active, a):  # noqa: ANN001, ANN202
        """a[e, t] = act(gate, up) of h[e, t] = [gate | up], for the active (expert, token) pairs."""
        for e in range(h.shape[0]):
            for t in range(h.shape[1]):
                if active[e, t] == 0:
                    continue
                for k in range(inter):
                    g = h[e, t, k]
                    u = h[e, t, inter + k]
                    if act == ACT_SILU:
                        a[e, t, k] = g / (np.float32(1.0) + np.exp(-g)) * u
                    else:
                        g = min(g, limit)
                        u = min(max(u, -limit), limit)
                        a[e, t, k] = (u + np.float32(1.0)) * (g / (np.float32(1.0) + np.exp(-g * alpha)))

    @njit(cache=True)
    def _add_bias(arena, rows, offset, kind, n, active, y):  # noqa: ANN001, ANN202
        """y[e, t, :n] += the bias of n 16-bit values at a byte offset of expert e's buffer (active pairs)."""
        b = np.empty(n, dtype=np.float32)
        for e in range(rows.shape[0]):
            _widen16(arena[rows[e]][offset: offset + 2 * n].view(np.uint16), kind, b)
            for t in range(y.shape[1]):
                if active[e, t] != 0:
                    for k in range(n):
                        y[e, t, k] += b[k]


@functools.cache
def _planes_kernel(bits: int, gs: int):  # noqa: ANN202
    cpw = 32 // bits
    scales = np.array([plane_scale(bits, j) for j in range(cpw)], dtype=np.float32)

    @njit(cache=True)
    def planes(x):  # noqa: ANN001, ANN202 - x [X, T, K] -> plane order [X, T, cpw, words] (zero past K), group sums
        n_x, n_tok, k_in = x.shape
        words = (k_in + cpw - 1) // cpw
        groups = (k_in + gs - 1) // gs
        xp = np.zeros((n_x, n_tok, cpw, words), dtype=np.float32)
        xs = np.zeros((n_x, n_tok, groups), dtype=np.float32)
        for i in range(n_x):
            for t in range(n_tok):
                row = x[i, t]
                for j in range(cpw):  # plane by plane: contiguous writes, no division per column
                    plane, scale = xp[i, t, j], scales[j]
                    for w in range(words):
                        c = w * cpw + j
                        if c < k_in:
                            plane[w] = row[c] * scale
                for g in range(groups):
                    s = np.float32(0.0)
                    for c in range(g * gs, min(k_in, (g + 1) * gs)):
                        s += row[c]
                    xs[i, t, g] = s
        return xp, xs

    return planes


@functools.cache
def _ffn_kernel(bits: int, gs: int):  # noqa: ANN202 - one expert FFN pass for a quantized tier, per (bits, group)
    matmul = _quantized_kernel(bits, gs)
    planes = _planes_kernel(bits, gs)

    @njit(cache=True)
    def ffn(arena, rows, gu_c, gu_s, gu_z, d_c, d_s, d_z, gu_bias, d_bias, bias_kind, hidden, inter, x, active,
            act, alpha, limit):  # noqa: ANN001, ANN202
        n_exp, n_tok = rows.shape[0], x.shape[0]
        xp, xs = planes(x.reshape(1, n_tok, hidden))
        h = np.zeros((n_exp, n_tok, 2 * inter), dtype=np.float32)
        matmul(arena, rows, np.zeros(n_exp, dtype=np.int64), gu_c, gu_s, gu_z, 2 * inter, hidden, xp, xs, active, h)
        if bias_kind != NO_BIAS:
            _add_bias(arena, rows, gu_bias, bias_kind, 2 * inter, active, h)
        a = np.zeros((n_exp, n_tok, inter), dtype=np.float32)
        _activate(h, inter, act, alpha, limit, active, a)
        ap, a_s = planes(a)
        y = np.zeros((n_exp, n_tok, hidden), dtype=np.float32)
        matmul(arena, rows, np.arange(n_exp), d_c, d_s, d_z, hidden, inter, ap, a_s, active, y)
        if bias_kind != NO_BIAS:
            _add_bias(arena, rows, d_bias, bias_kind, hidden, active, y)
        return y

    return ffn


if numba is not None:

    @njit(cache=True)
    def _combine(y, w, out):  # noqa: ANN001, ANN202
        """out[t] += w[t, e] * y[e, t] for the pairs of nonzero weight, in the experts' order (the reference's)."""
        for e in range(y.shape[0]):
            for t in range(y.shape[1]):
                wt = w[t, e]
                if wt != 0:
                    for k in range(y.shape[2]):
                        out[t, k] += wt * y[e, t, k]

    @njit(cache=True)
    def _active(w):  # noqa: ANN001, ANN202 - [E, T] uint8: which (expert, token) pairs have a nonzero weight
        active = np.zeros((w.shape[1], w.shape[0]), dtype=np.uint8)
        for t in range(w.shape[0]):
            for e in range(w.shape[1]):
                if w[t, e] != 0:
                    active[e, t] = 1
        return active


@functools.cache
def _moe_kernel(bits: int, gs: int):  # noqa: ANN202 - ffn, then each expert's output weighted into out
    ffn = _ffn_kernel(bits, gs)

    @njit(cache=True)
    def moe(arena, rows, gu_c, gu_s, gu_z, d_c, d_s, d_z, gu_bias, d_bias, bias_kind, hidden, inter, x, w, act,
            alpha, limit, out):  # noqa: ANN001, ANN202
        y = ffn(arena, rows, gu_c, gu_s, gu_z, d_c, d_s, d_z, gu_bias, d_bias, bias_kind, hidden, inter, x,
                _active(w), act, alpha, limit)
        _combine(y, w, out)

    return moe


def quantized_moe(arena: np.ndarray, rows: np.ndarray, gate_up: tuple[int, int, int], down: tuple[int, int, int],
                  biases: tuple[int, int, int], hidden: int, inter: int, bits: int, group_size: int, x: np.ndarray,
                  w: np.ndarray, act: int, alpha: float, limit: float, out: np.ndarray) -> None:
    """out [T, hidden] += sum_e w[:, e] * expert_e(x), expert e being row rows[e] of the arena, x [T, hidden] and
    w [T, E] float32, in one compiled call: the gate_up product, its bias, the activation, the down product and
    its bias for each (expert, token) pair of nonzero weight, then the weighted sum in the experts' order.
    gate_up/down: byte offsets of (codes, scale, zero); biases: (gate_up offset, down offset, BIAS_* kind)."""
    _moe_kernel(bits, group_size)(arena, rows, *gate_up, *down, *biases, hidden, inter, x, w, act,
                                  np.float32(alpha), np.float32(limit), out)


def quantized_ffn(arena: np.ndarray, rows: np.ndarray, gate_up: tuple[int, int, int], down: tuple[int, int, int],
                  biases: tuple[int, int, int], hidden: int, inter: int, bits: int, group_size: int, x: np.ndarray,
                  w: np.ndarray, act: int, alpha: float, limit: float) -> np.ndarray:
    """[E, T, hidden]: quantized_moe's expert outputs before the weighted sum (zero where a weight is zero), for
    a call whose experts lie in several arenas: their outputs are summed together, in the experts' order."""
    return _ffn_kernel(bits, group_size)(arena, rows, *gate_up, *down, *biases, hidden, inter, x, _active(w), act,
                                         np.float32(alpha), np.float32(limit))


def combine(y: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out [T, H] += sum_e w[:, e] * y[e] (y [E, T, H], w [T, E] float32), in the experts' order."""
    _combine(y, w, out)


def dense(arena: np.ndarray, rows: np.ndarray, xsel: np.ndarray, offset: int, n_out: int, k_in: int,
          bfloat16: bool, x: np.ndarray, active: np.ndarray, out: np.ndarray) -> None:
    """out[e, t, :n_out] = W_e x[xsel[e], t] for the 16-bit matrix [n_out, k_in] at a byte offset of arena[rows[e]]."""
    _dense_kernel(bfloat16)(arena, rows, xsel, offset, n_out, k_in, x, active, out)


@functools.cache
def _dequantize_kernel(bits: int):  # noqa: ANN202
    cpw = 32 // bits
    mask = (1 << bits) - 1

    # no fastmath: (q - zero) * scale rounded exactly as the reference rounds it, weight by weight
    @njit(parallel=True, cache=True)
    def kernel(buf, off_c, off_s, off_z, n_out, k_in, gs, out):  # noqa: ANN001, ANN202
        words = (k_in + cpw - 1) // cpw
        wpg = gs // cpw  # words per group (kernel_fits: a group is whole words)
        groups = (k_in + gs - 1) // gs
        codes = buf[off_c: off_c + n_out * words * 4].view(np.int32)
        scale = buf[off_s: off_s + n_out * groups * 2].view(np.uint16)
        zero = buf[off_z: off_z + n_out * groups * 2].view(np.uint16)
        for n in prange(n_out):
            sz_bits = np.empty(2 * groups, dtype=np.uint32)
            sz = sz_bits.view(np.float32)
            _widen_half(scale[n * groups: (n + 1) * groups], sz_bits[:groups])
            _widen_half(zero[n * groups: (n + 1) * groups], sz_bits[groups:])
            row = codes[n * words: (n + 1) * words]
            dst = out[n]
            for g in range(groups):  # a group's scale and zero once, then its words' codes in column order
                s, z = sz[g], sz[groups + g]
                for w in range(g * wpg, min(words, (g + 1) * wpg)):
                    word = row[w]
                    base = w * cpw
                    if base + cpw <= k_in:
                        for j in range(cpw):
                            dst[base + j] = (np.float32((word >> np.int32(bits * j)) & np.int32(mask)) - z) * s
                    else:  # the row's last word, partly past its columns
                        for j in range(k_in - base):
                            dst[base + j] = (np.float32((word >> np.int32(bits * j)) & np.int32(mask)) - z) * s

    return kernel


def dequantize(buf: np.ndarray, offsets: tuple[int, int, int], n_out: int, k_in: int, bits: int, group_size: int,
               out: np.ndarray) -> None:
    """out [n_out, k_in] float32 = (q - zero) * scale of the quantized matrix at byte offsets (codes, scale, zero)
    of one expert's buffer: bitwise quant.packing.dequantize's float32 result, multi-threaded over rows."""
    _dequantize_kernel(bits)(buf, *offsets, n_out, k_in, group_size, out)
