"""A layer's routed experts for many tokens at once (prefill): pairs sorted by expert, then grouped products.

For x [T, H] with routing ids, weights [T, k], the T * k (token, choice) pairs are sorted by expert once, on
the device (the host never reads the routing for it). Then, over a bank (quant/moe_kernels.py) that holds
every routed expert:
- 16-bit experts (`DenseBank`): torch's grouped GEMM (`F.grouped_mm`) over the sorted rows, gate|up, the
  activation, down: two launches whatever the number of experts;
- a cache's slots (`PackedBank`) on CUDA: a Triton grouped GEMM, one launch per tier and matrix. The sorted
  rows are padded per expert to whole BLOCK_M tiles; each program multiplies one tile of one expert's rows by
  a BLOCK_N tile of that expert's weights, dequantized on chip from the slot the bank's table names, so the
  weights are read once per tile of rows and never written out at 16 bits.
Each expert's output is scaled by its routing weight and summed into its token in ascending expert order,
each addition rounded as the per-expert loop in fate_cli/model/moe.py rounds it (so runs give the loop's
tokens), without atomics (so two runs give the same bits). Experts with biases and the clamped SwiGLU (gpt_oss)
take them between the products: a dense bank's stacked biases, a packed slot's from its buffer
(quant/layout.py), gathered per pair by torch.
`grouped_backend` says which path a bank takes, or why none does (then the caller loops over experts).
Where a layer's experts pass through a cache's slots in waves (cache/offload.py `waves`), one `GroupedPass` sorts
the pairs once and runs once per wave, each run filling the rows of the experts its bank has a slot for
(`waves_backend`: on a CPU the wave's experts one by one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quant.kernels import QuantExpert
from quant.layout import DTYPES
from quant.moe_kernels import Bank, DenseBank, PackedBank
from quant.triton_kernels import F32_TWO_23, HAVE_TRITON, available, tier_fits, whole_group_tile

GROUPED_DENSE = "grouped GEMM (torch)"
GROUPED_PACKED = "grouped fused-dequant GEMM (triton)"
BY_EXPERT = "expert by expert (CPU)"
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_backend(x: torch.Tensor, bank: Bank) -> str | None:
    """The path `grouped_ffn` takes for x over this bank, or None where it cannot run (the caller loops)."""
    if isinstance(bank, DenseBank):
        return GROUPED_DENSE if _dense_fits(x, bank) else None
    return GROUPED_PACKED if _packed_fits(x, bank) else None


def waves_backend(x: torch.Tensor, bank: Bank) -> str | None:
    """The path `GroupedPass` takes for a step whose experts pass through a cache's slots in waves: the grouped
    kernel on CUDA; on the CPU the wave's experts one by one (the loop's products, in the same order)."""
    if isinstance(bank, PackedBank) and not x.is_cuda:
        return BY_EXPERT
    return grouped_backend(x, bank)


def why_not_grouped(x: torch.Tensor, bank: Bank) -> str:
    """Why `grouped_backend` gives None for x over this bank, in a few words for the device line."""
    if isinstance(bank, PackedBank):
        return "the grouped kernel of packed tiers needs CUDA and Triton" if not (x.is_cuda and available()) \
            else "a tier's bits or groups do not fit the grouped kernel"
    if _grouped_mm is None:
        return "this torch has no grouped GEMM"
    return "torch's grouped GEMM takes bf16 on CUDA" if x.is_cuda else "the bank's rows are not 16-byte aligned"


def _dense_fits(x: torch.Tensor, bank: DenseBank) -> bool:
    if _grouped_mm is None or x.dtype != bank.gate_up.dtype:
        return False
    if x.is_cuda and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0)):
        return False  # torch's CUDA grouped GEMM takes bf16 on sm80 and later
    # its kernels read 16-byte aligned rows; the bank must be the identity map (a stacked layer, not slots)
    align = 16 // x.element_size()
    return (x.shape[1] % align == 0 and bank.intermediate % align == 0 and bank.gate_up.data_ptr() % 16 == 0
            and bank.down.data_ptr() % 16 == 0 and bank.gate_up.shape[0] == bank.table.shape[1])


def _packed_fits(x: torch.Tensor, bank: PackedBank) -> bool:
    if not (x.is_cuda and available()) or bank.buf.stride(0) % 4:
        return False
    return all(lay.kind == "quantized" and tier_fits(lay.bits, lay.group_size, lay.hidden, lay.intermediate)
               and whole_group_tile(lay.hidden, lay.group_size) and whole_group_tile(lay.intermediate, lay.group_size)
               for lay in bank.layouts)


def grouped_ffn(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, bank: Bank,
                config: dict | None = None) -> torch.Tensor:
    """sum over each token's k routed experts of weight * expert(x): x [T, H], weights/ids [T, k] -> [T, H].
    config: the Triton tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) in place of `packed_config`'s."""
    step = GroupedPass(x, weights, ids, bank.table.shape[1], config)
    step.run(bank)
    return step.result()


class GroupedPass:
    """One layer's (token, choice) pairs sorted by expert once; then the products of the experts a bank has a
    slot for, once (every routed expert in the bank) or once per wave (an offloaded prefill refilling a few
    slots while the last wave computes: each `run` fills the rows of its experts' pairs, the others keep what
    an earlier wave put there); then the weighted sum per token.

    A pair's product is the same whatever wave computes it (the same tiles over the same weights), so waves give
    the bits of one pass over every expert."""

    def __init__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                 config: dict | None = None):
        self.x, self.weights, self.ids = x, weights, ids
        k = ids.shape[1]
        flat = ids.reshape(-1)
        self.experts, self.order = torch.sort(flat, stable=True)
        self.counts = torch.bincount(flat, minlength=num_experts)
        self.rows = self.order // k  # the token of each sorted pair
        self.config = config or packed_config(self.rows.numel(), num_experts)
        self.y: torch.Tensor | None = None  # [P, H]: each sorted pair's expert output, once computed
        self._layout: _PaddedRows | None = None

    def run(self, bank: Bank) -> None:
        """The products of the pairs whose expert has a slot in the bank's table."""
        if isinstance(bank, DenseBank):  # a layer's stacked 16-bit experts: every expert, one pass
            self.y = _dense(self.x, bank, self.rows, self.experts, torch.cumsum(self.counts, 0, dtype=torch.int32))
            return
        if not self.x.is_cuda:
            y = _by_expert(self.x, bank, self.rows, self.counts)
        else:
            if self._layout is None:
                self._layout = _PaddedRows(self.rows, self.experts, self.counts, self.config["BLOCK_M"])
            y = _packed(self.x, bank, self.experts, self._layout, self.config)
        # pairs of experts without a slot (a later wave's, or the host's) keep what they hold, zero at first
        have = bank.table[0][self.experts] >= 0
        self.y = torch.where(have[:, None], y, 0.0 if self.y is None else self.y)

    def result(self) -> torch.Tensor:
        """Each token's k expert outputs, scaled by their routing weights, summed in ascending expert order (zero
        where no wave ran: the host computes every expert of the step)."""
        if self.y is None:
            return torch.zeros_like(self.x)
        y = (self.y.float() * self.weights.reshape(-1)[self.order, None].float()).to(self.x.dtype)
        return _combine(y, self.order, self.ids)


def _combine(y: torch.Tensor, order: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each token's k scaled expert outputs (y in sorted-pair order) summed in ascending expert order, each
    addition rounded to the activation dtype: the per-expert loop's sums, deterministically (no atomics)."""
    tokens, k = ids.shape
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    by_expert = torch.argsort(ids, dim=1, stable=True)
    picks = back.view(tokens, k).gather(1, by_expert)  # each token's pairs, ascending expert
    out = y[picks[:, 0]]
    for j in range(1, k):
        out += y[picks[:, j]]
    return out


def _dense(x: torch.Tensor, bank: DenseBank, rows: torch.Tensor, experts: torch.Tensor,
           offs: torch.Tensor) -> torch.Tensor:
    inter = bank.intermediate
    h = _grouped_mm(x[rows], bank.gate_up.transpose(1, 2), offs=offs)  # [P, 2I], each row by its expert
    if bank.gate_up_bias is not None:
        h = h + bank.gate_up_bias[experts]
    gate, up = h[:, :inter], h[:, inter:]
    act = F.silu(gate) * up if bank.act is None else bank.act(gate, up)
    y = _grouped_mm(act.contiguous(), bank.down.transpose(1, 2), offs=offs)
    if bank.down_bias is not None:
        y = y + bank.down_bias[experts]
    return y


def packed_config(pairs: int, num_experts: int) -> dict:
    """Tiles for the Triton grouped GEMM: BLOCK_M near the rows an expert gets on average (each expert's rows
    are padded to whole tiles)."""
    block_m = 16 if pairs <= 16 * num_experts else 32 if pairs <= 64 * num_experts else 64
    return {"BLOCK_M": block_m, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}


class _PaddedRows:
    """The sorted pairs laid out for the Triton grouped GEMM, computed on the device without a host read: each
    expert's rows padded to whole BLOCK_M tiles, the expert of each tile, the source row of each padded row."""

    def __init__(self, rows: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor, block_m: int):
        pairs, num_experts, device = rows.numel(), counts.numel(), rows.device
        padded = (counts + block_m - 1) // block_m * block_m
        ends = torch.cumsum(padded, 0)
        first = torch.cumsum(counts, 0) - counts  # each expert's first sorted pair
        rank = torch.arange(pairs, device=device) - first[experts]
        self.position = (ends - padded)[experts] + rank  # each sorted pair's padded row
        blocks = triton.cdiv(pairs, block_m) + num_experts  # an upper bound: no host read of the counts
        starts = torch.arange(blocks, device=device) * block_m
        block_expert = torch.searchsorted(ends, starts, right=True).to(torch.int32)
        self.block_expert = torch.where(block_expert < num_experts, block_expert, -1)  # a mask assignment syncs
        self.src = torch.full((blocks * block_m,), -1, dtype=torch.int32, device=device)
        self.src[self.position] = rows.to(torch.int32)
        self.own = torch.where(self.src >= 0, torch.arange(self.src.numel(), device=device, dtype=torch.int32), -1)


def _packed(x: torch.Tensor, bank: PackedBank, experts: torch.Tensor, rows: _PaddedRows,
            config: dict) -> torch.Tensor:
    """The sorted pairs' expert outputs [P, H] through the Triton grouped GEMM, per tier and matrix (zero for a
    pair whose expert has no slot in the bank's table)."""
    inter, hidden, padded = bank.intermediate, x.shape[1], rows.src.numel()
    h = torch.zeros(padded, 2 * inter, device=x.device, dtype=x.dtype)  # padding rows stay zero
    _launch(bank, x.contiguous(), rows.src, rows.block_expert, h, "gate_up", config)
    biased = bank.layouts[0].bias is not None
    if biased:
        h[rows.position] += slot_biases(bank, experts, "gate_up").to(h.dtype)
    act = F.silu(h[:, :inter]) * h[:, inter:] if bank.act is None else bank.act(h[:, :inter], h[:, inter:])
    y = torch.zeros(padded, hidden, device=x.device, dtype=x.dtype)  # an expert with no slot adds 0
    _launch(bank, act.contiguous(), rows.own, rows.block_expert, y, "down", config)
    y = y[rows.position]
    return y + slot_biases(bank, experts, "down").to(y.dtype) if biased else y


def _by_expert(x: torch.Tensor, bank: PackedBank, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The sorted pairs' expert outputs [P, H] on the CPU, one expert of the table at a time (zero for a pair whose
    expert has no slot)."""
    y = torch.zeros(rows.numel(), x.shape[1], dtype=x.dtype)
    table, start = bank.table.tolist(), 0
    for e, n in enumerate(counts.tolist()):
        slot, tier = table[0][e], table[1][e]
        if n and slot >= 0:
            lay = bank.layouts[tier]
            expert = QuantExpert(bank.buf[slot, : lay.nbytes], lay, act=bank.act)
            y[start : start + n] = expert(x[rows[start : start + n]])
        start += n
    return y


def slot_biases(bank: PackedBank, experts: torch.Tensor, part: str) -> torch.Tensor:
    """The `part` ("gate_up" or "down") bias of each pair's expert [P, N], read from its slot at its tier's offset
    (every routed expert has a slot here)."""
    slots, tiers = bank.table[0].long()[experts], bank.table[1].long()[experts]
    out = None
    for tier, lay in enumerate(bank.layouts):
        seg = lay.segment(f"{part}.bias")
        # the slots' bytes of this segment as [S, N] in the bias dtype (rows keep the slots' stride)
        rows = bank.buf[:, seg.offset : seg.offset + seg.nbytes].view(DTYPES[seg.dtype])[slots]
        out = rows if out is None else torch.where((tiers == tier)[:, None], rows, out)
    return out


def _launch(bank: PackedBank, x: torch.Tensor, src: torch.Tensor, block_expert: torch.Tensor, y: torch.Tensor,
            matrix: str, config: dict) -> None:
    num_experts = bank.table.shape[1]
    slot_bytes = bank.buf.stride(0)
    for tier, lay in enumerate(bank.layouts):
        if tier and lay == bank.layouts[0]:
            break  # one tier format (--transfer-bits): the first launch served every slot
        gate_up, down = lay.packed(bank.buf[0, : lay.nbytes])
        w = gate_up if matrix == "gate_up" else down
        n, k = w.shape
        block_k = whole_group_tile(k, w.group_size)
        block_n = min(config["BLOCK_N"], triton.next_power_of_2(n))
        grid = (block_expert.numel(), triton.cdiv(n, block_n))
        _grouped_kernel[grid](
            x, src, block_expert, bank.table, w.codes, w.scale, w.zero, y, n, k, x.stride(0), w.codes.stride(0),
            w.scale.stride(0), y.stride(0), slot_bytes // 4, slot_bytes // 2, num_experts, F32_TWO_23,
            TIER=tier, ANY_TIER=lay == bank.layouts[-1] and tier == 0, BITS=w.bits, GROUP=w.group_size,
            IEEE=x.dtype == torch.float32, BLOCK_M=config["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=config["num_warps"], num_stages=config["num_stages"])


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from quant.triton_kernels import _w_tile

    @triton.jit
    def _grouped_kernel(
        x_ptr, src_ptr, blk_ptr, table_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        N, K, stride_xm, stride_wn, stride_sn, stride_ym, slot_words, slot_halves, E, magic,
        TIER: tl.constexpr, ANY_TIER: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y[r] = x[src[r]] @ W_e.T for the BLOCK_M padded rows r of one expert e (rows with src < 0 are
        padding), W_e dequantized tile by tile from e's slot. Blocks of no expert, of an expert with no slot
        or at another tier do nothing."""
        pid_m = tl.program_id(0)
        e = tl.load(blk_ptr + pid_m)
        if e < 0:
            return
        slot = tl.load(table_ptr + e)
        tier = tl.load(table_ptr + E + e)
        if slot < 0:
            return
        if not ANY_TIER:
            if tier != TIER:
                return
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        src = tl.load(src_ptr + r)
        m_ok = src >= 0
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        slot64 = slot.to(tl.int64)
        w_base = w_ptr + slot64 * slot_words
        s_base = s_ptr + slot64 * slot_halves
        z_base = z_ptr + slot64 * slot_halves
        DTYPE: tl.constexpr = x_ptr.dtype.element_ty
        kk = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + src.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _w_tile(w_base, s_base, z_base, n, n_ok, k0, stride_wn, stride_sn, magic, BITS, GROUP, BLOCK_N,
                        BLOCK_K, DTYPE)
            xt = tl.load(x_rows + (k0 + kk)[None, :], mask=m_ok[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(w), acc)
        tl.store(y_ptr + r[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
