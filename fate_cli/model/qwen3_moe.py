"""Qwen3-MoE (Qwen/Qwen3-30B-A3B): q_norm/k_norm RMSNorm per head over head_dim before RoPE,
no shared expert, top-k renormalised if norm_topk_prob.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fate_cli.model.args import ConfigReader, ModelArgs, common_fields, sparse_layer_pattern


def model_args(cfg: dict[str, Any], path: Path) -> ModelArgs:
    r = ConfigReader(cfg, path)
    fields = common_fields(r, rope_theta=10000.0, rms_norm_eps=1e-6, max_positions=32768)
    experts = r.first_int("num_experts", "num_local_experts")
    return ModelArgs(
        family="qwen3_moe",
        **fields,
        num_experts=experts,
        top_k=r.int("num_experts_per_tok", 8),
        moe_intermediate_size=r.int("moe_intermediate_size"),
        norm_topk_prob=r.bool("norm_topk_prob", False),
        attention_bias=r.bool("attention_bias", False),
        qk_norm="head",
        dense_intermediate_size=r.int("intermediate_size", 0, minimum=0),
        moe_layers=sparse_layer_pattern(r, fields["num_layers"], experts),
    )
