"""Qwen1.5-MoE / Qwen2-MoE: qkv bias, a shared expert gated by sigmoid(shared_expert_gate(x)),
top-k renormalised only if norm_topk_prob, dense layers from mlp_only_layers and decoder_sparse_step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fate_cli.model.args import ConfigReader, ModelArgs, sparse_layer_pattern


def model_args(cfg: dict[str, Any], path: Path) -> ModelArgs:
    r = ConfigReader(cfg, path)
    hidden, heads, layers = r.int("hidden_size"), r.int("num_attention_heads"), r.int("num_hidden_layers")
    experts = r.first_int("num_experts", "num_local_experts")
    return ModelArgs(
        family="qwen2_moe",
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=r.int("num_key_value_heads", heads),
        head_dim=r.head_dim(hidden, heads),
        rope_theta=r.rope_theta(10000.0),
        rms_norm_eps=r.float("rms_norm_eps", 1e-6),
        max_position_embeddings=r.int("max_position_embeddings", 8192),
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        num_experts=experts,
        top_k=r.int("num_experts_per_tok", 4),
        moe_intermediate_size=r.int("moe_intermediate_size"),
        norm_topk_prob=r.bool("norm_topk_prob", False),
        attention_bias=r.bool("qkv_bias", True),
        dense_intermediate_size=r.int("intermediate_size", 0, minimum=0),
        shared_expert_intermediate_size=r.int("shared_expert_intermediate_size"),
        moe_layers=sparse_layer_pattern(r, layers, experts),
    )
