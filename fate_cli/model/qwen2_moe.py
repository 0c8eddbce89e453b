"""Qwen1.5-MoE / Qwen2-MoE: qkv bias, a shared expert gated by sigmoid(shared_expert_gate(x)),
top-k renormalised only if norm_topk_prob, dense layers from mlp_only_layers and decoder_sparse_step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fate_cli.model.args import ConfigReader, ModelArgs, common_fields, sparse_layer_pattern


def model_args(cfg: dict[str, Any], path: Path) -> ModelArgs:
    r = ConfigReader(cfg, path)
    fields = common_fields(r, rope_theta=10000.0, rms_norm_eps=1e-6, max_positions=8192)
    experts = r.first_int("num_experts", "num_local_experts")
    return ModelArgs(
        family="qwen2_moe",
        **fields,
        num_experts=experts,
        top_k=r.int("num_experts_per_tok", 4),
        moe_intermediate_size=r.int("moe_intermediate_size"),
        norm_topk_prob=r.bool("norm_topk_prob", False),
        attention_bias=r.bool("qkv_bias", True),
        dense_intermediate_size=r.int("intermediate_size", 0, minimum=0),
        shared_expert_intermediate_size=r.int("shared_expert_intermediate_size"),
        moe_layers=sparse_layer_pattern(r, fields["num_layers"], experts),
    )
