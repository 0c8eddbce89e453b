"""What our Triton kernels compile to on an H100, read without a GPU: registers, spills, and instruction counts.

    python3 benchmarks/sass_stats.py [--kernel gemv|direct|gemm|moe] [--bits 4] [--group 64] [--block-n 8]
                                  [--block-k 2048] [--warps 8] [--act] [--block-m 128] [--swap] [--ops 16]

Compiles one kernel of quant/triton_kernels.py or quant/moe_kernels.py for sm_90 with Triton's own ptxas
(triton.compile with a GPUTarget: no device needed), disassembles it with the cuobjdump in Triton's wheel, and
prints registers, stack (spills), shared memory, the count of every instruction, and the memory operations
(global loads by width, shared-memory stores/loads and barriers: layout conversions). Pointers and integer
arguments are marked divisible by 16, as Triton specializes them at launch for the published expert shapes.
Counts are static (one pass through the unrolled loop body), a guide to compare variants before timing them:
this is how the GEMV's per-plane input conversions and the 132 scalar loads of its INT2 tile were found.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path


def compile_kernel(fn, signature: dict[str, str], constexprs: dict, warps: int, stages: int = 3):  # noqa: ANN001, ANN201
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if signature[name] != "constexpr"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def sass_report(kernel, top: int) -> str:  # noqa: ANN001
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
    usage = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", res)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1)] += 1
    memory = {op: c for op, c in ops.items() if op.split(".")[0] in ("LDG", "STG", "LDS", "STS", "LDSM", "BAR",
                                                                       "SHFL", "LDGSTS", "RED", "ATOMG")}
    regs, stack, _ = usage.groups() if usage else ("?", "?", "?")
    shared = kernel.metadata.shared  # Triton's dynamic shared memory (the cubin's static figure is a stub)
    lines = [f"registers {regs}, stack {stack} B, shared {shared} B, instructions {sum(ops.values())}",
             "memory: " + ", ".join(f"{op} {c}" for op, c in sorted(memory.items())),
             "most used: " + ", ".join(f"{op} {c}" for op, c in ops.most_common(top))]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", choices=("gemv", "direct", "gemm", "moe"), default="gemv")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--block-n", type=int, default=8)
    ap.add_argument("--block-k", type=int, default=2048)
    ap.add_argument("--block-m", type=int, default=128, help="gemm: rows of x per tile")
    ap.add_argument("--swap", action="store_true", help="gemm: W tile as the wide operand")
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--act", action="store_true", help="direct/moe: the down pass (silu(gate) * up input)")
    ap.add_argument("--even", action="store_true", help="gemv/direct: tiles that fit K and N (no masks)")
    ap.add_argument("--ops", type=int, default=16, help="how many of the most used instructions to list")
    a = ap.parse_args()
    from quant import moe_kernels as mk
    from quant import triton_kernels as tk

    i32, ce = "i32", "constexpr"
    packed = {"w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16"}
    if a.kernel == "gemv":
        sig = {"xp_ptr": "*fp32", "xs_ptr": "*fp32", **packed, "y_ptr": "*fp32", **dict.fromkeys(
            ("N", "K", "words_k", "groups_k", "stride_wn", "stride_sn", "stride_ym", "magic"), i32)}
        consts = {"BITS": a.bits, "GROUP": a.group, "SPLIT_K": 1, "BLOCK_N": a.block_n, "BLOCK_K": a.block_k,
                  "EVEN_K": a.even, "EVEN_N": a.even}
        fn = tk._gemv_kernel.fn
    elif a.kernel == "direct":
        sig = {"x_ptr": "*fp32" if a.act else "*bf16", **packed, "y_ptr": "*fp32", **dict.fromkeys(
            ("N", "K", "words_k", "groups_k", "stride_xm", "stride_wn", "stride_sn", "stride_ym", "magic"), i32)}
        consts = {"ACT": a.act, "BITS": a.bits, "GROUP": a.group, "SPLIT_K": 1, "BLOCK_N": a.block_n,
                  "BLOCK_K": a.block_k, "EVEN_K": a.even, "EVEN_N": a.even}
        fn = tk._gemv_direct_kernel.fn
    elif a.kernel == "gemm":
        sig = {"x_ptr": "*bf16", **packed, "y_ptr": "*bf16", **dict.fromkeys(
            ("M", "N", "K", "stride_xm", "stride_wn", "stride_sn", "stride_ym", "magic"), i32)}
        consts = {"BITS": a.bits, "GROUP": a.group, "SWAP": a.swap, "BLOCK_M": a.block_m, "BLOCK_N": a.block_n,
                  "BLOCK_K": a.block_k}
        fn = tk._gemm_kernel
    else:  # the captured step's packed pass, a hot tier at --bits/--group and a cold one at INT2 g32
        sig = {**dict.fromkeys(("xp0_ptr", "xs0_ptr", "xp1_ptr", "xs1_ptr"), "*fp32"), "ids_ptr": "*i64",
               "table_ptr": "*i32", "buf_ptr": "*u8", "y_ptr": "*fp32", **dict.fromkeys(
                   ("N", "K", "stride_slot", "E", "c0", "s0", "z0", "c1", "s1", "z1", "magic"), i32)}
        consts = {"BITS0": a.bits, "GROUP0": a.group, "BITS1": 2, "GROUP1": 32, "TOPK": 2, "ACT": a.act,
                  "BLOCK_N": mk.BLOCK_N, "BLOCK_K": mk.PACKED_BLOCK_K}
        fn = mk._packed_kernel
    sig.update(dict.fromkeys(consts, ce))
    kernel = compile_kernel(fn, sig, consts, a.warps, a.stages)
    print(f"{a.kernel} {consts} num_warps={a.warps}")
    print(sass_report(kernel, a.ops))


if __name__ == "__main__":
    main()
