"""Load a Hugging Face MoE checkpoint lazily: config.json + safetensors (one file or shards).

Tensors are read one at a time through safetensors' memory map and copied straight into the
model's parameters, so the whole checkpoint is never held in memory twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fate_cli.errors import BadModel, ModelNotFound, UsageError
from fate_cli.model import gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_5_moe, qwen3_moe
from fate_cli.model.args import ModelArgs, read_config
from fate_cli.model.config_check import check_against_weights
from fate_cli.model.experts import DenseExpert, ExpertProvider, ResidentExperts
from fate_cli.model.model import (
    Transformer,
    build_model,
    checkpoint_name,
    dense_setting,
    int8_dense_modules,
    replaced_params,
    weight_shapes,
)
from quant.dense_int8 import Int8Linear
from quant.gpt_oss_experts import FusedExperts
from quant.source import SourceReader, fused_expert_slices, weight_files

FAMILIES: dict[str, Callable[[dict, Path], ModelArgs]] = {
    "mixtral": mixtral.model_args,
    "qwen2_moe": qwen2_moe.model_args,
    "qwen3_moe": qwen3_moe.model_args,
    "olmoe": olmoe.model_args,
    "gpt_oss": gpt_oss.model_args,
    "qwen3_5_moe": qwen3_5_moe.model_args,
    "qwen3_5_moe_text": qwen3_5_moe.model_args,
}


def load_args(model_dir: Path) -> ModelArgs:
    cfg = read_config(model_dir)
    family = cfg.get("model_type")
    if not isinstance(family, str) or family not in FAMILIES:
        raise BadModel(
            f"model_type {family!r} in {model_dir / 'config.json'} is not supported; "
            f"fate runs {', '.join(sorted(FAMILIES))}"
        )
    args = FAMILIES[family](cfg, model_dir / "config.json")
    if args.num_heads % args.num_kv_heads:
        raise BadModel(
            f"{model_dir / 'config.json'}: num_attention_heads ({args.num_heads}) must be a multiple of "
            f"num_key_value_heads ({args.num_kv_heads}); fix config.json or re-download the model"
        )
    if not 0 < args.top_k <= args.num_experts:
        raise BadModel(
            f"{model_dir / 'config.json'}: num_experts_per_tok ({args.top_k}) must be between 1 and the "
            f"number of experts ({args.num_experts}); fix config.json or re-download the model"
        )
    return args


class Checkpoint:
    """Tensor names, shapes and lazy reads across a checkpoint's safetensors files."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        files = weight_files(model_dir)  # the index's shard names checked: plain names inside the folder
        self.handles = {}
        self.location: dict[str, str] = {}
        self.sliced: dict[str, tuple[str, int, int, int]] = {}  # per-expert name -> rows of a fused tensor
        for name in files:
            path = model_dir / name
            if not path.is_file():
                raise ModelNotFound(f"checkpoint shard {path} is missing; run `fate pull` again to fetch it")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as err:
                raise BadModel(
                    f"{path} is corrupt or truncated ({_first_line(err)}); delete it and run `fate pull` again"
                ) from None
            self.handles[name] = handle
            for key in keys:
                self.location[key] = name
                if key.endswith("_proj"):  # fused [E, 2I, H] / [E, H, I] experts: per-expert names
                    shape = tuple(handle.get_slice(key).get_shape())
                    for part, e, first, stop in fused_expert_slices(key, shape):
                        self.sliced[part] = (key, e, first, stop)
        for part in set(self.sliced) & set(self.location):  # a separate tensor wins over a fused one
            del self.sliced[part]
        self.fused = FusedExperts(lambda n: self.shape(n) if n in self.location else None,
                                  lambda n, e: self._read(n, lambda h: h.get_slice(n)[e]))

    def __contains__(self, name: str) -> bool:
        return name in self.location or name in self.sliced or self.fused.shape(name) is not None

    def names(self) -> Iterator[str]:
        return iter(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.sliced:
            fused, _, first, stop = self.sliced[name]
            return (stop - first, self.shape(fused)[2])
        if name not in self.location:
            return self.fused.shape(name)
        return tuple(self.handles[self.location[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """A tensor by name; a fused layout's per-expert part (quant/gpt_oss_experts.py, or one expert's matrix of
        fused_expert_slices) reads its slice alone."""
        if name in self.sliced:
            fused, e, first, stop = self.sliced[name]
            return self._read(fused, lambda h: h.get_slice(fused)[e, first:stop])
        if name not in self.location and self.fused.shape(name) is not None:
            return self.fused.get(name)
        return self._read(name, lambda h: h.get_tensor(name))

    def _read(self, name: str, read: Callable) -> torch.Tensor:
        path = self.dir / self.location[name]
        try:
            return read(self.handles[self.location[name]])
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise BadModel(
                f"{path}: cannot read tensor {name} ({_first_line(err)}); the file is damaged, run `fate pull` again"
            ) from None

    def require(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self:
            raise BadModel(f"{self.dir}: tensor {name} is missing from the checkpoint; re-download the model")
        found = self.shape(name)
        if found != shape:
            raise BadModel(
                f"{self.dir}: tensor {name} has shape {list(found)} but config.json implies {list(shape)}; "
                "the weights do not match the config"
            )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def checked_args(model_dir: Path) -> ModelArgs:
    """config.json read, and compared with the checkpoint's tensor headers before its dimensions size anything
    (the layer count among them)."""
    args = load_args(model_dir)
    check_against_weights(args, SourceReader(model_dir))
    return args


def check_checkpoint(args: ModelArgs, ckpt: Checkpoint) -> None:
    """Every tensor the model needs is present with the shape config.json implies."""
    for param, shape in weight_shapes(args).items():
        ckpt.require(checkpoint_name(args, param), shape)
    experts = args.experts
    for layer in experts.layers:
        for e in range(experts.num_experts):
            for name, shape in zip(experts.names(layer, e), experts.shapes):
                ckpt.require(name, shape)
            for name, shape in zip(experts.bias_names(layer, e) or (), experts.bias_shapes):
                ckpt.require(name, shape)


def load_resident_experts(
    args: ModelArgs, ckpt: Checkpoint, device: torch.device | str, dtype: torch.dtype
) -> ResidentExperts:
    layers = {}
    experts = args.experts

    def read(names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(ckpt.get(n).to(device=device, dtype=dtype) for n in names)

    for layer in args.moe_layer_ids:
        layers[layer] = [
            DenseExpert(*read(experts.names(layer, e)),
                        biases=read(b) if (b := experts.bias_names(layer, e)) else None, act=args.expert_act)
            for e in range(args.num_experts)
        ]
    return ResidentExperts(layers)


@dataclass
class Weights:
    """A checkpoint's non-expert weights on the compute device, by parameter name: what every model built over
    them shares (a command's, or each row of a bench)."""

    args: ModelArgs
    tensors: dict[str, torch.Tensor]
    checkpoint: Checkpoint | None  # None: made up (a synthetic shape)
    device: torch.device
    dtype: torch.dtype
    int8: dict[str, Int8Linear] = field(default_factory=dict)  # dense Linears at INT8, their floats dropped

    def routers(self) -> dict[int, torch.Tensor]:
        """Each MoE layer's router weight, as the model built over these weights holds it."""
        return {i: self.tensors[f"layers.{i}.mlp.gate.weight"] for i in self.args.moe_layer_ids}

    def model(self, provider: ExpertProvider) -> Transformer:
        return build_model(self.args, self.tensors, provider, self.int8)

    def with_int8_dense(self) -> Weights:
        """These weights with the dense Linears at INT8 for the CPU (`int8_dense_modules`); the float copies of
        what was quantized are dropped (the embedding stays: lookups read it)."""
        int8 = int8_dense_modules(self.args, self.tensors)
        gone = replaced_params(int8)
        tensors = {name: t for name, t in self.tensors.items() if name not in gone}
        return Weights(self.args, tensors, self.checkpoint, self.device, self.dtype, int8)


def load_weights(model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 args: ModelArgs | None = None) -> Weights:
    """config.json and the checkpoint checked against each other, then its non-expert weights read onto `device`
    (experts are a provider's business). args: config.json as `checked_args` gave it already (a planned run)."""
    device = torch.device(device)
    args = args or checked_args(model_dir)
    ckpt = Checkpoint(model_dir)
    check_checkpoint(args, ckpt)
    tensors = {param: ckpt.get(checkpoint_name(args, param)).to(device=device, dtype=dtype, copy=True)
               for param in weight_shapes(args)}
    return dense_as_set(Weights(args, tensors, ckpt, device, dtype))


def dense_as_set(weights: Weights) -> Weights:
    """The weights with their dense Linears as --dense asks (`set_dense`): at INT8 on a CPU, else as they are."""
    if dense_setting() is None:
        return weights
    if weights.device.type != "cpu":
        raise UsageError(f"--dense {dense_setting()} runs the dense weights through torch's CPU kernel, and this run "
                         f"is on {weights.device}; leave --dense out, or add --device cpu")
    return weights.with_int8_dense()


@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    checkpoint: Checkpoint
    device: torch.device
    dtype: torch.dtype


def load_model(
    model_dir: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    provider: Callable[[ModelArgs, Checkpoint], ExpertProvider] | None = None,
) -> LoadedModel:
    """Build the model on `device` from `model_dir`; experts come from `provider` (default: resident)."""
    w = load_weights(model_dir, device, dtype)
    if provider is None:
        experts = load_resident_experts(w.args, w.checkpoint, w.device, dtype)
    else:
        experts = provider(w.args, w.checkpoint)
    return LoadedModel(w.model(experts), w.args, w.checkpoint, w.device, dtype)
