"""The host tier: every expert's buffer of each tier in host memory, allocated and filled once.

On a CUDA machine the buffers are pinned (page-locked), so each expert reaches the GPU in one
copy at full PCIe speed (pageable memory moves at a sixth of it). Before pinning, available RAM is
checked; what does not fit stays in the store on disk and is read when needed, and the user is told.
A tier is locked in chunks of rows, each a power of two in bytes (what torch's pinned allocator hands out
whatever the request), so a system that locks only part of a large model's tiers keeps the rest pageable,
and the user is told how much was locked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cache.budget import format_size
from cache.host_memory import available_ram
from quant.store import TierStore

RAM_HEADROOM = 2 * 1024**3  # left to the OS, the process and its activations


CHUNK_BYTES = 1 << 30  # page-locked in pieces of at most this, each a power of two


class HostTier:
    def __init__(
        self,
        store: TierStore,
        layers: Sequence[int],
        num_experts: int,
        tiers: Sequence[str],
        pin: bool,
        ram_limit: int | None = None,
    ):
        self.store, self.num_experts, self.pin = store, num_experts, pin
        self.index = {layer: i for i, layer in enumerate(layers)}
        # per tier: chunks of rows (experts in layer order) and the rows a chunk holds
        self.buffers: dict[str, list[torch.Tensor]] = {}
        self.rows_per_chunk: dict[str, int] = {}
        self.held: dict[str, int] = {}  # experts held in RAM per tier (the first ones, in layer order)
        budget = (available_ram() - RAM_HEADROOM) if ram_limit is None else ram_limit
        self.notes: list[str] = []
        self._locking = pin  # page-locking goes on until the system first refuses
        for tier in tiers:
            nbytes = store.tiers[tier].layout.nbytes
            wanted = len(layers) * num_experts
            fits = max(0, min(wanted, budget // nbytes))
            budget -= fits * nbytes
            per_chunk = max(1, chunk_bytes(fits * nbytes) // nbytes)
            chunks, locked = [], 0
            for first in range(0, fits, per_chunk):
                rows = min(per_chunk, fits - first)
                buf, pinned = self._allocate(rows, nbytes)
                locked += buf.nbytes if pinned else 0
                for r in range(rows):
                    layer, e = divmod(first + r, num_experts)
                    buf[r] = store.read(tier, layers[layer], e)
                chunks.append(buf)
            self.buffers[tier], self.rows_per_chunk[tier], self.held[tier] = chunks, per_chunk, fits
            if pin and locked < fits * nbytes:
                self.pin = False  # what the panel shows: some of the tier copies at pageable speed
                self.notes.append(
                    f"the system page-locked {format_size(locked)} of {format_size(fits * nbytes)} of host memory "
                    f"for the {tier} experts; the rest stays pageable, which copies to the GPU several times slower"
                )
            if fits < wanted:
                self.notes.append(
                    f"host RAM holds {fits} of {wanted} {tier} experts ({format_size(fits * nbytes)}); "
                    "the rest are read from the tier store on disk when needed"
                )

    def _allocate(self, rows: int, nbytes: int) -> tuple[torch.Tensor, bool]:
        """One chunk's buffer, and whether it is page-locked: locked while the system allows it. It may refuse to
        lock that much (a locked-memory limit, or the driver's own): from then on chunks stay in pageable memory,
        which still works but moves to the GPU several times slower."""
        if self._locking:
            try:
                return torch.empty((rows, nbytes), dtype=torch.uint8, pin_memory=True), True
            except RuntimeError as err:  # torch raises "CUDA error: out of memory" for a refused page lock
                if "out of memory" not in str(err).lower():
                    raise
                self._locking = False
        return torch.empty((rows, nbytes), dtype=torch.uint8), False

    def get(self, tier: str, layer: int, expert: int) -> torch.Tensor:
        row = self.index[layer] * self.num_experts + expert
        if row < self.held[tier]:
            chunk, r = divmod(row, self.rows_per_chunk[tier])
            return self.buffers[tier][chunk][r]
        return self.store.read(tier, layer, expert)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for chunks in self.buffers.values() for b in chunks)


def chunk_bytes(total: int) -> int:
    """The size of the tier's chunks: torch's pinned allocator rounds a request up to a power of two (a 64 GB tier
    asked in one piece would lock 128 GB, or be refused), so chunks are powers of two, of at most CHUNK_BYTES."""
    return min(CHUNK_BYTES, 1 << max(0, total - 1).bit_length())
