"""Gated DeltaNet linear attention (qwen3_5_moe's linear_attention layers), as transformers computes it.

Per token: a projection to queries, keys and values, a short causal depthwise convolution (silu) over them,
then the gated delta rule on a per-row state S [value heads, key dim, value dim]:
    S <- exp(g) S;  S <- S + k (beta (v - k^T S))^T;  out = q^T S
with q, k L2-normalised (q also scaled by key_dim^-1/2), beta = sigmoid(b(x)) and
g = -exp(A_log) softplus(a(x) + dt_bias). Each key head serves value_heads / key_heads value heads. The output
goes through an RMSNorm gated by silu(z(x)), then out_proj.

Prefill runs the chunked form (64-token chunks, a triangular solve within each chunk, a scan across them),
decode the recurrent one. On CUDA the flash-linear-attention Triton kernels run the delta rule and
causal-conv1d the one-token convolution when those packages are importable; otherwise (and on CPU) plain
PyTorch does (`backend()` says which). The state lives in the cache (linear_state.py): a prefill from
position 0 starts from zero, any later call continues the row's state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fate_cli.model.args import ModelArgs
from fate_cli.model.kv_cache import KVCache, RowPositions
from fate_cli.model.layers import Rotary

CHUNK = 64

try:  # optional CUDA kernels: pip install flash-linear-attention causal-conv1d
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
except ImportError:  # pragma: no cover - depends on the environment
    chunk_gated_delta_rule = fused_recurrent_gated_delta_rule = None
try:
    from causal_conv1d import causal_conv1d_update
except ImportError:  # pragma: no cover
    causal_conv1d_update = None


def backend(device: torch.device) -> str:
    """Which code runs the linear-attention layers on `device`, in words."""
    if device.type == "cuda" and chunk_gated_delta_rule is not None:
        conv = "causal-conv1d" if causal_conv1d_update is not None else "PyTorch"
        return f"linear attention: flash-linear-attention kernels, {conv} convolution"
    return "linear attention: PyTorch (chunked prefill, recurrent decode)"


def prefill_bytes_per_token(args: ModelArgs) -> int:
    """Float32 scratch of one linear-attention layer's chunked prefill, per token: queries, keys, values and
    output at the value heads, the chunk's four [chunk, chunk] matrices per head, the convolution's input."""
    lin = args.linear
    if lin is None:
        return 0
    heads = lin.num_value_heads
    return 4 * (4 * heads * max(lin.key_head_dim, lin.value_head_dim) + 4 * CHUNK * heads + 2 * lin.conv_dim)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta):  # noqa: ANN001, ANN202 - the four [b, t, heads, dim] / [b, t, heads] inputs
    """-> float32 [b, heads, t, ...] with keys and queries repeated to the value heads, normalised, q scaled."""
    groups = v.shape[2] // k.shape[2]
    if groups > 1:
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    q, k, v, g, beta = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                        for x in (q, k, v, g, beta))
    q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def chunked_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepared inputs (see _prepare), state [b, h, dk, dv] -> (out [b, h, t, dv], final state)."""
    t, c = q.shape[2], CHUNK
    pad = (-t) % c
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(x.shape[0], x.shape[1], -1, c, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    cum = g.reshape(g.shape[0], g.shape[1], -1, c).cumsum(dim=-1)  # log of the decay from the chunk's start
    upper = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [.., i, j]
    # within a chunk the delta updates form a unit lower-triangular system (the UT transform)
    system = (k_beta @ k.transpose(-1, -2)) * decay
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_cum = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * decay
    q = q * cum.exp()[..., None]
    k = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    out = torch.zeros_like(values)
    for i in range(values.shape[2]):
        v_new = values[:, :, i] - k_cum[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    return out.reshape(out.shape[0], out.shape[1], -1, out.shape[-1])[:, :, :t], state


def recurrent_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, one token after another (decode)."""
    out = torch.empty_like(v)
    for i in range(q.shape[2]):
        state = state * g[:, :, i].exp()[..., None, None]
        k_i = k[:, :, i, :, None]
        delta = (v[:, :, i] - (state * k_i).sum(dim=-2)) * beta[:, :, i, None]
        state = state + k_i * delta[:, :, None, :]
        out[:, :, i] = (state * q[:, :, i, :, None]).sum(dim=-2)
    return out, state


class GatedRMSNorm(nn.Module):
    """RMSNorm over each value head, then times silu(gate) (the weight is plain, not zero-centred)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (h * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """A linear-attention layer; called like Attention (the rotary table is not used)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        lin = args.linear
        assert lin is not None
        self.index = args.cache_index(layer)  # its layer of the cache's LinearState
        self.k_heads, self.v_heads = lin.num_key_heads, lin.num_value_heads
        self.k_dim, self.v_dim = lin.key_head_dim, lin.value_head_dim
        key, value, conv = lin.num_key_heads * lin.key_head_dim, lin.num_value_heads * lin.value_head_dim, lin.conv_dim
        self.split = [key, key, value]
        h = args.hidden_size
        self.in_proj_qkv = nn.Linear(h, conv, bias=False)
        self.in_proj_z = nn.Linear(h, value, bias=False)
        self.in_proj_b = nn.Linear(h, self.v_heads, bias=False)
        self.in_proj_a = nn.Linear(h, self.v_heads, bias=False)
        self.conv1d = nn.Conv1d(conv, conv, lin.conv_kernel, groups=conv, bias=False, padding=lin.conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.v_heads))
        self.norm = GatedRMSNorm(self.v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(value, h, bias=False)

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache, pos: int | RowPositions) -> torch.Tensor:
        b, t, _ = x.shape
        state = cache.state
        assert state is not None, "a model with linear attention needs the cache made by Transformer.new_cache"
        fresh = not isinstance(pos, RowPositions) and pos == 0  # a new sequence: start from zero
        mixed = self.convolve(self.in_proj_qkv(x).transpose(1, 2), state.conv[self.index], fresh)
        q, k, v = mixed.transpose(1, 2).split(self.split, dim=-1)
        q = q.reshape(b, t, self.k_heads, self.k_dim)
        k = k.reshape(b, t, self.k_heads, self.k_dim)
        v = v.reshape(b, t, self.v_heads, self.v_dim)
        beta = torch.sigmoid(self.in_proj_b(x))
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        ssm = state.ssm[self.index]
        out, final = self.delta_rule(q, k, v, g, beta, None if fresh else ssm, recurrent=t == 1 and not fresh)
        ssm.copy_(final)
        z = self.in_proj_z(x).reshape(b, t, self.v_heads, self.v_dim)
        return self.out_proj(self.norm(out.to(x.dtype), z).reshape(b, t, -1))

    def convolve(self, x: torch.Tensor, window: torch.Tensor, fresh: bool) -> torch.Tensor:
        """Causal depthwise convolution with silu: x [b, channels, t]; `window` [b, channels, kernel - 1] holds
        the row's previous inputs and is advanced in place."""
        weight = self.conv1d.weight
        if x.is_cuda and causal_conv1d_update is not None and x.shape[-1] == 1 and not fresh:
            return causal_conv1d_update(x, window, weight.squeeze(1), None, "silu")
        past = torch.zeros_like(window) if fresh else window
        full = torch.cat((past.to(x.dtype), x), dim=-1)
        window.copy_(full[..., -window.shape[-1]:])
        return F.silu(F.conv1d(full.to(weight.dtype), weight, groups=weight.shape[0])).to(x.dtype)

    def delta_rule(self, q, k, v, g, beta, initial, recurrent):  # noqa: ANN001, ANN201
        """-> (out [b, t, value heads, value dim], final state [b, value heads, key dim, value dim] float32)."""
        b = q.shape[0]
        if q.is_cuda and chunk_gated_delta_rule is not None:
            groups = self.v_heads // self.k_heads
            if groups > 1:
                q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
            kernel = fused_recurrent_gated_delta_rule if recurrent else chunk_gated_delta_rule
            return kernel(q, k, v, g=g, beta=beta, initial_state=initial, output_final_state=True,
                          use_qk_l2norm_in_kernel=True)
        state = (torch.zeros(b, self.v_heads, self.k_dim, self.v_dim, dtype=torch.float32, device=q.device)
                 if initial is None else initial.float())
        rule = recurrent_delta_rule if recurrent else chunked_delta_rule
        out, final = rule(*_prepare(q, k, v, g, beta), state)
        return out.transpose(1, 2), final
