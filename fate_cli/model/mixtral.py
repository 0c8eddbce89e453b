"""Mixtral (mistralai/Mixtral-8x7B): every layer MoE, softmax -> top-k -> renormalise, no biases.

Checkpoint names: model.layers.L.block_sparse_moe.gate.weight and
model.layers.L.block_sparse_moe.experts.E.{w1 (gate), w3 (up), w2 (down)}.weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fate_cli.model.args import ConfigReader, ModelArgs


def model_args(cfg: dict[str, Any], path: Path) -> ModelArgs:
    r = ConfigReader(cfg, path)
    hidden, heads, layers = r.int("hidden_size"), r.int("num_attention_heads"), r.int("num_hidden_layers")
    max_pos = r.int("max_position_embeddings", 32768)
    # Sliding-window attention equals full attention inside the window, so cap the context there.
    window = cfg.get("sliding_window")
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < max_pos:
        max_pos = window
    return ModelArgs(
        family="mixtral",
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=r.int("num_key_value_heads", heads),
        head_dim=r.head_dim(hidden, heads),
        rope_theta=r.rope_theta(1e6),
        rms_norm_eps=r.float("rms_norm_eps", 1e-5),
        max_position_embeddings=max_pos,
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        num_experts=r.first_int("num_local_experts", "num_experts"),
        top_k=r.int("num_experts_per_tok", 2),
        moe_intermediate_size=r.int("intermediate_size"),
        norm_topk_prob=True,
        moe_layers=(True,) * layers,
        moe_module="block_sparse_moe",
        expert_proj_names=("w1", "w3", "w2"),
    )
