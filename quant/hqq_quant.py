"""Quantize one weight matrix into our packed format (quant/packing.py).

Method "hqq": HQQ's quantizer, asymmetric per group with its optimiser. `Quantizer.quantize` (hqq 0.2.x)
starts from min-max (inverse scale (2^b - 1) / (max - min), 1 where max - min <= 1e-4, clamped to 2e4;
zero -min * inverse scale), then calls `optimize_weights_proximal_legacy`, the proximal solver that
refines the zero point (lp_norm 0.7, beta 10, kappa 1.01, up to 20 iterations, stopping early when the
mean |W - W_r| stops falling). `Quantizer.quantize` gives no way to set the iteration count, so
`_quantize_chunk_hqq` does the same steps itself, line for line, and calls HQQ's optimiser with explicit
opt_params; with the default 20 iterations its codes, scales and zeros equal Quantizer.quantize's
bitwise (tests/test_quant.py checks this). Groups run along axis=1: `group_size` consecutive input
columns of one row. HQQ's float32 scale and zero are stored as float16 (as HQQLinear keeps them). On CUDA
the optimiser runs in float16 (HQQ's choice), about a hundred times faster than on a CPU.

Cost on this project's 2-core CPU: about 1.5 s per million weights per tier at 20 iterations (a
Mixtral expert, 176M weights, takes minutes). `iters` bounds the optimiser: 5 iterations give most of
the gain over plain min-max (relative error on a random 1024x2048 matrix: INT4 min-max 0.0897, 5 iters
0.0865, 20 iters 0.0861; INT2 0.3932, 0.3716, 0.3709) at about a quarter of the time.

Two departures from calling HQQ once on the whole matrix, both to bound memory and both documented in
quant/README.md:
- Rows are quantized in chunks of at most CHUNK_ELEMENTS weights, so the optimiser's float32
  temporaries (about ten copies of its input) stay a fixed size whatever the matrix. Groups never cross
  rows, so a chunk holds whole groups; the only change is that the optimiser's early stop is decided
  per chunk instead of once for the whole matrix.
- A row whose length is not a multiple of group_size (tiny test models) is padded to whole groups by
  repeating its last value, which leaves the last group's min and max unchanged; padded codes are dropped.

Method "minmax": the same asymmetric grid without the optimiser (Fate's own quantizer). It needs no
hqq install, so benchmarks/bench_kernels.py can run on a GPU machine with only torch and triton.
"""

from __future__ import annotations

import torch

from quant.layout import ExpertLayout
from quant.packing import PackedMatrix, codes_per_word, num_groups, pack_codes

CHUNK_ELEMENTS = 1 << 20  # 1M weights (4 MiB float32) per optimiser call
METHODS = ("hqq", "minmax")


def hqq_available() -> bool:
    try:
        import hqq.core.optimize  # noqa: F401 - the part we call (hqq.core.quantize pulls in torch.compile)
    except Exception:  # an hqq build without its optional parts can fail in many ways
        return False
    return True


def hqq_version() -> str | None:
    try:
        import hqq
    except ImportError:
        return None
    return getattr(hqq, "__version__", "unknown")


DEFAULT_ITERS = 20  # HQQ's own default


def opt_params(iters: int = DEFAULT_ITERS) -> dict:
    """HQQ's optimiser settings (its defaults, with the iteration count as given)."""
    return {"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": iters}


def hqq_settings(iters: int = DEFAULT_ITERS) -> dict:
    """What the manifest records about the quantizer."""
    return {
        "optimizer": "hqq.core.optimize.optimize_weights_proximal_legacy",
        "opt_params": opt_params(iters),
        "early_stop": True,
        "axis": 1,
        "round_zero": False,
        "chunk_elements": CHUNK_ELEMENTS,
    }


def _pad_rows(w: torch.Tensor, group_size: int) -> torch.Tensor:
    cols = w.shape[1]
    padded = num_groups(cols, group_size) * group_size
    if padded == cols:
        return w
    return torch.cat([w, w[:, -1:].expand(-1, padded - cols)], dim=1)


