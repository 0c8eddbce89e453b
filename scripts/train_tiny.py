#!/usr/bin/env python3
"""Train the bundled "tiny" Mixture-of-Experts model and export it as a Hugging Face
``qwen3_moe`` checkpoint directory.

Shape: vocab 4096, hidden 160, 8 layers, 4 query heads x head_dim 40, 2 KV heads,
q_norm/k_norm before RoPE, every layer MoE with 32 experts, top-4, expert FFN 64,
tied embeddings: 9,178,400 parameters, model.safetensors 18.45 MB in bf16.

Data: ``data/train.bin`` and ``data/heldout.bin`` from ``scripts/prepare_data.py``
(4.17M and 0.11M tokens).

Command lines (from the repository root)::

    python3 scripts/prepare_data.py     # once; needs the Debian packages named there

    # real run on one GPU: bf16 autocast, torch._grouped_mm expert dispatch,
    # torch.compile when it works (each with a printed fallback)
    python scripts/train_tiny.py --device cuda --minutes 9 --out fate_cli/models/tiny

    # CPU smoke test (CI): 3 steps, writes a complete loadable directory
    python scripts/train_tiny.py --device cpu --steps 3 --batch 4 --out /tmp/tiny-smoke

    # same, then load the export with transformers and compare logits and loss in float32
    python scripts/train_tiny.py --device cpu --steps 3 --batch 4 --out /tmp/tiny-smoke --check-hf

The data, not the GPU, is the limit: on an H100 (torch 2.11) this trains at about 0.5M
tokens/s, and held-out loss bottoms out after a few epochs and then rises as the model
memorises the training set. Hence the defaults ``--batch 64 --epochs 6`` (1528 steps,
about 50 s of training after about 60 s of compilation; best held-out loss 3.71 in a
sweep of batch 32/64/128 and 3-12 epochs). ``--minutes`` is a ceiling counted from
process start, with a reserve for the export; ``--epochs 0`` removes the epoch cap.

Determinism: initialisation, batch sampling and the schedule depend only on ``--seed``
and the arguments, unless ``--minutes`` cuts the run short (then the cosine horizon is
re-estimated from measured throughput). CPU runs are bitwise reproducible; on CUDA,
index_add/index_put atomics make them close but not bitwise equal.

The exported weights are those with the best held-out loss at an evaluation
(``--export last`` for the final ones); while training, the best weights so far are
exported at most once a minute, so a run that is cut off still leaves a usable directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "fate_cli" / "models" / "tiny"


@dataclass
class TinyConfig:
    vocab_size: int = 4096
    hidden_size: int = 160
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 40
    num_experts: int = 32
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 64
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 1e-3
    initializer_range: float = 0.02


def hf_config(cfg: TinyConfig) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 256,  # dense MLP size; unused since every layer is MoE
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": True,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "output_router_logits": False,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": cfg.num_hidden_layers,
        "bos_token_id": None,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


GENERATION_CONFIG = {
    "bos_token_id": None,
    "eos_token_id": [2, 0],
    "pad_token_id": 0,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
}


# --------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # As in HF: normalise in float32, cast back, then scale.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_tables(cfg: TinyConfig) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.nh, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # KV head j serves query heads j*rep..(j+1)*rep-1, as HF's repeat_kv does.
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        q, k, v = q.to(v.dtype), k.to(v.dtype), v
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.nh * self.hd))


EXPORT_RESERVE_S = 20.0
GROUP_ALIGN = 16  # rows per expert group are padded to this for torch._grouped_mm


def _grouped_expert_mm(xs: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """rows xs[offs[e-1]:offs[e]] @ w[e].T for each expert e (CUDA, bf16)."""
    return torch._grouped_mm(xs.to(torch.bfloat16), w.to(torch.bfloat16).transpose(-2, -1), offs=offs)


class MoE(nn.Module):
    """Qwen3-MoE sparse block with grouped expert dispatch.

    The (token, slot) pairs are sorted by expert id and laid out in one buffer with a
    fixed row range per expert. ``impl="grouped"`` runs torch._grouped_mm on that buffer
    (no host sync); ``impl="bmm"`` pads each expert's rows to the largest group and uses
    one bmm (one host sync per layer, for the group size).
    """

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.top_k, self.inter = e, cfg.num_experts_per_tok, i
        self.gate = nn.Linear(h, e, bias=False)
        # Stacked expert weights in HF (out, in) layout: gate_proj and up_proj fused.
        self.w_gate_up = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w_down = nn.Parameter(torch.empty(e, h, i))
        self.impl = "bmm"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [T, H] -> (out [T, H], aux load-balancing loss, router z-loss)."""
        t, _ = x.shape
        e, k = self.num_experts, self.top_k
        logits = self.gate(x).float()
        probs = logits.softmax(dim=-1)
        top_w, top_i = probs.topk(k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)

        flat_e = top_i.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        sorted_e = flat_e[order]
        token = order // k
        counts = flat_e.new_zeros(e).scatter_add_(0, flat_e, torch.ones_like(flat_e))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(t * k, device=x.device) - starts[sorted_e]

        if self.impl == "grouped":
            padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
            base = torch.cumsum(padded, 0) - padded
            rows = t * k + e * GROUP_ALIGN  # static upper bound on padded rows
            offs = torch.cumsum(padded, 0).to(torch.int32)
        else:
            cap = int(counts.max())  # host sync, once per layer
            cap = (cap + 7) // 8 * 8
            base = torch.arange(e, device=x.device) * cap
            rows = e * cap
        dest = base[sorted_e] + rank

        src = x.to(torch.bfloat16) if self.impl == "grouped" else x
        xs = src.new_zeros(rows, x.shape[1]).index_copy(0, dest, src[token])
        if self.impl == "grouped":
            gu = _grouped_expert_mm(xs, self.w_gate_up, offs)
            g, u = gu.split(self.inter, dim=-1)
            ys = _grouped_expert_mm(F.silu(g) * u, self.w_down, offs)
        else:
            xb = xs.view(e, -1, xs.shape[1])
            gu = torch.bmm(xb, self.w_gate_up.transpose(1, 2))
            g, u = gu.split(self.inter, dim=-1)
            ys = torch.bmm(F.silu(g) * u, self.w_down.transpose(1, 2)).reshape(rows, -1)

        w_sorted = top_w.reshape(-1)[order]
        contrib = ys[dest] * w_sorted.to(ys.dtype)[:, None]
        out = x.new_zeros(x.shape).index_add(0, token, contrib.to(x.dtype))

        # Switch/Mixtral balance loss, normalised to 1.0 for a uniform router.
        frac = counts.float() / (t * k)
        aux = e * torch.sum(frac * probs.mean(dim=0))
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return out, aux, z


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        b, s, h = x.shape
        m, aux, z = self.mlp(self.post_attention_layernorm(x).reshape(b * s, h))
        return x + m.view(b, s, h), aux, z


