"""Attention with learned sinks and, on sliding layers, a window of recent keys (gpt_oss).

Each head has a learned logit (its sink) that joins the softmax over the keys and is then dropped, so a head
may give less than all of its weight to the keys. Scaled-dot-product kernels have no such term, so the
softmax is written out: queries in chunks, so a long prefill never holds more than a bounded score block.
A sliding layer's keys come from its ring in the KV cache (the last `window` positions, in slot order), each
with its position, so the window and the causal order are one mask over positions.
"""

from __future__ import annotations

import torch
from torch import nn

from fate_cli.model.args import ModelArgs
from fate_cli.model.kv_cache import KVCache, RowPositions
from fate_cli.model.layers import Attention, Rotary

SCORE_BLOCK = 1 << 26  # float32 scores held at once by one chunk of queries (256 MiB)


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                   sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """q [b, H, T, d], k/v [b, KV, L, d], allowed (bool) broadcastable to [b, 1, T, L], sinks [H] -> [b, H, T, d].

    softmax over (the allowed keys' scores, the head's sink), in float32, the sink's share dropped."""
    b, heads, t, d = q.shape
    kv = k.shape[1]
    rep = heads // kv
    qg = q.view(b, kv, rep, t, d)
    kt = k[:, :, None].transpose(-1, -2)  # [b, KV, 1, d, L]: each key head serves its group, no copy
    vg = v[:, :, None]
    mask = allowed[:, :, None]  # [b|1, 1, 1, T, L]
    sink = sinks.float().view(1, kv, rep, 1, 1)
    out = torch.empty(b, kv, rep, t, v.shape[-1], dtype=v.dtype, device=v.device)
    step = max(1, SCORE_BLOCK // max(1, b * heads * k.shape[2]))
    for s in range(0, t, step):
        e = min(t, s + step)
        scores = torch.matmul(qg[:, :, :, s:e], kt).float() * scale
        scores = scores.masked_fill(~mask[..., s:e, :], float("-inf"))
        top = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
        weights = torch.exp(scores - top)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + torch.exp(sink - top))
        out[:, :, :, s:e] = torch.matmul(weights.to(v.dtype), vg)
    return out.view(b, heads, t, -1)


class SinkAttention(Attention):
    """Grouped-query attention with biases, per-head sinks and (sliding layers) a window of keys."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads))
        self.window = args.sliding_window if args.is_sliding_layer(layer) else 0
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache, pos: int | RowPositions) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rope.apply(q, pos), rope.apply(k, pos)
        if isinstance(pos, RowPositions):  # a batch's decode step: each row at its own position
            rows = pos.positions[:, None, None, None]  # [b, 1, 1, 1]
        else:
            rows = (torch.arange(t, device=x.device) + pos)[None, None, :, None]  # [1, 1, T, 1]
        if self.window:  # the query and the window - 1 keys before it, found by the positions the ring holds
            if isinstance(pos, RowPositions):
                keys, values, held = cache.update_window_rows(self.layer, pos, k, v)
            else:
                keys, values, held = cache.update_window(self.layer, pos, k, v)
            held = held[:, None, None, :]  # [b|1, 1, 1, L]
            allowed = (held <= rows) & (held > rows - self.window) & (held >= 0)
        else:
            if isinstance(pos, RowPositions):
                keys, values = cache.update_rows(self.layer, pos, k, v)
            else:
                keys, values = cache.update(self.layer, pos, k, v)
            allowed = torch.arange(keys.shape[2], device=x.device) <= rows
        out = sink_attention(q, keys, values, allowed, self.sinks, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
