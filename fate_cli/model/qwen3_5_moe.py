"""Qwen3.5 / Qwen3.6 MoE (Qwen/Qwen3.6-35B-A3B): a hybrid of Gated DeltaNet linear attention
(gated_deltanet.py) and gated softmax attention, every layer MoE with a sigmoid-gated shared expert.

- config.json: `model_type qwen3_5_moe` holds the language model under `text_config` (the checkpoint also
  holds a vision tower, `model.visual.*`, which fate does not load: text only); `qwen3_5_moe_text` is the
  text model alone. `layer_types` (or `full_attention_interval`, default 4) says which layers are linear.
- Softmax attention: q_proj yields the query and a per-head output gate, q/k RMSNorm per head, RoPE over
  the first `partial_rotary_factor` of each head (the multimodal RoPE sections coincide for text).
- Every RMSNorm outside the linear-attention layers scales by (1 + weight).
- Router: softmax over all experts, top-k, always renormalised.
- Checkpoint names: model.language_model.layers.L.{linear_attn,self_attn,mlp}.* (model.layers.L.* for the
  text model alone); experts as separate tensors per expert or fused (mlp.experts.gate_up_proj [E, 2I, H],
  mlp.experts.down_proj [E, H, I]): the readers take either (quant/source.py fused_expert_slices).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fate_cli.errors import BadModel
from fate_cli.model.args import ConfigReader, LinearAttentionArgs, ModelArgs, common_fields

LAYER_TYPES = ("linear_attention", "full_attention")


def text_config(cfg: dict[str, Any], path: Path) -> tuple[dict[str, Any], str]:
    """The language model's config and its checkpoint prefix: nested under text_config in the VLM."""
    if cfg.get("model_type") == "qwen3_5_moe_text" or "text_config" not in cfg:
        return cfg, "model."
    text = cfg["text_config"]
    if not isinstance(text, dict):
        raise BadModel(f"{path}: field 'text_config' must be an object; re-download the model")
    merged = dict(text)
    if "tie_word_embeddings" not in merged and "tie_word_embeddings" in cfg:
        merged["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return merged, "model.language_model."


def layer_types(r: ConfigReader, num_layers: int) -> tuple[str, ...]:
    types = r.cfg.get("layer_types")
    if types is None:
        interval = r.int("full_attention_interval", 4)
        return tuple("full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers))
    if not isinstance(types, list) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise BadModel(
            f"{r.path}: field 'layer_types' must list 'linear_attention' or 'full_attention' for each of the "
            f"{num_layers} layers; fix config.json or re-download the model"
        )
    return tuple(types)


def partial_rotary_factor(r: ConfigReader) -> float:
    params = r.cfg.get("rope_parameters") or {}
    value = params.get("partial_rotary_factor", r.cfg.get("partial_rotary_factor", 0.25))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise BadModel(f"{r.path}: partial_rotary_factor must be in (0, 1], not {value!r}; fix config.json")
    return float(value)


def model_args(cfg: dict[str, Any], path: Path) -> ModelArgs:
    text, prefix = text_config(cfg, path)
    r = ConfigReader(text, path)
    fields = common_fields(r, rope_theta=10000.0, rms_norm_eps=1e-6, max_positions=32768)
    head_dim = fields["head_dim"]
    rotary = int(head_dim * partial_rotary_factor(r))
    if rotary % 2:
        raise BadModel(f"{path}: the rotary part of a head ({rotary}) must be even; fix partial_rotary_factor")
    linear = LinearAttentionArgs(
        num_key_heads=r.int("linear_num_key_heads", 16),
        num_value_heads=r.int("linear_num_value_heads", 32),
        key_head_dim=r.int("linear_key_head_dim", 128),
        value_head_dim=r.int("linear_value_head_dim", 128),
        conv_kernel=r.int("linear_conv_kernel_dim", 4, minimum=2),
    )
    if linear.num_value_heads % linear.num_key_heads:
        raise BadModel(
            f"{path}: linear_num_value_heads ({linear.num_value_heads}) must be a multiple of "
            f"linear_num_key_heads ({linear.num_key_heads}); fix config.json"
        )
    if r.bool("attention_bias", False):
        raise BadModel(f"{path}: attention_bias true is not supported for qwen3_5_moe; fix config.json")
    return ModelArgs(
        family="qwen3_5_moe",
        **fields,
        num_experts=r.int("num_experts", 256),
        top_k=r.int("num_experts_per_tok", 8),
        moe_intermediate_size=r.int("moe_intermediate_size", 512),
        norm_topk_prob=True,
        qk_norm="head",
        shared_expert_intermediate_size=r.int("shared_expert_intermediate_size", 512),
        moe_layers=(True,) * fields["num_layers"],
        checkpoint_prefix=prefix,
        layer_types=layer_types(r, fields["num_layers"]),
        linear=linear,
        rotary_dim=rotary,
        attn_output_gate=r.bool("attn_output_gate", True),
        norm_offset=True,
    )
