"""OLMoE (allenai/OLMoE-1B-7B): q_norm over the whole query projection, k_norm over the key width,
optional clip_qkv, softmax -> top-k without renormalisation unless norm_topk_prob.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fate_cli.errors import BadModel
from fate_cli.model.args import ConfigReader, ModelArgs


def model_args(cfg: dict[str, Any], path: Path) -> ModelArgs:
    r = ConfigReader(cfg, path)
    hidden, heads, layers = r.int("hidden_size"), r.int("num_attention_heads"), r.int("num_hidden_layers")
    clip = cfg.get("clip_qkv")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise BadModel(f"{path}: field 'clip_qkv' must be a positive number or null, not {clip!r}")
    return ModelArgs(
        family="olmoe",
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=r.int("num_key_value_heads", heads),
        head_dim=r.head_dim(hidden, heads),
        rope_theta=r.rope_theta(10000.0),
        rms_norm_eps=r.float("rms_norm_eps", 1e-5),
        max_position_embeddings=r.int("max_position_embeddings", 4096),
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        num_experts=r.first_int("num_experts", "num_local_experts"),
        top_k=r.int("num_experts_per_tok", 8),
        moe_intermediate_size=r.int("intermediate_size"),
        norm_topk_prob=r.bool("norm_topk_prob", False),
        attention_bias=r.bool("attention_bias", False),
        qk_norm="full",
        clip_qkv=None if clip is None else float(clip),
        moe_layers=(True,) * layers,
    )
