"""Layers shared by every family: RMSNorm, rotary embedding, grouped-query attention, dense MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fate_cli.model import triton_ops
from fate_cli.model.args import ModelArgs, YarnRope
from fate_cli.model.kv_cache import KVCache, RowPositions
from fate_cli.model.rope_scaling import yarn_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_ops.usable(x):
            return triton_ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class OffsetRMSNorm(RMSNorm):
    """RMSNorm scaled by (1 + weight) in float32, its weight stored zero-centred (qwen3_5_moe)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(args: ModelArgs, dim: int) -> RMSNorm:
    """The family's RMSNorm over `dim`."""
    return OffsetRMSNorm(dim, args.rms_norm_eps) if args.norm_offset else RMSNorm(dim, args.rms_norm_eps)


class Rotary:
    """RoPE (default, or YaRN-scaled): cos/sin tables for every position, computed once in float32. Built over
    fewer dimensions than the head (partial rotary), it turns the head's first dimensions and passes the rest."""

    def __init__(self, head_dim: int, theta: float, max_len: int, device: torch.device | str,
                 yarn: YarnRope | None = None):
        if yarn is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        else:
            inv_freq, scale = yarn_frequencies(head_dim, theta, yarn)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1).to(device)
        self.cos, self.sin = emb.cos(), emb.sin()
        if yarn is not None:
            self.cos, self.sin = self.cos * scale, self.sin * scale

    def apply(self, x: torch.Tensor, pos: int | RowPositions) -> torch.Tensor:
        """x: [batch, heads, T, head_dim], positions pos..pos+T (or one token per row at its own position)."""
        rot = self.cos.shape[-1]
        if x.shape[-1] > rot:
            return torch.cat((self.apply(x[..., :rot], pos), x[..., rot:]), dim=-1)
        if isinstance(pos, RowPositions):
            if x.is_cuda and x.shape[2] == 1 and x.stride(-1) == 1 and triton_ops.available():
                return triton_ops.rope_rows(x, self.cos, self.sin, pos.positions)
            cos = self.cos[pos.positions][:, None, None, :].to(x.dtype)
            sin = self.sin[pos.positions][:, None, None, :].to(x.dtype)
        else:
            t = x.shape[2]
            cos = self.cos[pos : pos + t].to(x.dtype)
            sin = self.sin[pos : pos + t].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = args.cache_index(layer)  # its layer of the KV cache
        self.n_heads, self.n_kv, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        bias = args.attention_bias
        self.output_gate = args.attn_output_gate  # q_proj's rows: per head, the query then its gate
        self.q_proj = nn.Linear(args.hidden_size, 2 * q_dim if self.output_gate else q_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, kv_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, args.hidden_size, bias=args.o_proj_bias)
        self.qk_norm = args.qk_norm
        if args.qk_norm == "head":
            self.q_norm = make_norm(args, self.head_dim)
            self.k_norm = make_norm(args, self.head_dim)
        elif args.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(kv_dim, args.rms_norm_eps)
        self.clip = args.clip_qkv

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache, pos: int | RowPositions) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        gate = None
        if self.output_gate:
            q, gate = q.view(b, t, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
            q, gate = q.reshape(b, t, -1), gate.reshape(b, t, -1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rope.apply(q, pos), rope.apply(k, pos)
        if isinstance(pos, RowPositions):  # a batch's decode step: each row sees its own keys only
            keys, values = cache.update_rows(self.layer, pos, k, v)
            mask, causal = pos.attention_mask(), False
        else:
            keys, values = cache.update(self.layer, pos, k, v)
            if t == 1:
                mask, causal = None, False  # one query attends to every cached position
            elif pos == 0:
                mask, causal = None, True
            else:  # a chunk after cached positions: query i sees keys up to pos + i
                rows = torch.arange(t, device=x.device)[:, None] + pos
                mask, causal = torch.arange(pos + t, device=x.device)[None, :] <= rows, False
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads
        )
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out if gate is None else out * torch.sigmoid(gate))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and qwen2_moe's shared expert."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
