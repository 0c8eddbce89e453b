"""What every policy reports: hits and misses, prediction precision and recall, bytes moved, stalls, and the
misses computed on the CPU (a hybrid cache), per run and per layer."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    predicted: int = 0  # experts predicted for this layer
    predicted_used: int = 0  # ... that the router then picked
    used: int = 0  # experts the router picked, on steps with a prediction
    cpu_experts: int = 0  # misses computed on the CPU from the host tier (each also counted a miss)
    cpu_seconds: float = 0.0  # host time of those products (the layer input to the host and back included)
    bytes_moved: int = 0
    stall_seconds: float = 0.0  # time compute waited for this layer's copies

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    @property
    def precision(self) -> float | None:
        return self.predicted_used / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.predicted_used / self.used if self.used else None


@dataclass
class CacheStats:
    layers: dict[int, LayerStats] = field(default_factory=lambda: defaultdict(LayerStats))
    decode_layers: dict[int, LayerStats] = field(default_factory=lambda: defaultdict(LayerStats))  # 1-token steps
    bytes_moved: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    loads: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    prefetches: int = 0
    stall_seconds: float = 0.0  # time compute waited for copies: CUDA event pairs on a GPU, host time on CPU
    stall_waits: int = 0  # waits that found their copy still running
    costs: dict | None = None  # a hybrid cache's cost model (cache/cost_model.py Costs.as_dict)
    # the decode step's host part (fate_cli/engine/decode_step.py: each cut layer's routing to the policy, the
    # bookkeeping and copies queued, the host's experts; the device idles through it), and the steps it ran in
    decode_host_seconds: float = 0.0
    decode_host_steps: int = 0

    def hit(self, layer: int) -> None:
        self.layers[layer].hits += 1

    def miss(self, layer: int) -> None:
        self.layers[layer].misses += 1

    def moved(self, tier: str, nbytes: int, layer: int | None = None) -> None:
        self.bytes_moved[tier] += nbytes
        self.loads[tier] += 1
        if layer is not None:
            self.layers[layer].bytes_moved += nbytes

    def decode_host(self, seconds: float) -> None:
        self.decode_host_seconds += seconds
        self.decode_host_steps += 1

    def on_cpu(self, layer: int, experts: int, seconds: float) -> None:
        s = self.layers[layer]
        s.cpu_experts += experts
        s.cpu_seconds += seconds

    @property
    def cpu_experts(self) -> int:
        return sum(s.cpu_experts for s in self.layers.values())

    @property
    def cpu_seconds(self) -> float:
        return sum(s.cpu_seconds for s in self.layers.values())

    def prediction(self, layer: int, predicted: set[int], used: set[int], one_token: bool) -> None:
        for s in (self.layers[layer], self.decode_layers[layer]) if one_token else (self.layers[layer],):
            s.predicted += len(predicted)
            s.predicted_used += len(predicted & used)
            s.used += len(used)

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self.layers.values())

    @property
    def misses(self) -> int:
        return sum(s.misses for s in self.layers.values())

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def _mean(self, attr: str, layers: dict[int, LayerStats] | None = None) -> float | None:
        layers = self.layers if layers is None else layers
        values = [getattr(s, attr) for s in layers.values() if getattr(s, attr) is not None]
        return sum(values) / len(values) if values else None

    @property
    def decode_recall(self) -> float | None:
        """Mean over layers of the prediction recall on one-token steps (comparable with per-token recall)."""
        return self._mean("recall", self.decode_layers)

    def as_dict(self) -> dict:
        return {
            "hit_rate": self.hit_rate,
            "hits": self.hits,
            "misses": self.misses,
            "prediction_precision": self._mean("precision"),
            "prediction_recall": self._mean("recall"),
            "decode_prediction_recall": self.decode_recall,
            "decode_predicted": sum(s.predicted for s in self.decode_layers.values()),  # 0: none made
            "bytes_moved": dict(self.bytes_moved),
            "loads": dict(self.loads),
            "prefetches": self.prefetches,
            "stall_seconds": self.stall_seconds,
            "stall_waits": self.stall_waits,
            "link_wait_seconds": self.stall_seconds,
            "cpu_experts": self.cpu_experts,
            "cpu_seconds": self.cpu_seconds,
            "decode_host_seconds": self.decode_host_seconds,
            "decode_host_steps": self.decode_host_steps,
            **({"cost_model": self.costs} if self.costs else {}),
            "per_layer": {
                str(layer): {
                    "hit_rate": s.hit_rate, "hits": s.hits, "misses": s.misses,
                    "precision": s.precision, "recall": s.recall,
                    "decode_recall": self.decode_layers[layer].recall if layer in self.decode_layers else None,
                    "cpu_experts": s.cpu_experts, "cpu_seconds": s.cpu_seconds, "bytes_moved": s.bytes_moved,
                    "link_wait_seconds": s.stall_seconds,
                }
                for layer, s in sorted(self.layers.items())
            },
        }
