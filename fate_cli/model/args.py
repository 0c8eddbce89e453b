"""ModelArgs: everything the runtime needs from a checkpoint's config.json, for every family.

Each family module (mixtral.py, qwen2_moe.py, qwen3_moe.py, olmoe.py, qwen3_5_moe.py) turns its config.json into
one ModelArgs; the shared layers read only ModelArgs, never the raw config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fate_cli.errors import BadModel, ModelNotFound
from quant import files
from quant.expert_act import ClampedSwiGLU
from quant.source import ExpertSet


@dataclass(frozen=True)
class LinearAttentionArgs:
    """Gated DeltaNet layers (qwen3_5_moe): key/value heads, their widths and the causal convolution's width."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: queries, keys and values side by side."""
        return 2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    attention_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (qwen3: per head over head_dim) | "full" (olmoe: whole projection)
    clip_qkv: float | None = None
    dense_intermediate_size: int = 0  # MLP width of non-MoE layers (mlp_only_layers, decoder_sparse_step)
    shared_expert_intermediate_size: int = 0  # qwen2_moe's always-on expert, gated by a sigmoid
    moe_layers: tuple[bool, ...] = field(default=())  # per layer: MoE block (True) or dense MLP (False)
    # checkpoint naming: model.layers.L.<moe_module>.gate / .experts.E.<gate|up|down proj name>.weight
    moe_module: str = "mlp"
    expert_proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # gpt_oss: learned per-head attention sinks, a biased o_proj, sliding-window layers, YaRN rope, a biased
    # router named `router` whose top k are softmaxed, and biased experts with a clamped SwiGLU in fused tensors
    attention_sinks: bool = False
    o_proj_bias: bool = False
    sliding_window: int = 0  # keys a sliding layer's query sees, itself included (0: no sliding layers)
    sliding_layers: tuple[bool, ...] = field(default=())  # per layer: sliding window (True) or full attention
    rope_scaling: YarnRope | None = None
    router_module: str = "gate"
    router_bias: bool = False
    topk_then_softmax: bool = False
    expert_act: ClampedSwiGLU | None = None  # None: silu(gate) * up
    expert_bias: bool = False
    expert_layout: str = "separate"  # or "gpt_oss": fused [E, H, 2I] interleaved gate|up (or MXFP4 blocks)

    checkpoint_prefix: str = "model."  # "model.language_model." where the text model sits inside a VLM
    # hybrid families (qwen3_5_moe): "linear_attention" or "full_attention" per layer; () means all full
    layer_types: tuple[str, ...] = field(default=())
    linear: LinearAttentionArgs | None = None
    rotary_dim: int = 0  # RoPE over the first rotary_dim of each head (partial rotary); 0: the whole head
    attn_output_gate: bool = False  # q_proj also yields a per-head gate: out * sigmoid(gate) before o_proj
    norm_offset: bool = False  # RMSNorm scales by (1 + weight), weights stored zero-centred

    def is_sliding_layer(self, layer: int) -> bool:
        return bool(self.sliding_layers) and self.sliding_layers[layer]

    def is_linear_layer(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    @property
    def attention_layer_ids(self) -> list[int]:
        """Layers with softmax attention, the ones that hold keys and values."""
        return [i for i in range(self.num_layers) if not self.is_linear_layer(i)]

    @property
    def linear_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_linear_layer(i)]

    def cache_index(self, layer: int) -> int:
        """Layer `layer`'s row in its cache: the KV cache for attention layers, the recurrent state for
        linear-attention layers (each holds only its own kind of layer)."""
        return (self.linear_layer_ids if self.is_linear_layer(layer) else self.attention_layer_ids).index(layer)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_layers[layer]

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, moe in enumerate(self.moe_layers) if moe]

    @property
    def experts(self) -> ExpertSet:
        """The checkpoint's routed experts: names and shapes (what the tier store and the loader read)."""
        return ExpertSet(self.family, tuple(self.moe_layer_ids), self.num_experts, self.hidden_size,
                         self.moe_intermediate_size, self.moe_module, self.expert_proj_names,
                         layout=self.expert_layout, prefix=self.checkpoint_prefix)


@dataclass(frozen=True)
class YarnRope:
    """YaRN rope scaling (rope_type "yarn"), the fields transformers' _compute_yarn_parameters reads."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None


def is_positive_number(value: Any) -> bool:
    """JSON numbers include 1e999 (infinity) and, from Python's parser, NaN: neither is a dimension or a scale."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf


