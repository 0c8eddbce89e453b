"""A preallocated key/value cache: static buffers written in place at the current position.

Full-attention layers keep every position. Sliding-window layers (gpt_oss) read only the last `window`
keys, so they keep only those: a ring of min(window, max_len) slots per row, position p at slot p % ring.
A ring cannot be cut back to an earlier position (the slots a later token overwrote are gone), so, like
linear-attention state, a caller that wants to continue from an earlier point restores a snapshot taken
there (`snapshot` / `restore`) or prefills again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fate_cli.model.args import ModelArgs
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


@dataclass
class Carried:
    """A copy of what a cache holds that cannot be cut back: linear-attention state and the sliding rings."""

    state: LinearState | None
    ring_k: torch.Tensor | None
    ring_v: torch.Tensor | None


class KVCache:
    """Keys and values of every attention layer, allocated once: full layers' in k, v [full layers, batch,
    kv_heads, max_len, head_dim], sliding layers' in ring_k, ring_v [sliding layers, batch, kv_heads, ring,
    head_dim]. A layer is named by its index among the attention layers (ModelArgs.cache_index); with
    linear-attention layers, their recurrent state beside them (`state`)."""

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
        sliding: Sequence[bool] = (),
        window: int = 0,
    ):
        """sliding: per attention layer, whether it keeps only the last `window` positions."""
        sliding = tuple(sliding) or (False,) * num_layers
        if len(sliding) != num_layers or (any(sliding) and window < 1):
            raise ValueError(f"sliding must name each of {num_layers} layers, and a window of at least 1 be given")
        self.batch, self.max_len, self.window = batch, max_len, window
        self.ring = min(window, max_len) if any(sliding) else 0
        counts = [0, 0]
        self.slot: list[tuple[bool, int]] = []  # per attention layer: (sliding, its index in k or ring_k)
        for s in sliding:
            self.slot.append((s, counts[s]))
            counts[s] += 1
        full = (counts[0], batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(full, dtype=dtype, device=device)
        self.v = torch.zeros(full, dtype=dtype, device=device)
        ring = (counts[1], batch, num_kv_heads, self.ring, head_dim)
        self.ring_k = torch.zeros(ring, dtype=dtype, device=device)
        self.ring_v = torch.zeros(ring, dtype=dtype, device=device)
        self.ring_cols = torch.arange(self.ring, device=device)

    @classmethod
    def for_model(cls, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str) -> KVCache:
        """The cache a model's layers use: rings for its sliding layers, its linear-attention state."""
        layers = args.attention_layer_ids
        cache = cls(len(layers), batch, args.num_kv_heads, max_len, args.head_dim, dtype, device,
                    [args.is_sliding_layer(i) for i in layers], args.sliding_window)
        if args.linear is not None:
            cache.state = LinearState.empty(args, batch, dtype, device)
        return cache

    @staticmethod
    def planned_bytes(args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype) -> int:
        """The bytes `for_model` allocates, from the shapes alone (what the budget planner reserves)."""
        layers = args.attention_layer_ids
        sliding = sum(args.is_sliding_layer(i) for i in layers)
        positions = (len(layers) - sliding) * max_len + sliding * min(args.sliding_window, max_len)
        size = torch.finfo(dtype).bits // 8
        kv = 2 * positions * args.num_kv_heads * args.head_dim * size
        return batch * (kv + LinearState.bytes_per_row(args, dtype))

    @property
    def nbytes(self) -> int:
        rings = self.ring_k.nbytes + self.ring_v.nbytes
        return self.k.nbytes + self.v.nbytes + rings + (self.state.nbytes if self.state is not None else 0)

    @property
    def truncatable(self) -> bool:
        """Whether continuing from an earlier position needs nothing restored (no ring, no linear state)."""
        return self.state is None and self.ring_k.shape[0] == 0

    def _full(self, layer: int) -> int:
        sliding, index = self.slot[layer]
        assert not sliding, "a sliding layer's keys are read through update_window"
        return index

    def _ring(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        sliding, index = self.slot[layer]
        assert sliding, "a full layer's keys are read through update"
        return self.ring_k[index], self.ring_v[index]

    def update(
        self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([batch, kv_heads, T, head_dim]) at positions pos..pos+T; return all keys so far."""
        layer, end = self._full(layer), pos + k.shape[2]
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_rows(
        self, layer: int, at: RowPositions, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row (k, v [batch, kv_heads, 1, head_dim]), each written at its row's position."""
        layer = self._full(layer)
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[layer, rows, :, at.positions] = k[:, :, 0]
        self.v[layer, rows, :, at.positions] = v[:, :, 0]
        return self.k[layer, :, :, : at.end], self.v[layer, :, :, : at.end]

    def update_window(
        self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A sliding layer's T new keys at pos..pos+T -> (keys, values, each key's position [1, L]) that the new
        queries may need, then the ring keeps the last positions. A key whose position is negative is empty.

        One token is written first and the ring read whole (the slot it takes held the position that just left
        the window); a chunk is read after the ring's keys, which its first queries still need, and then
        written: at most the last `ring` of its positions, wrapping around."""
        rk, rv = self._ring(layer)
        t, ring = k.shape[2], self.ring
        if t == 1:
            rk[:, :, pos % ring] = k[:, :, 0]
            rv[:, :, pos % ring] = v[:, :, 0]
            return rk, rv, (pos - (pos - self.ring_cols) % ring)[None]
        new = torch.arange(pos, pos + t, device=k.device)
        if pos == 0:
            keys, values, positions = k, v, new
        else:  # slot s holds the latest position before pos that is s modulo the ring
            held = (pos - 1) - (pos - 1 - self.ring_cols) % ring
            keys, values, positions = torch.cat((rk, k), 2), torch.cat((rv, v), 2), torch.cat((held, new))
        kept = min(t, ring)
        slots = new[t - kept:] % ring
        rk[:, :, slots] = k[:, :, t - kept:]
        rv[:, :, slots] = v[:, :, t - kept:]
        return keys, values, positions[None]

    def update_window_rows(
        self, layer: int, at: RowPositions, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row into a sliding layer's ring, at its row's position modulo the ring -> the whole
        ring and each slot's position per row [batch, ring]. Computed on the device: a captured step's
        positions live in a tensor."""
        rk, rv = self._ring(layer)
        rows = torch.arange(k.shape[0], device=k.device)
        p = at.positions
        slots = p % self.ring
        rk[rows, :, slots] = k[:, :, 0]
        rv[rows, :, slots] = v[:, :, 0]
        return rk, rv, p[:, None] - (p[:, None] - self.ring_cols) % self.ring

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start..stop of this one, sharing its memory (to prefill one prompt of a batch)."""
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.batch = stop - start
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.ring_k, view.ring_v = self.ring_k[:, start:stop], self.ring_v[:, start:stop]
        view.state = self.state.rows(start, stop) if self.state is not None else None
        return view

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row `src`'s first `length` positions (its whole ring and state) into row `dst` (a batch compacting)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        self.ring_k[:, dst] = self.ring_k[:, src]
        self.ring_v[:, dst] = self.ring_v[:, src]
        if self.state is not None:
            self.state.copy_row(src, dst)

    def snapshot(self, device: torch.device | str | None = None) -> Carried:
        """A copy of the rings and linear state (on `device`, e.g. host memory) to continue from this point later
        (full layers' keys need no copy: later positions only overwrite later slots)."""
        state = self.state.snapshot(device) if self.state is not None else None
        if self.ring_k.shape[0] == 0:
            return Carried(state, None, None)
        return Carried(state, self.ring_k.to(device, copy=True), self.ring_v.to(device, copy=True))

    def restore(self, saved: Carried) -> None:
        """Put a snapshot back, in place (a captured step keeps pointing at these buffers)."""
        if saved.state is not None:
            self.state.restore(saved.state)
        if saved.ring_k is not None:
            self.ring_k.copy_(saved.ring_k)
            self.ring_v.copy_(saved.ring_v)
