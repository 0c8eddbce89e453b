"""Expert activations other than the default silu(gate) * up.

gpt-oss's experts apply a clamped SwiGLU: the gate is clamped from above, the up projection on both sides,
the gate's sigmoid has a gain alpha, and the up projection is offset by one. Kept apart from the kernels so
the model, the resident experts and the reference MoE pass compute it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClampedSwiGLU:
    alpha: float
    limit: float

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit)."""
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
