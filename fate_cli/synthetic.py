"""Synthetic models: real models' shapes with random weights, made on the fly (`synthetic:mixtral-8x7b`).

The config is the published one (config.json fields of the Hub checkpoint), read by the same family code
as a downloaded model; non-expert weights are random on the device, experts are random straight into the
tiers (quant/synthetic.py). Its routing is that of random weights, not of a trained model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fate_cli.errors import UsageError
from fate_cli.model.args import ModelArgs
from fate_cli.model.loader import FAMILIES, Weights, dense_as_set
from fate_cli.model.model import weight_shapes
from fate_cli.model.values import check_text
from fate_cli.registry import ResolvedModel
from fate_cli.tokenizer import Tokenizer
from quant.synthetic import SyntheticStore

PREFIX = "synthetic:"

CONFIGS: dict[str, dict] = {
    "mixtral-8x7b": {  # mistralai/Mixtral-8x7B-v0.1
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
    },
    "qwen3-30b-a3b": {  # Qwen/Qwen3-30B-A3B
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
        "decoder_sparse_step": 1, "mlp_only_layers": [],
    },
    # Qwen/Qwen3.6-35B-A3B (the same shape as Qwen/Qwen3.5-35B-A3B): the language model's text_config. Sizes
    # from the model card (40 layers, 3 linear : 1 full, 256 experts of 512 + a shared one, top-8, hidden 2048,
    # vocabulary 248,320, context 262,144); head counts and linear-attention widths are transformers'
    # Qwen3_5MoeTextConfig defaults, documented as Qwen/Qwen3.5-35B-A3B's; rope_theta 1e7 as the Hub config.
    "qwen3.6-35b-a3b": {
        "model_type": "qwen3_5_moe", "text_config": {
            "model_type": "qwen3_5_moe_text", "vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 40,
            "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "full_attention_interval": 4,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_num_key_heads": 16, "linear_num_value_heads": 32, "num_experts": 256, "num_experts_per_tok": 8,
            "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        },
    },
    "olmoe-1b-7b": {  # allenai/OLMoE-1B-7B-0924
        "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "norm_topk_prob": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
    },
    # openai/gpt-oss-20b and openai/gpt-oss-120b config.json (the published MXFP4 checkpoints; transformers'
    # GptOssConfig defaults are the 120b's): the two differ only in depth and expert count
    "gpt-oss-20b": {
        "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
        "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
        "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "attention_bias": True,
        "rope_theta": 150000.0, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "truncate": False,
                                                 "original_max_position_embeddings": 4096},
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
    },
}
CONFIGS["gpt-oss-120b"] = {**CONFIGS["gpt-oss-20b"], "num_hidden_layers": 36, "num_local_experts": 128,
                           "layer_types": ["sliding_attention", "full_attention"] * 18}


def is_synthetic(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)


def synthetic_args(name: str) -> ModelArgs:
    shape = name.removeprefix(PREFIX)
    if shape not in CONFIGS:
        raise UsageError(f"unknown synthetic model '{name}'; use one of {', '.join(PREFIX + k for k in CONFIGS)}")
    cfg = CONFIGS[shape]
    return FAMILIES[cfg["model_type"]](cfg, Path(f"<{name}>/config.json"))


def random_weights(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Weights:
    """Non-expert weights drawn at random on the device (norms at one); experts come from a provider."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in weight_shapes(args).items():
        t = torch.empty(shape, device=device, dtype=dtype)
        if t.dim() == 1:  # norms scale by one: weight 1, or 0 where the family stores 1 + weight
            offset = args.norm_offset and ".linear_attn." not in name  # the gated norm there is plain
            t.fill_(1.0 if "norm" in name and not offset else 0.0)
        else:
            t.normal_(0.0, 1.0 / shape[-1] ** 0.5 if "embed" not in name else 1.0, generator=gen)
        tensors[name] = t
    return dense_as_set(Weights(args, tensors, None, torch.device(device), dtype))


class SyntheticTokenizer(Tokenizer):
    """A synthetic model's stand-in tokenizer: it has random weights and no vocabulary, so text is read as its
    UTF-8 bytes (token id = byte value) and a generated id reads back as `<id>`. Enough to drive `fate run`
    and `fate serve` at a real model's shape; no end-of-sequence token, so every request runs to its limit."""

    chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                    "{% if add_generation_prompt %}assistant: {% endif %}"

    def __init__(self, args: ModelArgs):  # noqa: D107 - no tokenizer files to read
        self.vocab = args.vocab_size
        self.bos_token = self.eos_token = None
        self.template_vars: dict = {}
        self.generation_defaults: dict = {}
        self.eos_ids: list[int] = []

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(check_text(text, "the text").encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def synthetic_store(args: ModelArgs, name: str) -> SyntheticStore:
    """Random experts of the shape, straight into the tiers (no checkpoint)."""
    return SyntheticStore(args.hidden_size, args.moe_intermediate_size, args.moe_layer_ids, args.num_experts,
                          name=name, bias=args.expert_bias)


def synthetic_model(name: str) -> ResolvedModel:
    """A synthetic model as a resolved name: checked against the known shapes; its path is a label only."""
    synthetic_args(name)
    return ResolvedModel(name=name, path=Path(f"<{name}>"))