def _quantize_chunk_hqq(w: torch.Tensor, bits: int, group_size: int, iters: int) -> tuple[torch.Tensor, ...]:
    from hqq.core.optimize import optimize_weights_proximal_legacy

    # Quantizer.quantize's steps (hqq 0.2.8, channel_wise=True, axis=1, optimize=True, round_zero=False)
    rows = w.shape[0]
    g = w.float().reshape(-1, group_size)
    lo, hi = g.min(dim=1, keepdim=True)[0], g.max(dim=1, keepdim=True)[0]
    top = round(2**bits - 1)
    denom = hi - lo
    inv_scale = top / denom
    inv_scale = torch.where(denom.abs() <= 1e-4, torch.full_like(inv_scale, 1.0), inv_scale).clamp(max=2e4)
    zero = -lo * inv_scale
    q, inv_scale, zero = optimize_weights_proximal_legacy(
        tensor=g, scale=inv_scale, zero=zero, min_max=[0, top], axis=1, device=g.device, opt_params=opt_params(iters)
    )
    return q.reshape(rows, -1), (1.0 / inv_scale).reshape(rows, -1), zero.reshape(rows, -1)


def _quantize_chunk_minmax(w: torch.Tensor, bits: int, group_size: int, iters: int) -> tuple[torch.Tensor, ...]:
    rows = w.shape[0]
    g = w.reshape(-1, group_size)
    lo, hi = g.min(dim=1, keepdim=True).values, g.max(dim=1, keepdim=True).values
    top = 2**bits - 1
    scale = ((hi - lo) / top).clamp(min=1e-8)
    zero = -lo / scale
    q = torch.round(g / scale + zero).clamp(0, top)
    return q.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)


@torch.inference_mode()
def quantize_matrix(
    w: torch.Tensor, bits: int, group_size: int, method: str = "hqq", iters: int = DEFAULT_ITERS
) -> PackedMatrix:
    """A weight [out, in] (any float dtype, CPU or GPU) -> PackedMatrix on the same device.

    Quantization runs where `w` is: move it to a GPU first to quantize there.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; use one of {METHODS}")
    codes_per_word(bits)  # validates bits
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    chunk_fn = _quantize_chunk_hqq if method == "hqq" else _quantize_chunk_minmax
    groups = num_groups(cols, group_size)
    codes = torch.empty(rows, -(-cols // codes_per_word(bits)), dtype=torch.int32, device=w.device)
    scale = torch.empty(rows, groups, dtype=torch.float16, device=w.device)
    zero = torch.empty(rows, groups, dtype=torch.float16, device=w.device)
    for start in range(0, rows, step):
        chunk = _pad_rows(w[start : start + step].float(), group_size)
        q, s, z = chunk_fn(chunk, bits, group_size, iters)
        codes[start : start + step] = pack_codes(q[:, :cols].to(torch.uint8), bits)
        scale[start : start + step] = s
        zero[start : start + step] = z
        del chunk, q, s, z
    return PackedMatrix(bits, group_size, (rows, cols), codes, scale, zero)


def quantize_expert(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    bits: int,
    group_size: int,
    method: str = "hqq",
    iters: int = DEFAULT_ITERS,
) -> tuple[ExpertLayout, torch.Tensor]:
    """One expert's three matrices -> its layout and its uint8 buffer (on the weights' device), in memory.

    The tier store streams the same bytes matrix by matrix instead (quant/store.py); this is for
    kernels, benchmarks and tests.
    """
    inter, hidden = gate.shape
    layout = ExpertLayout.quantized(hidden, inter, bits, group_size)
    g, u, d = (quantize_matrix(w, bits, group_size, method, iters) for w in (gate, up, down))
    parts = {
        "gate_up.codes": torch.cat([g.codes, u.codes]),
        "gate_up.scale": torch.cat([g.scale, u.scale]),
        "gate_up.zero": torch.cat([g.zero, u.zero]),
        "down.codes": d.codes,
        "down.scale": d.scale,
        "down.zero": d.zero,
    }
    return layout, layout.assemble(parts, gate.device)
