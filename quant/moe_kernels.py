"""A layer's routed experts for one decode step in two passes, weights read from fixed slots.

A bank is where a layer's experts sit on the device: stacked 16-bit matrices (`DenseBank`), or a cache's
slots, one uint8 buffer per slot in quant/layout.py's format at the hot or the cold tier (`PackedBank`).
Its device table maps expert -> (slot, tier): table[0, e] is the slot (-1: not in the bank), table[1, e]
the tier (0 hot, 1 cold). The kernels look the slot up themselves, so the host need not see the routing
unless an expert is missing, and a CUDA graph can replay the step whatever the router picks.

For x [T, H] with routing ids, weights [T, k], over the T * k (token, choice) pairs p:
  pass 1: h[p] = W_gate_up[slot(p)] @ x[token(p)]             [T * k, 2I]
  pass 2: y[p] = W_down[slot(p)] @ (silu(h_gate[p]) * h_up[p])  float32 [T * k, H]
  combine: out[t] = sum over the token's choices, in ascending expert order, of weights * y
Where the experts have biases (gpt_oss), pass 1 adds the slot's gate|up bias and pass 2 its down bias (BIAS),
and pass 2's input is the clamped SwiGLU of quant/expert_act.py (CLAMP) in place of silu(gate) * up: a dense
bank holds the biases stacked beside its matrices, a packed slot inside its buffer (quant/layout.py).
The kernels round where the eager path (fate_cli/model/moe.py over quant/kernels.py) rounds, so a 16-bit
model gives its greedy tokens: a dense bank keeps h and silu(gate) * up in the activation dtype (as
F.linear and F.silu do), a packed bank keeps h in float32 (as the batch-1 GEMV does); each expert's
output is rounded, scaled by its weight, rounded, and summed in the activation dtype one expert at a time.
A packed pass is quant/triton_kernels.py's GEMV: its input is first laid out by the planes kernel (plane
order, group sums, silu(gate) * up for pass 2) once per distinct tier format, then each program runs the
GEMV's step (`gemv_step`) on its pair's slot at the tier the table names. A dense pass is one launch.
An expert with no slot gives zeros: the warm-up before a graph capture runs on whatever the table holds.

`moe_ffn` runs the Triton kernels on a CUDA device, and `moe_ffn_reference` (plain torch, float32,
dequantize-then-matmul) elsewhere; the GPU tests hold the first to the second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quant.expert_act import ClampedSwiGLU
from quant.layout import DTYPES, ExpertLayout
from quant.packing import dequantize
from quant.triton_kernels import F32_TWO_23, HAVE_TRITON, available, planes, tier_fits

FUSED = "triton fused-moe"
REFERENCE = "torch reference"


@dataclass
class DenseBank:
    """Experts at 16 bits, stacked: slot s holds gate|up [2I, H] and down [H, I]."""

    gate_up: torch.Tensor  # [S, 2I, H]
    down: torch.Tensor  # [S, H, I]
    table: torch.Tensor  # int32 [2, E]
    gate_up_bias: torch.Tensor | None = None  # [S, 2I] (gpt_oss)
    down_bias: torch.Tensor | None = None  # [S, H]
    act: ClampedSwiGLU | None = None  # None: silu(gate) * up

    @property
    def intermediate(self) -> int:
        return self.down.shape[2]

    @property
    def plain(self) -> bool:
        """silu(gate) * up with no biases."""
        return self.gate_up_bias is None and self.down_bias is None and self.act is None

    def matrices(self, slot: int, tier: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up[slot], self.down[slot]

    def biases(self, slot: int, tier: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.gate_up_bias is None:
            return None, None
        return self.gate_up_bias[slot], self.down_bias[slot]


@dataclass
class PackedBank:
    """A cache's slots: buf [S, slot bytes], each slot one expert's buffer at the tier the table says."""

    buf: torch.Tensor  # uint8 [S, slot_nbytes]
    layouts: tuple[ExpertLayout, ExpertLayout]  # tier 0 (hot), tier 1 (cold); biases in the buffer if they say so
    table: torch.Tensor  # int32 [2, E]
    act: ClampedSwiGLU | None = None  # None: silu(gate) * up

    @property
    def intermediate(self) -> int:
        return self.layouts[0].intermediate

    @property
    def plain(self) -> bool:
        """silu(gate) * up with no biases."""
        return self.layouts[0].bias is None and self.act is None

    def matrices(self, slot: int, tier: int) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.layouts[tier]
        gate_up, down = layout.packed(self.buf[slot, : layout.nbytes])
        return dequantize(gate_up), dequantize(down)

    def biases(self, slot: int, tier: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        layout = self.layouts[tier]
        return layout.biases(self.buf[slot, : layout.nbytes]) or (None, None)


Bank = DenseBank | PackedBank


def identity_table(num_experts: int, device: torch.device | str) -> torch.Tensor:
    """Expert e in slot e at tier 0: a bank that holds every expert."""
    table = torch.zeros(2, num_experts, dtype=torch.int32, device=device)
    table[0] = torch.arange(num_experts, dtype=torch.int32, device=device)
    return table


def fused_fits(bank: Bank) -> bool:
    """Whether the Triton kernels take this bank (packed tiers: bits 2, 4 or 8 in whole words per group)."""
    if isinstance(bank, DenseBank):
        return (bank.gate_up_bias is None) == (bank.down_bias is None)
    # the packed pass sums per group within one 256-column tile
    return all(lay.kind == "quantized" and tier_fits(lay.bits, lay.group_size, lay.hidden, lay.intermediate,
                                                     max_group=PACKED_BLOCK_K) for lay in bank.layouts)


def backend_for(device: torch.device, bank: Bank) -> str:
    return FUSED if device.type == "cuda" and available() and fused_fits(bank) else REFERENCE


def moe_ffn(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, bank: Bank) -> torch.Tensor:
    """sum over each token's k routed experts of weight * expert(x): x [T, H], weights/ids [T, k] -> [T, H]."""
    if backend_for(x.device, bank) == REFERENCE:
        return moe_ffn_reference(x, weights, ids, bank)
    tokens, k = ids.shape
    pairs = tokens * k
    inter, hidden = bank.intermediate, x.shape[1]
    flat = ids.reshape(-1).contiguous()
    h_dtype = x.dtype if isinstance(bank, DenseBank) else torch.float32
    h = torch.empty(pairs, 2 * inter, device=x.device, dtype=h_dtype)
    y = torch.empty(pairs, hidden, device=x.device, dtype=torch.float32)
    x = x.contiguous()
    _launch(bank, x, flat, h, n=2 * inter, k=hidden, topk=k, act=False)
    _launch(bank, h, flat, y, n=hidden, k=inter, topk=k, act=True)
    out = torch.empty_like(x)
    _combine_kernel[(triton.cdiv(hidden, COMBINE_BLOCK), tokens)](
        y, weights.float().contiguous(), flat, out, hidden, K=k, KP=triton.next_power_of_2(k),
        ROUND=x.dtype != torch.float32, BLOCK=COMBINE_BLOCK, num_warps=4)
    return out