class Backbone(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TinyMoE(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.initializer_range
        out_std = std / math.sqrt(2 * self.cfg.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "w_down")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def set_moe_impl(self, impl: str) -> None:
        for layer in self.model.layers:
            layer.mlp.impl = impl

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ids [B, S] -> (logits [B, S, V], mean aux loss, mean z-loss)."""
        s = ids.shape[1]
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        x = self.model.embed_tokens(ids)
        aux = z = x.new_zeros((), dtype=torch.float32)
        for layer in self.model.layers:
            x, a, zz = layer(x, cos, sin)
            aux, z = aux + a, z + zz
        x = self.model.norm(x)
        logits = F.linear(x, self.model.embed_tokens.weight)
        n = len(self.model.layers)
        return logits, aux / n, z / n

    # --- Hugging Face qwen3_moe export/import

    def hf_state_dict(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        inter = self.cfg.moe_intermediate_size
        for name, p in self.state_dict().items():
            p = p.detach().to("cpu", dtype)
            if name.endswith("mlp.w_gate_up"):
                prefix = name[: -len("w_gate_up")]
                for e in range(p.shape[0]):
                    out[f"{prefix}experts.{e}.gate_proj.weight"] = p[e, :inter].contiguous()
                    out[f"{prefix}experts.{e}.up_proj.weight"] = p[e, inter:].contiguous()
            elif name.endswith("mlp.w_down"):
                prefix = name[: -len("w_down")]
                for e in range(p.shape[0]):
                    out[f"{prefix}experts.{e}.down_proj.weight"] = p[e].contiguous()
            else:
                out[name] = p.contiguous()
        return out

    def load_hf_state_dict(self, sd: dict[str, Tensor]) -> None:
        own = self.state_dict()
        new: dict[str, Tensor] = {}
        for name in own:
            if name.endswith("mlp.w_gate_up"):
                prefix = name[: -len("w_gate_up")]
                new[name] = torch.stack(
                    [
                        torch.cat(
                            [sd[f"{prefix}experts.{e}.gate_proj.weight"], sd[f"{prefix}experts.{e}.up_proj.weight"]]
                        )
                        for e in range(self.cfg.num_experts)
                    ]
                )
            elif name.endswith("mlp.w_down"):
                prefix = name[: -len("w_down")]
                new[name] = torch.stack(
                    [sd[f"{prefix}experts.{e}.down_proj.weight"] for e in range(self.cfg.num_experts)]
                )
            else:
                new[name] = sd[name]
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in new.items()})


# --------------------------------------------------------------------------- MoE self-test


def grouped_mm_works(device: torch.device, cfg: TinyConfig) -> tuple[bool, str]:
    """Check that the grouped path matches the bmm path, forward and backward, in bf16."""
    if not hasattr(torch, "_grouped_mm"):
        return False, "torch._grouped_mm is missing"
    try:
        torch.manual_seed(0)
        ref = MoE(cfg).to(device)
        nn.init.normal_(ref.gate.weight, std=0.5)
        nn.init.normal_(ref.w_gate_up, std=0.05)
        nn.init.normal_(ref.w_down, std=0.05)
        ref.w_gate_up.data = ref.w_gate_up.data.bfloat16().float()
        ref.w_down.data = ref.w_down.data.bfloat16().float()
        grp = MoE(cfg).to(device)
        grp.load_state_dict(ref.state_dict())
        grp.impl = "grouped"
        x = torch.randn(300, cfg.hidden_size, device=device).bfloat16().float()
        results = []
        for m in (ref, grp):
            xi = x.clone().requires_grad_(True)
            out, _, _ = m(xi)
            (out.float().pow(2).sum()).backward()
            results.append((out.float(), xi.grad, m.w_gate_up.grad, m.w_down.grad))
        for a, b in zip(*results):
            err = ((a - b).norm() / (b.norm() + 1e-12)).item()
            if not math.isfinite(err) or err > 2e-2:
                return False, f"grouped/bmm mismatch (relative error {err:.3g})"
        return True, "ok"
    except Exception as exc:  # any kernel or shape limitation means: use the fallback
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


# --------------------------------------------------------------------------- data and loss


def load_tokens(path: Path, device: torch.device) -> Tensor:
    arr = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    return torch.from_numpy(arr).to(device)


def sample_batch(data: Tensor, batch: int, seq: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    offs = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    idx = offs[:, None] + torch.arange(seq + 1)
    chunk = data[idx.to(data.device)]
    return chunk[:, :-1], chunk[:, 1:]


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: TinyMoE, data: Tensor, seq: int, max_seqs: int | None, batch: int, amp: bool) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of the held-out stream."""
    model.eval()
    n = (data.numel() - 1) // seq
    if max_seqs:
        n = min(n, max_seqs)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        j = min(n, i + batch)
        x = data[i * seq : j * seq].view(j - i, seq)
        y = data[i * seq + 1 : j * seq + 1].view(j - i, seq)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits, _, _ = model(x)
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


# --------------------------------------------------------------------------- export


def export(model: TinyMoE, out: Path, tokenizer_dir: Path, log: dict) -> int:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = model.hf_state_dict(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src, dst = tokenizer_dir / name, out / name
        if not (dst.exists() and src.resolve() == dst.resolve()):
            shutil.copyfile(src, dst)
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return (out / "model.safetensors").stat().st_size


def check_hf(out: Path, heldout: Tensor, seq: int) -> None:
    """Load the export with transformers and compare its float32 loss with ours."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("check-hf: transformers is not installed, skipped")
        return
    from safetensors.torch import load_file

    ours = TinyMoE(TinyConfig())
    ours.load_hf_state_dict(load_file(str(out / "model.safetensors")))
    ours.set_moe_impl("bmm")
    hf, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    hf.eval()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    x = heldout[: 4 * seq + 1].cpu()
    ids, tgt = x[:-1].view(4, seq), x[1:].view(4, seq)
    with torch.no_grad():
        ours.eval()
        logits_ours = ours(ids)[0]
        logits_hf = hf(input_ids=ids).logits.float()
    l_ours, l_hf = lm_loss(logits_ours, tgt).item(), lm_loss(logits_hf, tgt).item()
    rel = abs(l_ours - l_hf) / abs(l_hf)
    centred = logits_hf - logits_hf.mean(dim=-1, keepdim=True)
    rel_logits = ((logits_ours - logits_hf).norm() / centred.norm()).item()
    print(
        f"check-hf: transformers {transformers.__version__}, loading info {bad or 'clean'}; "
        f"held-out loss ours {l_ours:.6f} hf {l_hf:.6f} (relative diff {rel:.2e}); "
        f"logits relative diff {rel_logits:.2e}"
    )
    if bad or rel > 1e-3 or rel_logits > 1e-3:
        raise SystemExit("check-hf: FAILED")


# --------------------------------------------------------------------------- training


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the tiny qwen3_moe model.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    ap.add_argument("--data-dir", type=Path, default=REPO / "data")
    ap.add_argument("--tokenizer-dir", type=Path, default=TOKENIZER_DIR)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget for the whole run")
    ap.add_argument(
        "--epochs", type=float, default=6.0, help="cap on passes over data/train.bin (0: no cap); see the docstring"
    )
    ap.add_argument("--steps", type=int, default=None, help="maximum number of optimizer steps")
    ap.add_argument("--batch", type=int, default=64, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument(
        "--eval-seqs", type=int, default=None, help="held-out windows per eval (default: all on CUDA, 8 on CPU)"
    )
    ap.add_argument("--moe-impl", choices=["auto", "grouped", "bmm"], default="auto")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--export", choices=["best", "last"], default="best")
    ap.add_argument("--check-hf", action="store_true", help="after export, compare against transformers")
    args = ap.parse_args(argv)
    if args.minutes is None and args.steps is None:
        ap.error("give --minutes and/or --steps")

    t_start = time.time()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    if cuda:
        torch.set_float32_matmul_precision("high")
    else:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        # Multithreaded index_put/index_add backward accumulates in varying order otherwise.
        torch.use_deterministic_algorithms(True, warn_only=True)

    cfg = TinyConfig()
    train = load_tokens(args.data_dir / "train.bin", device)
    heldout = load_tokens(args.data_dir / "heldout.bin", device)
    eval_seqs = args.eval_seqs if args.eval_seqs is not None else (0 if cuda else 8)
    print(f"data: train {train.numel():,} tokens, held-out {heldout.numel():,} tokens; device {device}")

    impl = args.moe_impl
    if impl == "auto":
        impl = "bmm"
        if cuda:
            ok, why = grouped_mm_works(device, cfg)
            impl = "grouped" if ok else "bmm"
            print(f"moe: torch._grouped_mm {'works' if ok else 'unusable (' + why + '), using padded bmm'}")
    torch.manual_seed(args.seed)  # the self-test above must not shift the initialisation
    model = TinyMoE(cfg).to(device)
    model.set_moe_impl(impl)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, MoE dispatch '{impl}'")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=cuda,
    )
    gen = torch.Generator().manual_seed(args.seed + 1)

    def loss_fn(m: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits, aux, z = m(x)
        ce = lm_loss(logits, y)
        return ce + cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z, ce

    step_model: nn.Module = model
    # The bmm fallback syncs on the group size, which would make compiled graphs break.
    use_compile = args.compile == "on" or (args.compile == "auto" and cuda and impl == "grouped")
    if use_compile:
        try:
            compiled = torch.compile(model)
            x, y = sample_batch(train, args.batch, args.seq, torch.Generator().manual_seed(0))
            for _ in range(2):  # compiles forward and backward; gradients are discarded
                loss, _ = loss_fn(compiled, x, y)
                loss.backward()
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            step_model = compiled
            print(f"compile: torch.compile ok ({time.time() - t_start:.0f}s since start)")
        except Exception as exc:
            model.zero_grad(set_to_none=True)
            print(
                f"compile: torch.compile failed, running eager ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            )

    # The budget counts from process start (data, self-test and compile included) and keeps
    # a reserve for the final export, so `--minutes 9` ends within about 9 minutes.
    deadline = t_start + args.minutes * 60 - EXPORT_RESERVE_S if args.minutes is not None else math.inf
    max_steps = args.steps if args.steps is not None else 10**9
    if args.epochs:
        max_steps = min(max_steps, math.ceil(args.epochs * train.numel() / (args.batch * args.seq)))
    # The cosine horizon is the step cap; when the wall budget would end the run sooner,
    # the horizon is re-estimated from measured throughput.
    total: int | None = max_steps if max_steps < 10**9 else None

    def lr_at(step: int, total: int | None) -> float:
        warmup = min(args.warmup, max(1, total // 10)) if total is not None else args.warmup
        if step < warmup:
            return args.lr * (step + 1) / warmup
        if total is None:
            return args.lr
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    history: list[dict] = []
    best: tuple[float, int, dict | None] = (math.inf, -1, None)
    t0 = time.time()
    last_save = t0
    mark: tuple[int, float] | None = None
    step, tokens, train_loss = 0, 0, float("nan")
    ema = None

    def make_log(exported_step: int, heldout_loss: float, final: bool) -> dict:
        return {
            "complete": final,
            "steps": step,
            "exported_step": exported_step,
            "tokens_seen": tokens,
            "epochs_seen": round(tokens / train.numel(), 2),
            "wall_time_s": round(time.time() - t_start, 1),
            "train_time_s": round(time.time() - t0, 1),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__,
            "moe_impl": impl,
            "compiled": step_model is not model,
            "seed": args.seed,
            "batch": args.batch,
            "seq_len": args.seq,
            "lr": args.lr,
            "final_train_loss": train_loss,
            "final_heldout_loss": history[-1]["heldout_loss"] if history else None,
            "heldout_loss": heldout_loss,
            "heldout_tokens_evaluated": min((heldout.numel() - 1) // args.seq, eval_seqs or 10**9) * args.seq,
            "parameters": n_params,
            "config": asdict(cfg),
            "history": history,
        }

    while step < max_steps:
        now = time.time()
        if now >= deadline:
            break
        if args.minutes is not None:
            if step == 10:
                mark = (step, now)
            elif mark is not None and step >= mark[0] + 20 and step % 25 == 0:
                per_step = (now - mark[1]) / (step - mark[0])
                reachable = step + int((deadline - now) / per_step)
                total = reachable if reachable < max_steps else (max_steps if max_steps < 10**9 else None)
        lr = lr_at(step, total)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = sample_batch(train, args.batch, args.seq, gen)
        loss, ce = loss_fn(step_model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % 10 == 0 or step == max_steps or step <= 3:
            train_loss = ce.item()
            ema = train_loss if ema is None else 0.9 * ema + 0.1 * train_loss
        last = step >= max_steps or time.time() >= deadline
        if step % args.eval_every == 0 or last:
            train_loss = ce.item()
            h = evaluate(model, heldout, args.seq, eval_seqs, 64, cuda)
            el = time.time() - t0
            history.append(
                {"step": step, "tokens": tokens, "seconds": round(el, 1), "train_loss": train_loss, "heldout_loss": h}
            )
            print(
                f"step {step:6d}/{total or '?'} tokens {tokens / 1e6:8.2f}M lr {lr:.2e} "
                f"train {train_loss:.4f} (ema {ema:.4f}) heldout {h:.4f} "
                f"{el:6.0f}s {tokens / max(el, 1e-9) / 1e3:7.1f}k tok/s",
                flush=True,
            )
            if h < best[0]:
                best = (h, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
                if not last and time.time() - last_save > 60:
                    # Interim export of the best weights so far, in case the run is cut off.
                    export(model, args.out, args.tokenizer_dir, make_log(step, h, final=False))
                    last_save = time.time()
    train_time = time.time() - t0

    final_heldout = history[-1]["heldout_loss"] if history else math.nan
    exported_step, heldout_loss = step, final_heldout
    if args.export == "best" and best[2] is not None and best[1] != step:
        model.load_state_dict(best[2])
        exported_step, heldout_loss = best[1], best[0]
        print(f"export: weights of step {best[1]} (best held-out {best[0]:.4f}; final {final_heldout:.4f})")
    size = export(model, args.out, args.tokenizer_dir, make_log(exported_step, heldout_loss, final=True))
    print(
        f"done: {step} steps, {tokens:,} tokens ({tokens / train.numel():.1f} epochs) in {train_time:.0f}s; "
        f"train loss {train_loss:.4f}, held-out loss {heldout_loss:.4f} (step {exported_step}); "
        f"{n_params:,} parameters; model.safetensors {size / 1e6:.2f} MB -> {args.out}"
    )
    if size > 20_000_000:
        print("WARNING: weights file is larger than 20 MB")
    if args.check_hf:
        check_hf(args.out, heldout, args.seq)
    return 0


if __name__ == "__main__":
    sys.exit(main())
