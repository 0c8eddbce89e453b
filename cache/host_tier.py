"""The host tier: every expert's buffer of each tier in host memory, allocated and filled once.

On a CUDA machine the buffers are pinned (page-locked), so each expert reaches the GPU in one
copy at full PCIe speed (pageable memory moves at a sixth of it). Before pinning, available RAM is
checked; what does not fit stays in the store on disk and is read when needed, and the user is told.
Each layer's buffer is locked on its own, so a system that locks only part of a large model's tiers keeps
the rest pageable, and the user is told how much was locked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cache.budget import format_size
from cache.host_memory import available_ram
from quant.store import TierStore

RAM_HEADROOM = 2 * 1024**3  # left to the OS, the process and its activations


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
        # per tier, one buffer per layer [experts, bytes] (what the CPU kernels read as one arena)
        self.buffers: dict[str, list[torch.Tensor]] = {}
        self.held: dict[str, int] = {}  # experts held in RAM per tier (the first ones, in layer order)
        budget = (available_ram() - RAM_HEADROOM) if ram_limit is None else ram_limit
        self.notes: list[str] = []
        self._locking = pin  # page-locking goes on until the system first refuses
        for tier in tiers:
            nbytes = store.tiers[tier].layout.nbytes
            wanted = len(layers) * num_experts
            fits = max(0, min(wanted, budget // nbytes))
            budget -= fits * nbytes
            chunks, locked = [], 0
            for i, layer in enumerate(layers):
                rows = max(0, min(num_experts, fits - i * num_experts))
                buf, pinned = self._allocate(rows, nbytes)
                locked += buf.nbytes if pinned else 0
                for e in range(rows):
                    buf[e] = store.read(tier, layer, e)
                chunks.append(buf)
            self.buffers[tier], self.held[tier] = chunks, fits
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
        """One layer's buffer, and whether it is page-locked: locked while the system allows it. It may refuse to
        lock that much (a locked-memory limit, or the driver's own): from then on buffers stay in pageable memory,
        which still works but moves to the GPU several times slower."""
        if self._locking and rows:
            try:
                return torch.empty((rows, nbytes), dtype=torch.uint8, pin_memory=True), True
            except RuntimeError as err:  # torch raises "CUDA error: out of memory" for a refused page lock
                if "out of memory" not in str(err).lower():
                    raise
                self._locking = False
        return torch.empty((rows, nbytes), dtype=torch.uint8), False

    def get(self, tier: str, layer: int, expert: int) -> torch.Tensor:
        i = self.index[layer]
        if i * self.num_experts + expert < self.held[tier]:
            return self.buffers[tier][i][expert]
        return self.store.read(tier, layer, expert)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for chunks in self.buffers.values() for b in chunks)
