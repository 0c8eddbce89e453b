"""Tiny random Hugging Face MoE checkpoints for tests, built with transformers (the reference).

    make_tiny_model(dir, family="qwen3_moe", **overrides) -> Path

writes a complete model folder the way the Hub holds one: config.json, float32 safetensors weights
(model.safetensors, or shards plus model.safetensors.index.json with `shards=N`), tokenizer.json (a
byte-level BPE of about 120 entries trained on a small built-in English text, so its vocabulary is
smaller than the config's 128), tokenizer_config.json (ChatML chat template, eos "<|im_end|>") and
generation_config.json. Weights are seeded: the same arguments give the same bytes.

`overrides` are config fields (e.g. norm_topk_prob=True, mlp_only_layers=[1], clip_qkv=0.5,
tie_word_embeddings=True), plus two options: `shards=N` (save_pretrained with a max shard size of
1/N of the weights, so at least N shards, sometimes N+1, and model.safetensors.index.json) and `seed`
(default 0).

Shapes: vocab 128, hidden 32, 2 layers, 4 heads of 8, 2 KV heads, 4 experts, top-2, expert width 16
(qwen2_moe adds a shared expert of 24; dense MLPs of mlp_only_layers are 48 wide).

qwen3_5_moe (Gated DeltaNet hybrid): 4 layers (linear, linear, linear, full unless `layer_types` says), heads
of 16 with a quarter rotary, linear attention with 2 key heads and 4 value heads of 8, a shared expert of 24,
every norm weight perturbed so that its offset matters. It is saved the way the Hub holds it: the text model
inside Qwen3_5MoeForConditionalGeneration (model.language_model.*, plus a small vision tower), or with
`text_only=True` as Qwen3_5MoeForCausalLM (model.*); `fused_experts=True` rewrites the experts as fused 3-D
tensors (mlp.experts.gate_up_proj / down_proj) instead of separate ones. Special tokens:
<|endoftext|> 0 (pad), <|im_start|> 1, <|im_end|> 2 (eos, also in config.json and generation_config.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "qwen3_5_moe")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
TOKENIZER_VOCAB = 120

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still say hello to the world.
Experts are small feed forward networks; a router picks the best two of them for every token.
Hello there, how are you today? I am fine, thank you, and the weather is nice and warm.
Once upon a time there was a little robot who liked to read books about the sea and the stars.
The cat sat on the mat, and the dog sat on the log, and the bird sang in the tree all day long.
We test the runner with tiny random weights, so the text it writes will not make any sense.
"""

# Shared tiny shapes: vocab 128, hidden 32, 2 layers, 4 heads of 8, 2 kv heads, 4 experts, top-2.
_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": 2,  # <|im_end|>
    "pad_token_id": 0,  # <|endoftext|>
}

_FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 4, "intermediate_size": 16, "rope_theta": 1e6},
    "qwen2_moe": {
        "num_experts": 4,
        "moe_intermediate_size": 16,
        "intermediate_size": 48,  # dense MLP of mlp_only_layers / decoder_sparse_step layers
        "shared_expert_intermediate_size": 24,
        "rope_theta": 1e6,
    },
    "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 16, "intermediate_size": 48, "rope_theta": 1e6},
    "olmoe": {"num_experts": 4, "intermediate_size": 16, "rope_theta": 1e4},
    "qwen3_5_moe": {
        "num_hidden_layers": 4,
        "head_dim": 16,
        "num_experts": 4,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_conv_kernel_dim": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
    },
}
TINY_VISION = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
               "patch_size": 4, "num_position_embeddings": 16}


def _config(family: str, fields: dict[str, Any], text_only: bool = False):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    if family == "qwen3_5_moe":
        from transformers import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig

        text = {k: v for k, v in fields.items() if k not in ("eos_token_id", "pad_token_id")}
        if text_only:
            return Qwen3_5MoeTextConfig(**text)
        return Qwen3_5MoeConfig(text_config=text, vision_config=TINY_VISION,
                                tie_word_embeddings=fields["tie_word_embeddings"])

    cls = {"mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig, "olmoe": OlmoeConfig}
    return cls[family](**fields)


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE trained on TRAINING_TEXT, with the ChatML special tokens first (ids 0-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    return tok


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _fuse_experts(file: Path, num_experts: int) -> None:
    """Rewrite separate expert tensors (...experts.E.{gate,up,down}_proj.weight) as the fused 3-D layout."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    bases = sorted({k.split(".experts.")[0] for k in tensors if ".experts.0.gate_proj.weight" in k})
    for base in bases:
        parts = {p: [tensors.pop(f"{base}.experts.{e}.{p}.weight") for e in range(num_experts)]
                 for p in ("gate_proj", "up_proj", "down_proj")}
        tensors[f"{base}.experts.gate_up_proj"] = torch.stack(
            [torch.cat((g, u)) for g, u in zip(parts["gate_proj"], parts["up_proj"])])
        tensors[f"{base}.experts.down_proj"] = torch.stack(parts["down_proj"])
    tmp = file.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(file)


def make_tiny_model(dir, family="qwen3_moe", **overrides) -> Path:  # noqa: A002 - the agreed signature
    """Build a tiny random `family` checkpoint in `dir` (created if needed) and return its path."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(dir)
    path.mkdir(parents=True, exist_ok=True)
    shards = int(overrides.pop("shards", 1))
    seed = int(overrides.pop("seed", 0))
    text_only = bool(overrides.pop("text_only", False))
    fused = bool(overrides.pop("fused_experts", False))

    fields = {**_COMMON, **_FAMILY_FIELDS[family], **overrides}
    config = _config(family, fields, text_only)
    torch.manual_seed(seed)
    if family == "qwen3_5_moe" and not text_only:
        from transformers import Qwen3_5MoeForConditionalGeneration

        model = Qwen3_5MoeForConditionalGeneration(config).eval()
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if family == "qwen3_5_moe":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))

    save_kwargs: dict[str, Any] = {}
    if shards > 1:
        seen: set[int] = set()
        total = 0
        for tensor in model.state_dict().values():
            if tensor.data_ptr() not in seen:  # tied weights are saved once
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
        save_kwargs["max_shard_size"] = math.ceil(total / shards) + 1
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    if fused:
        _fuse_experts(path / "model.safetensors", fields["num_experts"])

    tok = train_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    eos_id, pad_id = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": fields["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
            "chat_template": CHATML_TEMPLATE,
        },
    )
    _write_json(
        path / "generation_config.json",
        {"eos_token_id": [eos_id, pad_id], "pad_token_id": pad_id, "do_sample": False},
    )
    return path


def make_fitting_store(root: Path) -> tuple[Path, object]:
    """A tiny random qwen3_moe whose widths the fused kernels take (hidden 128, experts 64 wide), quantized into a
    tier store under `root`: (checkpoint path, TierStore). The bundled model's 160-wide hidden size does not fit
    the kernels' 64-wide groups, so GPU tests of the captured step and the grouped kernels use this one."""
    from fate_cli.engine.stores import quantize_model
    from quant.store import QuantParams, TierStore

    path = make_tiny_model(root / "model", family="qwen3_moe", num_experts=8, num_hidden_layers=3, hidden_size=128,
                           moe_intermediate_size=64)
    quantize_model(path, root / "store", QuantParams(method="minmax"))
    return path, TierStore.open(root / "store", path)
