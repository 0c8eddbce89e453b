"""fMoE's expert maps: past iterations' router probabilities (layers x experts), found again by similarity.

Each forward step leaves a map: every MoE layer's router probabilities, averaged over the step's tokens,
stored under the request's semantic key. A new step is matched before its first layer by the key
(semantic similarity) and, as layers are observed, by the probabilities seen so far (trajectory
similarity). For the next layer, experts are taken from the best map by descending probability until
their mass reaches 1 - similarity, and never fewer than top-k: a close match prefetches few experts, a
poor one many.

The key is the mean of the first MoE layer's router input over the prompt: the normalised input
embeddings after one attention block, which is what the provider sees of the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CAPACITY = 1024  # maps kept, oldest dropped first


class ExpertMapStore:
    """A ring of the last `capacity` maps and keys in two preallocated tensors: one matmul per match."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int = DEFAULT_CAPACITY):
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity
        self._maps = torch.zeros(capacity, num_layers, num_experts)  # rows of non-MoE layers stay zero
        self._keys: torch.Tensor | None = None  # [capacity, key size], allocated at the first key
        self._count = 0  # maps ever added; slot i % capacity holds the i-th

    def __len__(self) -> int:
        return min(self._count, self.capacity)

    @property
    def maps(self) -> torch.Tensor:
        """The stored maps, oldest first [len, layers, experts]."""
        n, head = len(self), self._count % self.capacity
        return self._maps[:n] if self._count <= self.capacity else torch.roll(self._maps, -head, dims=0)

    def add(self, key: torch.Tensor, expert_map: torch.Tensor) -> None:
        key = F.normalize(key.float().flatten().cpu(), dim=0)
        if self._keys is None:
            self._keys = torch.zeros(self.capacity, key.numel())
        slot = self._count % self.capacity
        self._keys[slot] = key
        self._maps[slot] = expert_map.float().cpu()
        self._count += 1

    def semantic_match(self, key: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        if not len(self):
            return None
        sims = self._keys[: len(self)] @ F.normalize(key.float().flatten().cpu(), dim=0)
        return self._best(sims)

    def trajectory_match(self, observed: dict[int, torch.Tensor]) -> tuple[torch.Tensor, float] | None:
        """observed: layer -> probabilities seen this step; cosine over the concatenated rows."""
        if not len(self) or not observed:
            return None
        layers = sorted(observed)
        seen = F.normalize(torch.cat([observed[layer].float().cpu() for layer in layers]), dim=0)
        past = F.normalize(self._maps[: len(self), layers].flatten(1), dim=1)
        return self._best(past @ seen)

    def _best(self, sims: torch.Tensor) -> tuple[torch.Tensor, float]:
        best = int(sims.argmax())
        return self._maps[best].clone(), float(sims[best].clamp(0, 1))


def experts_by_mass(probs: torch.Tensor, similarity: float, top_k: int) -> list[int]:
    """Experts by descending probability until their mass reaches 1 - similarity; at least top_k."""
    values, order = torch.sort(probs.float(), descending=True)
    mass = torch.cumsum(values, 0)
    total = float(mass[-1]) if len(mass) else 0.0
    target = (1.0 - similarity) * total
    needed = int((mass < target).sum()) + 1
    return [int(e) for e in order[: max(top_k, min(needed, len(order)))]]
