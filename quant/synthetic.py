"""A tier store of random experts at a real model's shape, made in memory: no checkpoint, no disk.

`fate bench synthetic:...` and `replay:...` use it to move and multiply experts of Mixtral's or Qwen3's
size where no such checkpoint can be downloaded. The bytes moved and the kernels run are those of the
real shape; the values are random, so every report names these runs synthetic or replay.

A few distinct random experts are made per tier and each (layer, expert) reads one of them in turn:
generating 30 GB of random bytes would take longer than the benchmark, and the copy engine and the
kernels do not care which bytes they move. The host tier still copies each one into its own buffer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from quant.layout import ExpertLayout
from quant.packing import codes_per_word
from quant.store import QuantParams, TierInfo

DISTINCT_EXPERTS = 4
BIAS_STD = 0.1  # expert biases, where the layout has them: small offsets beside outputs of std ~1


def _random_biases(layout: ExpertLayout, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if layout.bias is None:
        return {}
    dtype = getattr(torch, layout.bias)
    return {name: (torch.randn(layout.segment(name).shape, generator=gen) * BIAS_STD).to(dtype)
            for name in ("gate_up.bias", "down.bias")}


def random_quantized(layout: ExpertLayout, gen: torch.Generator) -> torch.Tensor:
    """Random codes with scales and zeros that give weights of std ~1/sqrt(fan_in), like a trained layer."""
    parts = {}
    levels = 2**layout.bits - 1
    used_bits = codes_per_word(layout.bits) * layout.bits
    for prefix, fan_in in (("gate_up", layout.hidden), ("down", layout.intermediate)):
        codes = layout.segment(f"{prefix}.codes")
        words = torch.randint(-(2**31), 2**31 - 1, codes.shape, generator=gen, dtype=torch.int32)
        if used_bits < 32:  # INT3 keeps the two high bits of each word zero
            words &= (1 << used_bits) - 1
        parts[f"{prefix}.codes"] = words
        shape = layout.segment(f"{prefix}.scale").shape
        code_std = math.sqrt(((levels + 1) ** 2 - 1) / 12)  # codes uniform on 0..levels
        parts[f"{prefix}.scale"] = torch.full(shape, 1 / (code_std * math.sqrt(fan_in)), dtype=torch.float16)
        parts[f"{prefix}.zero"] = torch.full(shape, levels / 2, dtype=torch.float16)
    return layout.assemble(parts | _random_biases(layout, gen))


def random_dense(layout: ExpertLayout, gen: torch.Generator) -> torch.Tensor:
    dtype = getattr(torch, layout.dtype)
    parts = {
        name: (torch.randn(layout.segment(name).shape, generator=gen) / math.sqrt(fan_in)).to(dtype)
        for name, fan_in in (("gate_up", layout.hidden), ("down", layout.intermediate))
    }
    return layout.assemble(parts | _random_biases(layout, gen))


class SyntheticStore:
    """Reads like a TierStore (tiers, manifest params, read) over random experts of the given shape."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        moe_layers: Sequence[int],
        num_experts: int,
        params: QuantParams | None = None,
        dense_dtype: str = "bfloat16",
        seed: int = 0,
        name: str = "synthetic",
        bias: bool = False,
    ):
        """bias: every expert has biases (gpt_oss), kept at 16 bits (dense_dtype) in every tier."""
        params = params or QuantParams()
        b = dense_dtype if bias else None
        layers = tuple(moe_layers)
        self.name, self.num_experts = name, num_experts
        self.manifest = {"params": params.to_json()}
        self.tiers = {
            "hot": TierInfo("hot", ExpertLayout.quantized(hidden, intermediate, params.hot_bits,
                                                          params.hot_group_size, b), layers),
            "cold": TierInfo("cold", ExpertLayout.quantized(hidden, intermediate, params.cold_bits,
                                                            params.cold_group_size, b), layers),
            # every layer, so a budget that holds the whole model at 16 bits can run it that way
            "dense": TierInfo("dense", ExpertLayout.dense(hidden, intermediate, dense_dtype, b), layers),
        }
        gen = torch.Generator().manual_seed(seed)
        self._experts = {
            tier: [
                (random_quantized if info.layout.kind == "quantized" else random_dense)(info.layout, gen)
                for _ in range(DISTINCT_EXPERTS)
            ]
            for tier, info in self.tiers.items()
        }

    def read(self, tier: str, layer: int, expert: int) -> torch.Tensor:
        if layer not in self.tiers[tier].layers:
            raise KeyError(f"the synthetic store has no {tier} tier for layer {layer}")
        return self._experts[tier][(layer * self.num_experts + expert) % DISTINCT_EXPERTS]