def moe_ffn_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, bank: Bank) -> torch.Tensor:
    """The same sum in float32 with plain torch, one pair at a time (the host reads the table)."""
    table = bank.table.tolist()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t, (row_ids, row_w) in enumerate(zip(ids.tolist(), weights.float())):
        for e, w in zip(row_ids, row_w):
            slot, tier = table[0][e], table[1][e]
            if slot < 0:
                continue
            gate_up, down = (m.float() for m in bank.matrices(slot, tier))
            inter = down.shape[1]
            b_gu, b_d = (None if b is None else b.float() for b in bank.biases(slot, tier))
            h = F.linear(x[t].float(), gate_up, b_gu)
            act = bank.act(h[:inter], h[inter:]) if bank.act else F.silu(h[:inter]) * h[inter:]
            out[t] += w * F.linear(act, down, b_d)
    return out.to(x.dtype)


# ---- Triton ---------------------------------------------------------------------------------------

BLOCK_N = 32
DENSE_BLOCK_K = 128
PACKED_BLOCK_K = 256  # input columns per tile (32 words of INT4, 16 of INT2)
COMBINE_BLOCK = 512


def _launch(bank: Bank, x: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, n: int, k: int, topk: int,
            act: bool) -> None:
    grid = (triton.cdiv(n, BLOCK_N), ids.numel())
    num_experts = bank.table.shape[1]
    rounded = act and x.dtype != torch.float32  # h held in a 16-bit dtype: silu and the product rounded too
    clamp = bank.act is not None and act  # pass 2's input: the clamped SwiGLU
    alpha, limit = (bank.act.alpha, bank.act.limit) if bank.act is not None else (1.0, 0.0)
    if isinstance(bank, DenseBank):
        w = bank.down if act else bank.gate_up
        b = bank.down_bias if act else bank.gate_up_bias
        has_bias = b is not None
        b = b if has_bias else w  # not read without BIAS
        _dense_kernel[grid](x, ids, bank.table, w, b, out, n, k, x.stride(0), w.stride(0), b.stride(0), num_experts,
                            float(alpha), float(limit), TOPK=topk, ACT=act, ROUND=rounded, BIAS=has_bias, CLAMP=clamp,
                            BLOCK_N=BLOCK_N, BLOCK_K=DENSE_BLOCK_K, num_warps=4)
        return
    prefix = "down" if act else "gate_up"
    offsets, consts, inputs, laid_out, bias_at = [], {}, [], {}, []
    has_bias = bank.layouts[0].bias is not None
    bias_dtype = DTYPES[bank.layouts[0].bias] if has_bias else torch.float16
    for i, lay in enumerate(bank.layouts):
        offsets += [lay.segment(f"{prefix}.{part}").offset for part in ("codes", "scale", "zero")]
        # the bias in elements of its dtype from the slot's start (each tier's layout puts it elsewhere)
        bias_at.append(lay.segment(f"{prefix}.bias").offset // bias_dtype.itemsize if has_bias else 0)
        consts[f"BITS{i}"], consts[f"GROUP{i}"] = lay.bits, lay.group_size
        key = (lay.bits, lay.group_size)
        if key not in laid_out:  # the input in plane order and its group sums, once per distinct tier format
            laid_out[key] = planes(x, lay.bits, lay.group_size, act, (alpha, limit) if clamp else None)
        inputs += laid_out[key]
    biases = bank.buf.view(bias_dtype)  # the slots' bytes read as the biases' dtype (offsets are 128-aligned)
    _packed_kernel[grid](*inputs, ids, bank.table, bank.buf, out, n, k, bank.buf.stride(0), num_experts,
                         *offsets, F32_TWO_23, biases, biases.stride(0), *bias_at, **consts, TOPK=topk, ACT=act,
                         BIAS=has_bias, BLOCK_N=BLOCK_N, BLOCK_K=PACKED_BLOCK_K, num_warps=4)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from quant.triton_kernels import clamped_swiglu, gemv_step

    @triton.jit
    def _input(x_row, col, ok, K, alpha, limit, ACT: tl.constexpr, ROUND: tl.constexpr, CLAMP: tl.constexpr):
        """The product's input at columns col: x, or silu(gate) * up from a gate|up row of width 2K (with
        ROUND, silu and the product each rounded to the row's dtype, as torch does in 16 bits), or with CLAMP the
        clamped SwiGLU of alpha and limit (rounded the same way)."""
        if ACT:
            g = tl.load(x_row + col, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(x_row + K + col, mask=ok, other=0.0).to(tl.float32)
            if CLAMP:
                return clamped_swiglu(g, u, alpha, limit, x_row.dtype.element_ty, ROUND)
            if ROUND:
                silu = (g * tl.sigmoid(g)).to(x_row.dtype.element_ty).to(tl.float32)
                return (silu * u).to(x_row.dtype.element_ty).to(tl.float32)
            return g * tl.sigmoid(g) * u
        else:
            return tl.load(x_row + col, mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _dense_kernel(x_ptr, ids_ptr, table_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_x, stride_slot, stride_bias, E,
                      alpha, limit, TOPK: tl.constexpr, ACT: tl.constexpr, ROUND: tl.constexpr, BIAS: tl.constexpr,
                      CLAMP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """BIAS: b [S, N] added to each output row (in float32, before the one rounding to y's dtype, as a
        biased matmul rounds)."""
        p = tl.program_id(1)
        slot = tl.load(table_ptr + tl.load(ids_ptr + p))
        present = slot >= 0
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        row = p if ACT else p // TOPK
        x_row = x_ptr + row * stride_x
        w_rows = w_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_slot + n[:, None] * K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            col = k0 + tl.arange(0, BLOCK_K)
            ok = col < K
            v = _input(x_row, col, ok, K, alpha, limit, ACT, ROUND, CLAMP)
            w = tl.load(w_rows + col[None, :], mask=n_ok[:, None] & ok[None, :] & present, other=0.0)
            acc += w.to(tl.float32) * v[None, :]
        y = tl.sum(acc, axis=1)
        if BIAS:
            b_row = b_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_bias
            y += tl.load(b_row + n, mask=n_ok & present, other=0.0).to(tl.float32)
        tl.store(y_ptr + p * N + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _packed_rows(base, codes_off, scale_off, zero_off, xp_row, xs_row, n, n_ok, K, magic,
                     BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """sum_k W[n, k] v[k] for BLOCK_N rows of one packed matrix at `base` (a slot's first byte), from the
        input in plane order and its group sums (quant/triton_kernels.py's planes pass and GEMV step)."""
        CPW: tl.constexpr = 32 // BITS
        codes = (base + codes_off).to(tl.pointer_type(tl.int32))
        scales = (base + scale_off).to(tl.pointer_type(tl.float16))
        zeros = (base + zero_off).to(tl.pointer_type(tl.float16))
        acc = tl.zeros([BLOCK_N, BLOCK_K // GROUP], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc += gemv_step(codes, scales, zeros, xp_row, xs_row, n, n_ok, k0, K // CPW, K // GROUP, K // CPW,
                             K // GROUP, magic, BITS, GROUP, BLOCK_N, BLOCK_K, False)
        return tl.sum(acc, axis=1)

    @triton.jit
    def _packed_kernel(xp0_ptr, xs0_ptr, xp1_ptr, xs1_ptr, ids_ptr, table_ptr, buf_ptr, y_ptr, N, K, stride_slot, E,
                       c0, s0, z0, c1, s1, z1, magic, bias_ptr, stride_bias, b0, b1,
                       BITS0: tl.constexpr, GROUP0: tl.constexpr, BITS1: tl.constexpr, GROUP1: tl.constexpr,
                       TOPK: tl.constexpr, ACT: tl.constexpr, BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """xp{t} / xs{t}: the input rows laid out for tier t (plane order and group sums). BIAS: the slot's bias,
        at element b{t} of the slot read as the bias dtype (bias_ptr, stride_bias), added to each output row."""
        p = tl.program_id(1)
        expert = tl.load(ids_ptr + p)
        slot = tl.load(table_ptr + expert)
        tier = tl.load(table_ptr + E + expert)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        rows_ok = n_ok & (slot >= 0)
        row = p if ACT else p // TOPK
        base = buf_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_slot
        if tier == 0:
            y = _packed_rows(base, c0, s0, z0, xp0_ptr + row * K, xs0_ptr + row * (K // GROUP0), n, rows_ok, K, magic,
                             BITS0, GROUP0, BLOCK_N, BLOCK_K)
        else:
            y = _packed_rows(base, c1, s1, z1, xp1_ptr + row * K, xs1_ptr + row * (K // GROUP1), n, rows_ok, K, magic,
                             BITS1, GROUP1, BLOCK_N, BLOCK_K)
        if BIAS:
            b_row = bias_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_bias + b0 + (b1 - b0) * tier
            y += tl.load(b_row + n, mask=rows_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + p * N + n, y, mask=n_ok)

    @triton.jit
    def _combine_kernel(y_ptr, w_ptr, ids_ptr, out_ptr, H, K: tl.constexpr, KP: tl.constexpr,
                        ROUND: tl.constexpr, BLOCK: tl.constexpr):
        """out[t] = sum of w * y over token t's K choices in ascending expert order (ids differ within a
        token), rounded as the eager dispatch's index_add_ into a 16-bit output rounds."""
        t = tl.program_id(1)
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = n < H
        j = tl.arange(0, KP)
        j_ok = j < K
        ids = tl.load(ids_ptr + t * K + j, mask=j_ok, other=0)
        rank = tl.sum(((ids[None, :] < ids[:, None]) & j_ok[None, :]).to(tl.int32), axis=1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(K):
            pick = tl.sum(tl.where((rank == r) & j_ok, j, 0), axis=0)
            w = tl.load(w_ptr + t * K + pick)
            y = tl.load(y_ptr + (t * K + pick) * H + n, mask=ok, other=0.0)
            if ROUND:
                dt = out_ptr.dtype.element_ty
                term = (y.to(dt).to(tl.float32) * w).to(dt).to(tl.float32)
                acc = (acc + term).to(dt).to(tl.float32)
            else:
                acc += y * w
        tl.store(out_ptr + t * H + n, acc.to(out_ptr.dtype.element_ty), mask=ok)
