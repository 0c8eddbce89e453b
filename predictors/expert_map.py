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
    def __init__(self, num_layers: int, num_experts: int, capacity: int = DEFAULT_CAPACITY):
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity
        self.keys: list[torch.Tensor] = []
        self.maps: list[torch.Tensor] = []  # [num_layers, num_experts] float32, rows of non-MoE layers zero

    def __len__(self) -> int:
        return len(self.maps)

    def add(self, key: torch.Tensor, expert_map: torch.Tensor) -> None:
        self.keys.append(F.normalize(key.float().flatten(), dim=0).cpu())
        self.maps.append(expert_map.float().cpu())
        if len(self.maps) > self.capacity:
            self.keys.pop(0)
            self.maps.pop(0)

    def semantic_match(self, key: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        if not self.maps:
            return None
        sims = torch.stack(self.keys) @ F.normalize(key.float().flatten().cpu(), dim=0)
        best = int(sims.argmax())
        return self.maps[best], float(sims[best].clamp(0, 1))

    def trajectory_match(self, observed: dict[int, torch.Tensor]) -> tuple[torch.Tensor, float] | None:
        """observed: layer -> probabilities seen this step; cosine over the concatenated rows."""
        if not self.maps or not observed:
            return None
        layers = sorted(observed)
        seen = F.normalize(torch.cat([observed[layer].float().cpu() for layer in layers]), dim=0)
        past = F.normalize(torch.stack([m[layers].flatten() for m in self.maps]), dim=1)
        sims = past @ seen
        best = int(sims.argmax())
        return self.maps[best], float(sims[best].clamp(0, 1))


def experts_by_mass(probs: torch.Tensor, similarity: float, top_k: int) -> list[int]:
    """Experts by descending probability until their mass reaches 1 - similarity; at least top_k."""
    values, order = torch.sort(probs.float(), descending=True)
    mass = torch.cumsum(values, 0)
    total = float(mass[-1]) if len(mass) else 0.0
    target = (1.0 - similarity) * total
    needed = int((mass < target).sum()) + 1
    return [int(e) for e in order[: max(top_k, min(needed, len(order)))]]
