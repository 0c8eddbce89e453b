"""Mixtral (mistralai/Mixtral-8x7B): every layer MoE, softmax -> top-k -> renormalise, no biases.

Checkpoint names: model.layers.L.block_sparse_moe.gate.weight and
model.layers.L.block_sparse_moe.experts.E.{w1 (gate), w3 (up), w2 (down)}.weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fate_cli.model.args import ConfigReader, ModelArgs, common_fields


def model_args(cfg: dict[str, Any], path: Path) -> ModelArgs:
    r = ConfigReader(cfg, path)
    fields = common_fields(r, rope_theta=1e6, rms_norm_eps=1e-5, max_positions=32768)
    # Sliding-window attention equals full attention inside the window, so cap the context there.
    window = cfg.get("sliding_window")
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < fields["max_position_embeddings"]:
        fields["max_position_embeddings"] = window
    return ModelArgs(
        family="mixtral",
        **fields,
        num_experts=r.first_int("num_local_experts", "num_experts"),
        top_k=r.int("num_experts_per_tok", 2),
        moe_intermediate_size=r.int("intermediate_size"),
        norm_topk_prob=True,
        moe_layers=(True,) * fields["num_layers"],
        moe_module="block_sparse_moe",
        expert_proj_names=("w1", "w3", "w2"),
    )
