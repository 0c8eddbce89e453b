"""gpt-oss (openai/gpt-oss-20b, openai/gpt-oss-120b): attention with biases (o_proj too) and learned sinks,
layers alternating between a sliding window and full attention as `layer_types` says, YaRN rope, a biased
router whose top k logits are softmaxed, and biased experts with a clamped SwiGLU, stored fused per layer
(`experts.gate_up_proj` [E, H, 2I] with gate and up interleaved, `experts.down_proj` [E, I, H], or the
published MXFP4 `*_blocks` / `*_scales`): quant/gpt_oss_experts.py reads them per expert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fate_cli.errors import BadModel
from fate_cli.model.args import MAX_LAYERS, ConfigReader, ModelArgs, YarnRope
from quant.expert_act import ClampedSwiGLU

LAYER_TYPES = ("sliding_attention", "full_attention")


def _rope(r: ConfigReader, cfg: dict[str, Any]) -> tuple[float, YarnRope | None]:
    """rope_theta and the YaRN scaling, from rope_parameters (transformers 5) or rope_theta/rope_scaling (4)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    theta = cfg.get("rope_theta") or (params or {}).get("rope_theta") or 150000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise r._fail("rope_theta", f"must be a positive number, not {theta!r}")
    if params is None:  # transformers' GptOssConfig default
        params = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                  "original_max_position_embeddings": 4096}
    if not isinstance(params, dict):
        raise r._fail("rope_parameters", f"must be an object, not {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise BadModel(f"{r.path}: rope type '{kind}' is not supported for gpt_oss (fate implements default and "
                       "yarn); use the published config.json")
    sub = ConfigReader(params, r.path)
    factor = sub.float("factor")
    original = params.get("original_max_position_embeddings")
    if original is None:
        original = int(r.int("max_position_embeddings", 131072) / factor)
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise sub._fail("original_max_position_embeddings", f"must be a positive integer, not {original!r}")
    optional = {key: sub.float(key) for key in ("attention_factor", "mscale", "mscale_all_dim")
                if params.get(key) is not None}
    return float(theta), YarnRope(
        factor=factor, original_max_position_embeddings=original,
        beta_fast=sub.float("beta_fast", 32.0), beta_slow=sub.float("beta_slow", 1.0),
        truncate=sub.bool("truncate", True), **optional)


def model_args(cfg: dict[str, Any], path: Path) -> ModelArgs:
    r = ConfigReader(cfg, path)
    hidden, heads = r.int("hidden_size"), r.int("num_attention_heads")
    layers = r.int("num_hidden_layers", maximum=MAX_LAYERS)
    types = cfg.get("layer_types")
    if types is None:  # transformers' default: even layers slide, odd layers attend fully
        types = [LAYER_TYPES[i % 2] for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise r._fail("layer_types", f"must list {layers} entries, each {' or '.join(LAYER_TYPES)}")
    window = cfg.get("sliding_window")
    sliding = tuple(t == "sliding_attention" for t in types)
    if window is None:
        sliding = (False,) * layers  # no window: every layer attends fully
    else:
        window = r.int("sliding_window")
    theta, yarn = _rope(r, cfg)
    experts = r.first_int("num_local_experts", "num_experts")
    return ModelArgs(
        family="gpt_oss",
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=r.int("num_key_value_heads", heads),
        head_dim=r.head_dim(hidden, heads),
        rope_theta=theta,
        rms_norm_eps=r.float("rms_norm_eps", 1e-5),
        max_position_embeddings=r.int("max_position_embeddings", 131072),
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        num_experts=experts,
        top_k=r.int("num_experts_per_tok", 4),
        moe_intermediate_size=r.int("intermediate_size"),
        norm_topk_prob=False,
        attention_bias=r.bool("attention_bias", True),
        o_proj_bias=r.bool("attention_bias", True),
        attention_sinks=True,
        sliding_window=window or 0,
        sliding_layers=sliding,
        rope_scaling=yarn,
        router_module="router",
        router_bias=True,
        topk_then_softmax=True,
        expert_act=ClampedSwiGLU(r.float("swiglu_alpha", 1.702), r.float("swiglu_limit", 7.0)),
        expert_bias=True,
        expert_layout="gpt_oss",
        moe_layers=(True,) * layers,
    )
