"""Vector code numba's loops do not get on their own, written as LLVM IR (numba intrinsics).

`plane_dot(bits)`: for a row of packed codes (int32 words, `32 // bits` codes a word, code j of a word in bits
[bits * j, bits * (j + 1))) and one token's input in scaled plane order (xp [cpw, words] float32: xp[j, w] is the
input that multiplies code j of word w, times plane_scale(bits, j)), part[w] = sum_j code_j(w) * x_j(w) for the
first `blocks * LANES` words. Each block of LANES words is one vector, loaded once; each plane's codes are masked
in place (code * 2^(bits j), which the scaled input undoes exactly, a power of two) or shifted down and masked,
widened to float in registers and multiplied into one accumulator, which is stored once. numba's own loop over the
planes keeps the accumulator in memory (a load and a store per plane and word), and its loop over words with the
planes unrolled is not vectorized. The products and their order are those of that loop. A Qwen3-30B-A3B expert's
gate_up (1536x2048, INT4 g64) on one core of a 2-core Xeon box, weights in cache: 183 to 213 us against 320 for numba's
loop (16.6 against 9.8 billion multiply-adds a second).
"""

from __future__ import annotations

import functools

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

PREFETCH = 2048  # bytes ahead of the words in use that are asked for (llvm.prefetch): a row or two of codes
LANES = 16  # words a vector: 512 bits of codes, or two 256-bit halves where the target prefers those


def in_place(bits: int) -> bool:
    """Whether codes are masked in place (INT4, INT8: one op a plane less than shifting each down); with 16 planes
    (INT2) the 15 masks cost more registers than the shifts they save (measured: 30% slower)."""
    return 32 // bits <= 8


def plane_scale(bits: int, j: int) -> float:
    """The factor of plane j of the input: 2^-(bits j) where codes stay in place, except the top plane, whose
    codes are shifted down; 1 where every plane's codes are shifted down."""
    return 2.0 ** (-bits * j) if in_place(bits) and j < 32 // bits - 1 else 1.0


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
                acc = None
                for j in range(cpw):
                    if j == cpw - 1:  # the top code: shifted down (in place it would need the sign bit)
                        q = builder.lshr(w, ir.Constant(vi, [bits * j] * LANES))
                    elif in_place(bits):  # the code in place, q * 2^(bits j)
                        q = builder.and_(w, ir.Constant(vi, [mask << (bits * j)] * LANES))
                    else:
                        q = builder.and_(builder.lshr(w, ir.Constant(vi, [bits * j] * LANES)),
                                         ir.Constant(vi, [mask] * LANES))
                    qf = builder.sitofp(q, vf)
                    x = builder.load(builder.bitcast(builder.gep(planes[j], [first]), vf.as_pointer()), align=4)
                    product = builder.fmul(qf, x, flags=["fast"])
                    acc = product if acc is None else builder.fadd(acc, product, flags=["fast"])
                builder.store(acc, builder.bitcast(builder.gep(out, [first]), vf.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel
