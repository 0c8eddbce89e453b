"""Experts computed on the CPU from their host-tier buffers: one call per layer for all its CPU experts.

`cpu_moe(x, experts, weights)` is the contract the offload cache and CPU-only runs call: x [T, H] on the
CPU, `experts` the layer's experts to compute here as (buffer, layout) in the tier store's format (the host
tier's own copy: quant/layout.py), `weights` [T, len(experts)] each token's routing weight for each of them
(0 where a token does not route to it). It returns sum_j weights[:, j] * expert_j(x), [T, H] in x's dtype.

Two implementations, the same numbers within float32 rounding:
- `cpu_moe_reference`: plain torch, dequantize then matmul, one expert at a time (what the kernels are held to);
- the kernels of quant/cpu_kernels.py (numba), reading the codes, scales and zeros (or the 16-bit weights) where
  they lie in the host tier's buffer: for a quantized tier, one compiled call computes every expert's FFN (two
  multi-threaded products, the biases, the activation) and adds the weighted outputs into the result, with no
  Python between the steps (a decode step makes this call once a layer); for a 16-bit tier one multi-threaded
  call per matrix, the activation and the weighted sum in torch between them. Experts whose buffers
  are rows of one tensor (a chunk of the host tier, cache/host_tier.py) are read in place, a group per tensor;
  any others are stacked into one temporary tensor first (a copy of those experts only).
The kernels are used where numba imports and the tier fits them (group size a multiple of the codes per word:
every tier but INT3); `FATE_CPU_EXPERTS=reference` forces the reference.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from quant import cpu_kernels
from quant.expert_act import ClampedSwiGLU
from quant.layout import ExpertLayout
from quant.packing import codes_per_word, dequantize

# tokens through one expert above which dequantizing it once and torch's matmul beat the fused kernel
# (quant/README.md); quant/kernels.py hands a resident expert over at the same count
KERNEL_MAX_TOKENS = 32
CPU_REFERENCE = "cpu dequant+matmul (reference)"
CPU_FUSED = "cpu fused dequant (numba)"


def kernel_fits(layout: ExpertLayout) -> bool:
    """Whether the fast kernels compute this tier (else the reference does)."""
    if layout.kind == "dense":
        return layout.dtype in ("bfloat16", "float16")
    return layout.group_size % codes_per_word(layout.bits) == 0


def use_kernels(layout: ExpertLayout) -> bool:
    return cpu_kernels.available() and os.environ.get("FATE_CPU_EXPERTS", "") != "reference" and kernel_fits(layout)


def cpu_expert_kernel(layout: ExpertLayout) -> str:
    """The name of what computes this tier's experts on the CPU: the describe lines show it."""
    return CPU_FUSED if use_kernels(layout) else CPU_REFERENCE


def cpu_moe(x: torch.Tensor, experts: Sequence[tuple[torch.Tensor, ExpertLayout]], weights: torch.Tensor,
            act: ClampedSwiGLU | None = None, threads: int | None = None) -> torch.Tensor:
    """sum over j of weights[:, j] * expert_j(x) for the experts given, computed on the CPU. threads: how many
    the kernels use (None: one for a call of little work, else those `fate --threads` configured, by default
    one per core: quant/cpu_kernels.py)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    if not experts:
        return out.to(x.dtype)
    xf = x.float().contiguous()
    w = weights.float().contiguous()
    by_layout: dict[int, list[int]] = {}  # by the layout object: hashing a layout costs more than the grouping
    for j, (_, layout) in enumerate(experts):
        by_layout.setdefault(id(layout), []).append(j)
    if cpu_kernels.available():
        macs = x.shape[0] * sum(3 * layout.hidden * layout.intermediate for _, layout in experts)
        cpu_kernels.set_threads(threads if threads is not None else cpu_kernels.threads_for(macs))
    for js in by_layout.values():  # a few tiers at most; experts in their given order within each
        layout = experts[js[0]][1]
        if use_kernels(layout):
            wj = w if len(js) == len(experts) else w[:, js].contiguous()
            _kernel_moe(xf, [experts[j][0] for j in js], layout, wj, act, out)
        else:
            out += cpu_moe_reference(xf, [experts[j] for j in js], w[:, js], act)
    return out.to(x.dtype)


def cpu_moe_reference(x: torch.Tensor, experts: Sequence[tuple[torch.Tensor, ExpertLayout]], weights: torch.Tensor,
                      act: ClampedSwiGLU | None = None) -> torch.Tensor:
    """The plain-torch reference of cpu_moe: dequantize, then matmul, one expert at a time."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    xf = x.float()
    for j, (buf, layout) in enumerate(experts):
        rows = weights[:, j].nonzero().flatten()
        if rows.numel() == 0:
            continue
        if layout.kind == "dense":
            v = layout.views(buf)
            w_gu, w_d = v["gate_up"].float(), v["down"].float()
        else:
            gate_up, down = layout.packed(buf)
            w_gu, w_d = dequantize(gate_up), dequantize(down)
        b_gu = b_d = None
        if layout.bias is not None:  # gpt_oss: 16-bit biases after the weights
            views = layout.views(buf)
            b_gu, b_d = views["gate_up.bias"].float(), views["down.bias"].float()
        inter = layout.intermediate
        h = F.linear(xf[rows], w_gu, b_gu)
        a = F.silu(h[:, :inter]) * h[:, inter:] if act is None else act(h[:, :inter], h[:, inter:])
        out[rows] += weights[rows, j, None].float() * F.linear(a, w_d, b_d)
    return out.to(x.dtype)


def _arenas(bufs: Sequence[torch.Tensor], nbytes: int) -> list[tuple[torch.Tensor, np.ndarray, list[int]]]:
    """The buffers as groups (arena, row numbers, their places in `bufs`): buffers that are rows of one contiguous
    uint8 tensor (a chunk of the host tier) are read in place, one group per such tensor; any others are stacked
    into one group (a copy of those alone)."""
    if len(bufs) == 1 and bufs[0].is_contiguous():  # one expert (a cache slot, say): itself, as one row
        return [(bufs[0].view(1, nbytes), np.zeros(1, dtype=np.int64), [0])]
    groups: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}
    loose: list[int] = []
    for j, b in enumerate(bufs):
        base = b._base
        if base is not None and base.dim() == 2 and base.dtype == torch.uint8 and base.shape[1] == nbytes \
                and base.is_contiguous() and (b.data_ptr() - base.data_ptr()) % nbytes == 0:
            _, rows, places = groups.setdefault(id(base), (base, [], []))
            rows.append((b.data_ptr() - base.data_ptr()) // nbytes)
            places.append(j)
        else:
            loose.append(j)
    out = [(base, np.array(rows, dtype=np.int64), places) for base, rows, places in groups.values()]
    if loose:
        out.append((torch.stack([bufs[j].reshape(nbytes) for j in loose]), np.arange(len(loose), dtype=np.int64),
                    loose))
    return out


_OFFSETS: dict[tuple[int, str], tuple[ExpertLayout, tuple[int, ...]]] = {}


def _offsets(layout: ExpertLayout, prefix: str) -> tuple[int, ...]:
    """The byte offsets of a matrix's codes, scales and zeros, kept per layout object (hashing a layout costs more
    than the lookup it saves; the layout is kept beside them so a reused id cannot return another's)."""
    key = (id(layout), prefix)
    kept = _OFFSETS.get(key)
    if kept is None or kept[0] is not layout:
        kept = _OFFSETS[key] = (layout, tuple(layout.segment(f"{prefix}.{s}").offset for s in ("codes", "scale",
                                                                                                "zero")))
    return kept[1]


def _bias_offsets(layout: ExpertLayout) -> tuple[int, int, int]:
    """(gate_up bias offset, down bias offset, kind) for the fused kernel; kind NO_BIAS where there are none."""
    if layout.bias is None:
        return 0, 0, cpu_kernels.NO_BIAS
    kind = cpu_kernels.BF16 if layout.bias == "bfloat16" else cpu_kernels.FP16
    return layout.segment("gate_up.bias").offset, layout.segment("down.bias").offset, kind


def _matmul(arena: np.ndarray, rows: np.ndarray, xsel: np.ndarray, layout: ExpertLayout, prefix: str,
            x: torch.Tensor, active: np.ndarray, n_out: int) -> torch.Tensor:
    """[E, T, n_out]: each 16-bit expert's matrix `prefix` times x[xsel[e]] (x [X, T, K] float32) for its active
    tokens."""
    out = np.zeros((len(rows), x.shape[1], n_out), dtype=np.float32)
    cpu_kernels.dense(arena, rows, xsel, layout.segment(prefix).offset, n_out, x.shape[-1], layout.dtype == "bfloat16",
                      x.contiguous().numpy(), active, out)
    return torch.from_numpy(out)


def _kernel_moe(x: torch.Tensor, bufs: list[torch.Tensor], layout: ExpertLayout, w: torch.Tensor,
                act: ClampedSwiGLU | None, out: torch.Tensor) -> None:
    """out += sum_j w[:, j] * expert_j(x) for experts of one layout, by the numba kernels, a group of buffers that
    lie in one tensor at a time (one group in a decode step's usual call), each group's in the experts' order."""
    groups = _arenas(bufs, layout.nbytes)
    wn = w.numpy()
    if layout.kind == "quantized":  # the whole FFN and the weighted sum in one compiled call a group
        xn, on = x.numpy(), out.numpy()
        offsets = _offsets(layout, "gate_up"), _offsets(layout, "down"), _bias_offsets(layout)
        kind = cpu_kernels.ACT_SILU if act is None else cpu_kernels.ACT_CLAMPED
        alpha, limit = (0.0, 0.0) if act is None else (act.alpha, act.limit)
        shape = layout.hidden, layout.intermediate, layout.bits, layout.group_size
        large = [] if x.shape[0] <= KERNEL_MAX_TOKENS else np.flatnonzero((wn != 0).sum(0) > KERNEL_MAX_TOKENS).tolist()
        if len(groups) == 1 and not large:
            arena_t, rows, _ = groups[0]
            cpu_kernels.quantized_moe(arena_t.numpy(), rows, *offsets, *shape, xn, wn, kind, alpha, limit, on)
            return
        small = wn.copy()
        small[:, large] = 0  # experts of many tokens: dequantized once and multiplied by torch's matmul instead
        y = np.empty((len(bufs), x.shape[0], layout.hidden), dtype=np.float32)
        for arena_t, rows, places in groups:  # every output first, then the sum in the experts' given order
            y[places] = cpu_kernels.quantized_ffn(arena_t.numpy(), rows, *offsets, *shape, xn,
                                                  np.ascontiguousarray(small[:, places]), kind, alpha, limit)
        for j in large:
            used = np.flatnonzero(wn[:, j])
            y[j][used] = _dequantized_ffn(x[torch.from_numpy(used)], bufs[j], layout, act).numpy()
        cpu_kernels.combine(y, wn, on)
        return
    active = np.ascontiguousarray((wn.T != 0).astype(np.uint8))  # [E, T]
    y = torch.empty(len(bufs), x.shape[0], layout.hidden)
    for arena_t, rows, places in groups:
        y[places] = _dense_outputs(x, arena_t, rows, layout, np.ascontiguousarray(active[places]), act)
    for j in range(len(bufs)):  # in the experts' given order, as the reference adds them
        out.addcmul_(w[:, j, None], y[j])


def _dequantized_ffn(x: torch.Tensor, buf: torch.Tensor, layout: ExpertLayout, act: ClampedSwiGLU | None
                     ) -> torch.Tensor:
    """One quantized expert on x [T, H] float32 the way many tokens are cheapest: its weights dequantized once (the
    multi-threaded kernel, bitwise the reference's), then torch's matmul."""
    w_gu, w_d = dequantize_expert(buf, layout, scratch=True)
    b_gu = b_d = None
    if layout.bias is not None:
        views = layout.views(buf)
        b_gu, b_d = views["gate_up.bias"].float(), views["down.bias"].float()
    inter = layout.intermediate
    h = F.linear(x, w_gu, b_gu)
    a = F.silu(h[:, :inter]) * h[:, inter:] if act is None else act(h[:, :inter], h[:, inter:])
    return F.linear(a, w_d, b_d)


def _dense_outputs(x: torch.Tensor, arena_t: torch.Tensor, rows: np.ndarray, layout: ExpertLayout,
                   active: np.ndarray, act: ClampedSwiGLU | None) -> torch.Tensor:
    """[E, T, hidden]: 16-bit expert e (row rows[e] of the arena) applied to x [T, H] for its active tokens."""
    arena = arena_t.numpy()
    n = len(rows)
    inter, hidden = layout.intermediate, layout.hidden
    h = _matmul(arena, rows, np.zeros(n, dtype=np.int64), layout, "gate_up", x.unsqueeze(0), active, 2 * inter)
    biases = None
    if layout.bias is not None:
        bias_dt = getattr(torch, layout.bias)
        seg_gu, seg_d = layout.segment("gate_up.bias"), layout.segment("down.bias")
        raw = arena_t[torch.from_numpy(rows)]
        biases = (raw[:, seg_gu.offset: seg_gu.offset + seg_gu.nbytes].contiguous().view(bias_dt).float(),
                  raw[:, seg_d.offset: seg_d.offset + seg_d.nbytes].contiguous().view(bias_dt).float())
        h += biases[0].unsqueeze(1)
    a = F.silu(h[..., :inter]) * h[..., inter:] if act is None else act(h[..., :inter], h[..., inter:])
    y = _matmul(arena, rows, np.arange(n, dtype=np.int64), layout, "down", a.contiguous(), active, hidden)
    if biases is not None:
        y += biases[1].unsqueeze(1)
    return y


def dequantize_expert(buf: torch.Tensor, layout: ExpertLayout, scratch: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized expert's (gate_up [2I, H], down [H, I]) in float32, by the multi-threaded kernel: bitwise
    quant.packing.dequantize's result. scratch: into this thread's reused buffers of those shapes (valid until its
    next such call): a fresh 19 MB pair costs as much in page faults as the dequantization itself."""
    arena = buf.contiguous().numpy()
    mats = []
    for prefix, n_out, k_in in (("gate_up", 2 * layout.intermediate, layout.hidden),
                                ("down", layout.hidden, layout.intermediate)):
        out = _scratch(prefix, n_out, k_in) if scratch else torch.empty(n_out, k_in, dtype=torch.float32)
        offsets = _offsets(layout, prefix)
        cpu_kernels.set_threads(cpu_kernels.threads_for(n_out * k_in))
        cpu_kernels.dequantize(arena, offsets, n_out, k_in, layout.bits, layout.group_size, out.numpy())
        mats.append(out)
    return mats[0], mats[1]


_SCRATCH = threading.local()


def _scratch(name: str, rows: int, cols: int) -> torch.Tensor:
    kept = getattr(_SCRATCH, name, None)
    if kept is None or kept.shape != (rows, cols):
        kept = torch.empty(rows, cols, dtype=torch.float32)
        setattr(_SCRATCH, name, kept)
    return kept
