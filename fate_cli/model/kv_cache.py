"""A preallocated key/value cache: static buffers written in place at the current position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fate_cli.model.linear_state import LinearState


@dataclass(frozen=True)
class RowPositions:
    """The position of each row in one decode step of a batch whose rows have different lengths."""

    positions: torch.Tensor  # [batch] long, on the cache's device
    end: int  # max(positions) + 1: the key range the step attends over
    mask: torch.Tensor | None = None  # the attention mask, when the caller made it once for every layer

    @classmethod
    def of(cls, positions: list[int], device: torch.device) -> RowPositions:
        return cls(torch.tensor(positions, dtype=torch.long, device=device), max(positions) + 1)

    def attention_mask(self) -> torch.Tensor:
        """[batch, 1, 1, end]: each row sees the keys up to its own position."""
        if self.mask is not None:
            return self.mask
        cols = torch.arange(self.end, device=self.positions.device)
        return (cols[None, :] <= self.positions[:, None])[:, None, None, :]


class KVCache:
    """Keys and values of every attention layer, [layers, batch, kv_heads, max_len, head_dim], allocated once;
    with linear-attention layers, their recurrent state beside them (`state`, set by Transformer.new_cache)."""

    state: LinearState | None = None

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + (self.state.nbytes if self.state is not None else 0)

    def update(
        self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([batch, kv_heads, T, head_dim]) at positions pos..pos+T; return all keys so far."""
        end = pos + k.shape[2]
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_rows(
        self, layer: int, at: RowPositions, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row (k, v [batch, kv_heads, 1, head_dim]), each written at its row's position."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[layer, rows, :, at.positions] = k[:, :, 0]
        self.v[layer, rows, :, at.positions] = v[:, :, 0]
        return self.k[layer, :, :, : at.end], self.v[layer, :, :, : at.end]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start..stop of this one, sharing its memory (to prefill one prompt of a batch)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.max_len = self.k[:, start:stop], self.v[:, start:stop], self.max_len
        view.state = self.state.rows(start, stop) if self.state is not None else None
        return view
