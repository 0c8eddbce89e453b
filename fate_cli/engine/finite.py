"""What to tell the user when a model computes NaN or infinite logits: which weight holds them, if one does.

The sampler marks a row whose logits are not all finite (fate_cli/engine/generate.py) at no extra
synchronisation; only then, on the failure path, are the weights scanned to name the damaged tensor.
"""

from __future__ import annotations

import torch

from fate_cli.errors import BadModel
from fate_cli.model.experts import ResidentExperts
from fate_cli.model.model import Transformer, checkpoint_name

NON_FINITE = -1  # the token id the sampler gives a row whose logits hold NaN or infinity


def _first_bad(model: Transformer) -> str | None:
    for name, tensor in model.named_parameters():
        if not torch.isfinite(tensor).all():
            return checkpoint_name(model.args, name)
    provider = getattr(model, "provider", None)
    if isinstance(provider, ResidentExperts):
        for layer, experts in provider.layers.items():
            for e, expert in enumerate(experts):
                for name, tensor in zip(model.args.experts.names(layer, e), (expert.gate, expert.up, expert.down)):
                    if not torch.isfinite(tensor).all():
                        return name
    return None


def non_finite_error(model: Transformer) -> BadModel:
    name = _first_bad(model)
    if name is not None:
        return BadModel(f"the model computed NaN or infinite logits: tensor {name} holds NaN or infinite values; "
                        "the checkpoint is damaged, re-download it")
    return BadModel("the model computed NaN or infinite logits from finite weights (an overflow); run with "
                    "--dtype float32, or bfloat16 instead of float16")
