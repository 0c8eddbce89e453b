"""TieredExperts: an ExpertProvider that serves every expert from the tier store at a fixed tier each.

A tier map gives (layer, expert) -> tier name ("hot", "cold" or "dense"). The choices of `fate perplexity
--tiers` and their tier maps:
- hot / cold: every expert from that tier.
- mixed: a static stand-in for what Fate's runtime ends up serving, until the offload planner supplies
  real plans: the store's dense layers (layer 0 by default) at 16 bits, the next three MoE layers from the
  hot tier (Fate caches the first four layers whole, at INT4), and every deeper layer from the cold tier
  (the worst case for deep layers, where Fate serves misses and unpopular predictions at INT2 and the
  rest at INT4). A store without a dense tier serves layer 0 hot.
- bf16 is no provider at all: the checkpoint's own weights (fate_cli.model.loader's resident experts).

Buffers are read and sha256-checked once when the provider is built (the host tier keeps every expert
anyway), then moved to the compute device in one copy each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from cache.planner import FATE_SHALLOW_LAYERS
from fate_cli.errors import BadModel, UsageError
from fate_cli.model.args import ModelArgs
from fate_cli.model.experts import ResidentExperts, dense_expert
from fate_cli.model.loader import Checkpoint
from quant.kernels import QuantExpert, backend_label, select_backend
from quant.store import TierStore

TIER_CHOICES = ("bf16", "hot", "cold", "mixed")

TierMap = dict[tuple[int, int], str]


def uniform_tiers(args: ModelArgs, tier: str) -> TierMap:
    return {(layer, e): tier for layer in args.moe_layer_ids for e in range(args.num_experts)}


def mixed_tiers(args: ModelArgs, store: TierStore) -> TierMap:
    dense = set(store.tiers["dense"].layers) if "dense" in store.tiers else set()
    plan = {}
    for rank, layer in enumerate(args.moe_layer_ids):
        tier = "dense" if layer in dense else "hot" if rank < FATE_SHALLOW_LAYERS else "cold"
        for e in range(args.num_experts):
            plan[(layer, e)] = tier
    return plan


def tier_map(args: ModelArgs, store: TierStore, choice: str) -> TierMap:
    if choice in ("hot", "cold"):
        return uniform_tiers(args, choice)
    if choice == "mixed":
        return mixed_tiers(args, store)
    raise UsageError(f"unknown tier choice '{choice}'; use one of {', '.join(TIER_CHOICES)}")


def check_matches(store: TierStore, args: ModelArgs) -> None:
    m = store.manifest["model"]
    want = {
        "hidden_size": args.hidden_size,
        "moe_intermediate_size": args.moe_intermediate_size,
        "num_experts": args.num_experts,
        "moe_layers": list(args.moe_layer_ids),
    }
    for key, value in want.items():
        if m.get(key) != value:
            raise BadModel(
                f"the tier store at {store.dir} was built for {key}={m.get(key)}, the model has {value}; "
                f"run `fate quantize {store.name}` to rebuild it"
            )


class TieredExperts(ResidentExperts):
    """Every expert resident on the device at the tier its tier map (`plan`) gives it (dense or quantized)."""

    @property
    def fused(self) -> bool:
        return False  # mixed tiers in one layer have no bank: decode runs eager (perplexity never decodes)

    def __init__(
        self,
        store: TierStore,
        args: ModelArgs,
        plan: TierMap,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
    ):
        check_matches(store, args)
        self.store, self.plan = store, plan
        self.device = torch.device(device)
        super().__init__({})
        self.backends: set[str] = set()
        self.bytes = 0
        for layer in args.moe_layer_ids:
            table = []
            for e in range(args.num_experts):
                tier = plan[(layer, e)]
                info = store.tiers.get(tier)
                if info is None or layer not in info.layers:
                    raise UsageError(f"the tier store has no {tier} copy of layer {layer}; "
                                     f"choose other tiers, or rebuild the store "
                                     "with `fate quantize` (--dense-layers for 16-bit copies)")
                buf = store.read(tier, layer, e).to(self.device)
                self.bytes += buf.nbytes
                if info.layout.kind == "dense":
                    table.append(dense_expert(buf, info.layout, dtype, args.expert_act))
                else:
                    expert = QuantExpert(buf, info.layout, backend or select_backend(self.device, info.layout),
                                         args.expert_act)
                    self.backends.add(expert.backend)
                    table.append(expert)
            self.layers[layer] = table

    @property
    def nbytes(self) -> int:
        """The tier buffers read (a dense tier converted to another dtype counts as stored)."""
        return self.bytes

    def describe(self) -> str:
        """e.g. "experts: bfloat16 (dense) layer 0, INT4 g64 (hot) layers 1-3, ...; backend cpu dequant+matmul"."""
        runs: list[tuple[str, list[int]]] = []
        for layer in sorted(self.layers):
            tiers = {self.plan[(layer, e)] for e in range(len(self.layers[layer]))}
            label = "+".join(f"{self.store.tiers[t].describe()} ({t})" for t in sorted(tiers))
            if runs and runs[-1][0] == label and runs[-1][1][-1] == layer - 1:
                runs[-1][1].append(layer)
            else:
                runs.append((label, [layer]))
        parts = []
        for label, layers in runs:
            span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
            parts.append(f"{label} {span}")
        backend = ", ".join(sorted(backend_label(b) for b in self.backends)) or "torch (dense)"
        return f"experts: {', '.join(parts)}; backend {backend}"


def tiered_provider(
    store_dir: Path,
    model_dir: Path,
    choice: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    backend: str | None = None,
) -> Callable[[ModelArgs, Checkpoint], TieredExperts]:
    """A `provider` for fate_cli.model.loader.load_model (give both the same device and dtype).

    The store is opened and checked when load_model calls it, after the checkpoint checked out.
    """

    def build(args: ModelArgs, ckpt: Checkpoint) -> TieredExperts:
        store = TierStore.open(store_dir, model_dir, name=name)
        return TieredExperts(store, args, tier_map(args, store, choice), device, dtype, backend)

    return build
