"""OLMoE (allenai/OLMoE-1B-7B): q_norm over the whole query projection, k_norm over the key width,
optional clip_qkv, softmax -> top-k without renormalisation unless norm_topk_prob.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fate_cli.model.args import ConfigReader, ModelArgs, common_fields


def model_args(cfg: dict[str, Any], path: Path) -> ModelArgs:
    r = ConfigReader(cfg, path)
    fields = common_fields(r, rope_theta=10000.0, rms_norm_eps=1e-5, max_positions=4096)
    clip = r.optional_float("clip_qkv")
    return ModelArgs(
        family="olmoe",
        **fields,
        num_experts=r.first_int("num_experts", "num_local_experts"),
        top_k=r.int("num_experts_per_tok", 8),
        moe_intermediate_size=r.int("intermediate_size"),
        norm_topk_prob=r.bool("norm_topk_prob", False),
        attention_bias=r.bool("attention_bias", False),
        qk_norm="full",
        clip_qkv=clip,
        moe_layers=(True,) * fields["num_layers"],
    )
