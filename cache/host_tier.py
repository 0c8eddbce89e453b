"""The host tier: every expert's buffer of each tier in host memory, allocated and filled once.

On a CUDA machine the buffers are pinned (page-locked), so each expert reaches the GPU in one
copy at full PCIe speed (pageable memory moves at a sixth of it). Before pinning, available RAM is
checked; what does not fit stays in the store on disk and is read when needed, and the user is told.
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
        self.buffers: dict[str, torch.Tensor] = {}
        self.held: dict[str, int] = {}  # experts held in RAM per tier (the first ones, in layer order)
        budget = (available_ram() - RAM_HEADROOM) if ram_limit is None else ram_limit
        self.notes: list[str] = []
        for tier in tiers:
            nbytes = store.tiers[tier].layout.nbytes
            wanted = len(layers) * num_experts
            fits = max(0, min(wanted, budget // nbytes))
            budget -= fits * nbytes
            buf = self._allocate(tier, fits, nbytes, pin and fits > 0)
            for layer in layers:
                for e in range(num_experts):
                    row = self.index[layer] * num_experts + e
                    if row < fits:
                        buf[row] = store.read(tier, layer, e)
            self.buffers[tier], self.held[tier] = buf, fits
            if fits < wanted:
                self.notes.append(
                    f"host RAM holds {fits} of {wanted} {tier} experts ({format_size(fits * nbytes)}); "
                    "the rest are read from the tier store on disk when needed"
                )

    def _allocate(self, tier: str, rows: int, nbytes: int, pin: bool) -> torch.Tensor:
        """The tier's buffer, page-locked where asked. The system may refuse to lock that much (a locked-memory
        limit, or the driver's own): then the tier stays in pageable memory, which still works but moves to
        the GPU several times slower, and the user is told."""
        if pin:
            try:
                return torch.empty((rows, nbytes), dtype=torch.uint8, pin_memory=True)
            except RuntimeError as err:  # torch raises "CUDA error: out of memory" for a refused page lock
                if "out of memory" not in str(err).lower():
                    raise
                self.pin = False  # what the panel shows
                self.notes.append(
                    f"could not page-lock {format_size(rows * nbytes)} of host memory for the {tier} experts; they "
                    "stay in pageable memory, which copies to the GPU several times slower"
                )
        return torch.empty((rows, nbytes), dtype=torch.uint8)

    def get(self, tier: str, layer: int, expert: int) -> torch.Tensor:
        row = self.index[layer] * self.num_experts + expert
        if row < self.held[tier]:
            return self.buffers[tier][row]
        return self.store.read(tier, layer, expert)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())