class ConfigReader:
    """Typed access to config.json with one clear error per bad or missing field."""

    def __init__(self, cfg: dict[str, Any], path: Path):
        self.cfg = cfg
        self.path = path

    def _fail(self, key: str, why: str) -> BadModel:
        return BadModel(f"{self.path}: field '{key}' {why}; fix config.json or re-download the model")

    def int(self, key: str, default: int | None = None, *, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
        value = self.cfg.get(key, default)
        if value is None:
            raise self._fail(key, "is missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer, not {value!r}")
        if value < minimum:
            raise self._fail(key, f"must be at least {minimum}, not {value}")
        if value > maximum:
            raise self._fail(key, f"must be at most {maximum}, not {value}")
        return value

    def float(self, key: str, default: float | None = None) -> float:
        value = self.cfg.get(key, default)
        if value is None:
            raise self._fail(key, "is missing")
        if not is_positive_number(value):
            raise self._fail(key, f"must be a positive finite number, not {value!r}")
        return float(value)

    def optional_float(self, key: str) -> float | None:
        return None if self.cfg.get(key) is None else self.float(key)

    def bool(self, key: str, default: bool) -> bool:
        value = self.cfg.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, not {value!r}")
        return value

    def int_list(self, key: str) -> list[int]:
        value = self.cfg.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self._fail(key, f"must be a list of integers, not {value!r}")
        return value

    def first_int(self, *keys: str) -> int:
        for key in keys:
            if self.cfg.get(key) is not None:
                return self.int(key)
        raise self._fail(keys[0], "is missing")

    def head_dim(self, hidden: int, heads: int) -> int:
        if self.cfg.get("head_dim") is not None:
            return self.int("head_dim")
        if hidden % heads:
            raise self._fail("num_attention_heads", f"({heads}) must divide hidden_size ({hidden})")
        return hidden // heads

    def rope_theta(self, default: float) -> float:
        """rope_theta, from the flat field (transformers 4) or rope_parameters (transformers 5).

        Only the default RoPE is implemented; any scaling is refused rather than silently ignored.
        """
        params = self.cfg.get("rope_parameters")
        scaling = self.cfg.get("rope_scaling")
        for name, entry in (("rope_parameters", params), ("rope_scaling", scaling)):
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise self._fail(name, f"must be an object, not {entry!r}")
            kind = entry.get("rope_type", entry.get("type", "default"))
            if kind != "default":
                raise BadModel(
                    f"{self.path}: {name} type '{kind}' is not supported (fate implements default RoPE "
                    "only); use a checkpoint without RoPE scaling"
                )
        if self.cfg.get("rope_theta") is not None:
            return self.float("rope_theta")
        if params and params.get("rope_theta") is not None:
            value = params["rope_theta"]
            if not is_positive_number(value):
                raise self._fail("rope_parameters.rope_theta", f"must be a positive finite number, not {value!r}")
            return float(value)
        return default


def read_json_object(path: Path) -> dict[str, Any]:
    """A model file holding one JSON object (config.json, tokenizer_config.json, ...); {} when absent."""
    if not path.is_file():
        return {}
    try:
        return files.read_json_object(path)
    except files.UnreadableJSON as err:
        raise BadModel(f"{path} cannot be used ({err}); re-download the model") from None


def read_config(model_dir: Path) -> dict[str, Any]:
    if not (model_dir / "config.json").is_file():
        raise ModelNotFound(f"{model_dir} has no config.json; is it a Hugging Face model folder?")
    return read_json_object(model_dir / "config.json")


MAX_LAYERS = 1024  # far above any released MoE; stops a corrupt config from building a billion layers


def common_fields(
    r: ConfigReader, rope_theta: float, rms_norm_eps: float, max_positions: int
) -> dict[str, Any]:
    """The ModelArgs fields every family reads the same way (defaults differ per family)."""
    hidden, heads = r.int("hidden_size"), r.int("num_attention_heads")
    return {
        "vocab_size": r.int("vocab_size"),
        "hidden_size": hidden,
        "num_layers": r.int("num_hidden_layers", maximum=MAX_LAYERS),
        "num_heads": heads,
        "num_kv_heads": r.int("num_key_value_heads", heads),
        "head_dim": r.head_dim(hidden, heads),
        "rope_theta": r.rope_theta(rope_theta),
        "rms_norm_eps": r.float("rms_norm_eps", rms_norm_eps),
        "max_position_embeddings": r.int("max_position_embeddings", max_positions),
        "tie_word_embeddings": r.bool("tie_word_embeddings", False),
    }


def sparse_layer_pattern(reader: ConfigReader, num_layers: int, num_experts: int) -> tuple[bool, ...]:
    """qwen2_moe/qwen3_moe: a layer is MoE unless listed in mlp_only_layers or off the sparse step."""
    step = reader.int("decoder_sparse_step", 1)
    mlp_only = set(reader.int_list("mlp_only_layers"))
    return tuple(
        (i not in mlp_only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
    )
