"""Reconstruction error of each quantized tier against the checkpoint's own expert weights.

    python3 benchmarks/quant_errors.py MODEL      # MODEL as for `fate quantize`; needs its tier store

For every expert of every MoE layer and each quantized tier: the relative Frobenius error
||W - dequantize(tier)|| / ||W|| of gate, up and down (float32), summarized per tier and matrix as the
mean and the worst expert, plus the error of the whole expert (all three matrices together).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fate_cli.model.loader import load_args
from quant.kernels import dequantized_weights
from quant.source import SourceReader
from quant.store import TierStore


@dataclass
class TierError:
    tier: str
    label: str
    per_matrix: dict[str, list[float]] = field(default_factory=lambda: {"gate": [], "up": [], "down": [], "expert": []})

    def summary(self) -> dict[str, tuple[float, float]]:
        return {k: (sum(v) / len(v), max(v)) for k, v in self.per_matrix.items() if v}


@torch.inference_mode()
def tier_errors(store: TierStore, model_dir: Path) -> list[TierError]:
    args = load_args(model_dir)
    reader = SourceReader(model_dir)
    out = []
    for name, info in store.tiers.items():
        if info.layout.kind != "quantized":
            continue
        err = TierError(name, info.describe())
        for layer in info.layers:
            for e in range(args.num_experts):
                ref = [reader.get(n).float() for n in args.experts.names(layer, e)]
                got = dequantized_weights(store.read(name, layer, e), info.layout, torch.float32)
                num = den = 0.0
                for key, w, q in zip(("gate", "up", "down"), ref, got):
                    d, n = (w - q).norm().item() ** 2, w.norm().item() ** 2
                    err.per_matrix[key].append((d / n) ** 0.5)
                    num, den = num + d, den + n
                err.per_matrix["expert"].append((num / den) ** 0.5)
        out.append(err)
    return out


def main(argv: list[str]) -> None:
    from fate_cli.engine.stores import default_store_dir
    from fate_cli.registry import resolve

    resolved = resolve(argv[0] if argv else None)
    store = TierStore.open(default_store_dir(resolved.path, resolved.name), resolved.path, name=resolved.name)
    print(f"| tier | matrix | mean rel. error | worst expert |  <!-- {resolved.name} -->")
    print("| --- | --- | ---: | ---: |")
    for err in tier_errors(store, resolved.path):
        for key, (mean, worst) in err.summary().items():
            print(f"| {err.tier} ({err.label}) | {key} | {mean:.4f} | {worst:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
