"""Tiny random gpt_oss checkpoints built with transformers (the reference), plain or with MXFP4 experts.

    make_tiny_gpt_oss(dir, mxfp4=False, **overrides) -> Path

Shapes: vocab 128, hidden 64, 4 layers (sliding, full, sliding, full), window 8, 4 heads of 16, 2 KV heads,
4 experts, top-2, expert width 32 (MXFP4 needs multiples of 32), YaRN factor 4 over 128 original positions.
Every bias, the sinks and the router bias are random (transformers initialises the expert biases to zero,
which would hide a missing bias), and the weights are large enough that the SwiGLU's clamps act.

With mxfp4=True the experts are quantized to MXFP4 (quant/gpt_oss_experts.quantize_mxfp4) and written as the
published checkpoints hold them (`*_blocks`, `*_scales`, a quantization_config), and the returned folder's
sibling `<name>-dequantized` holds the same model with the dequantized experts in the plain layout: the
reference transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import CHATML_TEMPLATE, train_tokenizer

FIELDS: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 8,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "swiglu_limit": 1.5,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 128},
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
    "bos_token_id": None,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


# Prompts past the sliding window (FIELDS' 8 tokens): the first spans five windows, the others are shorter
LONG_PROMPT = [(7 * i + 3) % 120 + 3 for i in range(42)]
SLIDING_PROMPTS = [LONG_PROMPT, [17, 4, 4, 80], [3, 1, 33, 90, 21, 22, 23, 24, 25, 26, 5, 9, 14]]

def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _tokenizer_files(path: Path) -> None:
    tok = train_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 512,
        "clean_up_tokenization_spaces": False, "chat_template": CHATML_TEMPLATE})
    _write_json(path / "generation_config.json", {"eos_token_id": [2, 0], "pad_token_id": 0, "do_sample": False})


def make_tiny_gpt_oss(dir, mxfp4: bool = False, seed: int = 0, **overrides) -> Path:  # noqa: A002
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GptOssConfig

    from quant.gpt_oss_experts import dequantize_mxfp4, quantize_mxfp4

    path = Path(dir)
    path.mkdir(parents=True, exist_ok=True)
    config = GptOssConfig(**{**FIELDS, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_bias", "proj.bias", "router.bias")):
                p.normal_(0.0, 0.3)
            elif name.endswith("sinks"):
                p.normal_(0.0, 1.0)
            elif "experts" in name:
                p.normal_(0.0, 0.4)
    if not mxfp4:
        model.save_pretrained(path, safe_serialization=True)
        _tokenizer_files(path)
        return path

    # the experts through MXFP4 and back: the reference holds exactly the values the blocks encode
    packed: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            ex = layer.mlp.experts
            base = f"model.layers.{i}.mlp.experts"
            for proj in ("gate_up_proj", "down_proj"):
                w = getattr(ex, proj).data.transpose(1, 2).contiguous()  # [E, out, in]
                blocks, scales = quantize_mxfp4(w)
                packed[f"{base}.{proj}_blocks"], packed[f"{base}.{proj}_scales"] = blocks, scales
                getattr(ex, proj).data.copy_(dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2))
    ref = path.parent / f"{path.name}-dequantized"
    model.save_pretrained(ref, safe_serialization=True)
    _tokenizer_files(ref)

    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file({**state, **packed}, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ref / "config.json").read_text(encoding="utf-8"))
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    _write_json(path / "config.json", cfg)
    _tokenizer_files(path)
    return path


def reference_tokens(ref, prompt: list[int], n: int = 20) -> list[int]:  # noqa: ANN001 - a transformers model
    """transformers' greedy continuation of `prompt`, n tokens, no end-of-sequence stop."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
