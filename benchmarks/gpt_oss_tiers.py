"""gpt_oss experts requantized into fate's tiers against MXFP4 kept as the hot tier: quality and bytes per expert.

    python3 benchmarks/gpt_oss_tiers.py [--dir /tmp/fate-gpt-oss-tiers] [--windows 16] [--window 128]

For tiny random gpt_oss checkpoints built with transformers (tests/tiny_gpt_oss.py), in both expert layouts:
- plain: the experts in bfloat16 (the checkpoint rewritten in bfloat16), the reference is the checkpoint;
- mxfp4: the experts as the published checkpoints hold them, the reference is their exact bfloat16 values;
and two shapes: `tiny` (the tests' shape: hidden 64, experts 32 wide) and `small` (hidden 256, experts 256 wide,
8 experts, top-2), each variant of the experts runs the whole model over text the 16-bit reference samples
itself (temperature 1, fixed seed; `--windows` windows of `--window` tokens), and the table gives
- perplexity on that text, and its change over the reference's;
- mean KL(reference || variant) of the next-token distributions, and how often both pick the same top token;
- bits per weight and bytes per expert (weights, scales and zeros, the 16-bit biases; fate's layouts are
  128-byte aligned) at gpt-oss-20b's expert shape (hidden 2880, width 2880; gpt-oss-120b's is the same).
Variants: fate's tiers built by `fate quantize`'s code (HQQ, its default 20 iterations) at INT8 g64, INT4 g64 (the
default hot tier), INT4 g32 and INT2 g32 (the default cold tier), each expert from that tier alone
(cache/tiered.py), and MXFP4 as a hot tier would keep it (e2m1 codes in blocks of 32 with a power-of-two scale:
quantize_mxfp4 of the bfloat16 weights; for an MXFP4 checkpoint, its own blocks, so the reference itself).
Prints one markdown table. CPU only, a few minutes.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/tiny_gpt_oss.py builds the checkpoints

from cache.tiered import TieredExperts, uniform_tiers  # noqa: E402
from fate_cli.engine.stores import quantize_model  # noqa: E402
from fate_cli.model.experts import DenseExpert, ResidentExperts  # noqa: E402
from fate_cli.model.loader import Checkpoint, load_args, load_model  # noqa: E402
from fate_cli.model.model import Transformer  # noqa: E402
from quant.gpt_oss_experts import MXFP4_BLOCK, dequantize_mxfp4, quantize_mxfp4  # noqa: E402
from quant.layout import ExpertLayout  # noqa: E402
from quant.store import QuantParams, TierStore  # noqa: E402
from tests.tiny_gpt_oss import make_tiny_gpt_oss  # noqa: E402

GPT_OSS_20B = (2880, 2880)  # hidden, expert width (gpt-oss-120b's experts have the same shape)
SHAPES = {
    "tiny": {},
    "small": {"hidden_size": 256, "intermediate_size": 256, "num_local_experts": 8, "head_dim": 64},
}
# (label, store parameters, tier): every expert from that tier of a store built with those parameters
TIERS = [
    ("INT8 g64", QuantParams(hot_bits=8, hot_group_size=64, cold_bits=4, cold_group_size=64, dense_layers=0), "hot"),
    ("INT4 g64 (hot)", QuantParams(dense_layers=0), "hot"),
    ("INT4 g32", QuantParams(hot_bits=4, hot_group_size=32, dense_layers=0), "hot"),
    ("INT2 g32 (cold)", QuantParams(dense_layers=0), "cold"),
]


def dense_bytes(hidden: int, inter: int) -> int:
    """One expert at 16 bits with its biases."""
    return 3 * hidden * inter * 2 + (2 * inter + hidden) * 2


def mxfp4_bytes(hidden: int, inter: int) -> int:
    """One expert as MXFP4 with 16-bit biases: half a byte a weight, a one-byte scale per 32, the biases."""
    weights = 3 * hidden * inter
    return weights // 2 + weights // MXFP4_BLOCK + (2 * inter + hidden) * 2


def tier_bytes(params: QuantParams, tier: str, hidden: int, inter: int) -> int:
    bits, group = (params.hot_bits, params.hot_group_size) if tier == "hot" else (params.cold_bits,
                                                                                  params.cold_group_size)
    return ExpertLayout.quantized(hidden, inter, bits, group, "bfloat16").nbytes


def to_bf16(path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    weights = path / "model.safetensors"
    tensors = {k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return path


def mxfp4_experts(path: Path) -> ResidentExperts:
    """Every expert's weights through MXFP4 and back (exact in float32), its biases as stored."""
    args, ckpt = load_args(path), Checkpoint(path)
    experts = args.experts

    def read(names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(ckpt.get(n).float() for n in names)

    layers = {}
    for layer in args.moe_layer_ids:
        row = []
        for e in range(args.num_experts):
            weights = [dequantize_mxfp4(*quantize_mxfp4(w), torch.float32) for w in read(experts.names(layer, e))]
            row.append(DenseExpert(*weights, biases=read(experts.bias_names(layer, e)), act=args.expert_act))
        layers[layer] = row
    return ResidentExperts(layers)


@torch.inference_mode()
def sample_text(model: Transformer, windows: int, window: int, seed: int = 0) -> list[list[int]]:
    """`windows` sequences of `window` tokens the model samples itself (temperature 1), each from one random token."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.args.vocab_size
    out = []
    for _ in range(windows):
        tokens = [int(torch.randint(vocab, (1,), generator=gen))]
        cache = model.new_cache(1, window)
        logits = model(torch.tensor([tokens]), cache, 0)[0, -1]
        while len(tokens) < window:
            nxt = int(torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen))
            logits = model(torch.tensor([[nxt]]), cache, len(tokens))[0, -1]
            tokens.append(nxt)
        out.append(tokens)
    return out


@torch.inference_mode()
def log_probs(model: Transformer, texts: list[list[int]]) -> torch.Tensor:
    """Next-token log-probabilities [windows, window - 1, vocab] over each text."""
    rows = []
    for tokens in texts:
        logits = model(torch.tensor([tokens]), model.new_cache(1, len(tokens)), 0)[0, :-1].float()
        rows.append(F.log_softmax(logits, -1))
    return torch.stack(rows)


def compare(ref: torch.Tensor, ours: torch.Tensor, texts: list[list[int]]) -> dict[str, float]:
    targets = torch.tensor([t[1:] for t in texts])
    nll = -ours.gather(-1, targets[..., None]).mean().item()
    kl = (ref.exp() * (ref - ours)).sum(-1).mean().item()
    agree = (ref.argmax(-1) == ours.argmax(-1)).float().mean().item()
    return {"ppl": math.exp(nll), "kl": kl, "agree": agree}


def run(root: Path, windows: int, window: int) -> list[dict]:
    rows = []
    for shape, overrides in SHAPES.items():
        for layout in ("plain", "mxfp4"):
            t0 = time.perf_counter()
            base = root / f"{shape}-{layout}"
            shutil.rmtree(base, ignore_errors=True)
            path = make_tiny_gpt_oss(base / "model", mxfp4=layout == "mxfp4", **overrides)
            if layout == "plain":
                to_bf16(path)
            args = load_args(path)
            h, i = args.hidden_size, args.moe_intermediate_size
            model = load_model(path, "cpu", torch.float32).model
            texts = sample_text(model, windows, window)
            ref = log_probs(model, texts)
            head = {"shape": f"{shape} (H {h}, I {i}, {args.num_experts} experts)", "layout": layout}
            rows.append({**head, "variant": "16-bit (reference)", "bytes_20b": dense_bytes(*GPT_OSS_20B),
                         "bytes": dense_bytes(h, i), **compare(ref, ref, texts)})
            mx = ref if layout == "mxfp4" else log_probs(model.with_experts(mxfp4_experts(path)), texts)
            rows.append({**head, "variant": "MXFP4 (kept as the hot tier)", "bytes_20b": mxfp4_bytes(*GPT_OSS_20B),
                         "bytes": mxfp4_bytes(h, i), **compare(ref, mx, texts)})
            stores: dict[QuantParams, TierStore] = {}
            for label, params, tier in TIERS:
                if params not in stores:
                    store_dir = base / f"store-{len(stores)}"
                    quantize_model(path, store_dir, params)
                    stores[params] = TierStore.open(store_dir, path)
                store = stores[params]
                experts = TieredExperts(store, args, uniform_tiers(args, tier), "cpu", torch.float32)
                tiered = model.with_experts(experts)
                rows.append({**head, "variant": f"fate {label}", "bytes_20b": tier_bytes(params, tier, *GPT_OSS_20B),
                             "bytes": store.tiers[tier].layout.nbytes,
                             **compare(ref, log_probs(tiered, texts), texts)})
            print(f"[{shape} {layout}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | layout | experts as | bits/weight (20b) | bytes/expert gpt-oss-20b | bytes/expert here | "
             "perplexity | vs 16-bit | KL(ref‖variant) | same top-1 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    base: dict[tuple[str, str], float] = {}
    for r in rows:
        key = (r["shape"], r["layout"])
        base.setdefault(key, r["ppl"])
        change = 100 * (r["ppl"] / base[key] - 1)
        bits = r["bytes_20b"] * 8 / (3 * GPT_OSS_20B[0] * GPT_OSS_20B[1])  # biases and alignment included
        lines.append(f"| {r['shape']} | {r['layout']} | {r['variant']} | {bits:.3f} | {r['bytes_20b']:,} | "
                     f"{r['bytes']:,} | {r['ppl']:.3f} | {change:+.2f}% | {r['kl']:.5f} | {100 * r['agree']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fate-gpt-oss-tiers"), help="where the checkpoints go")
    ap.add_argument("--windows", type=int, default=16, help="sampled texts per model")
    ap.add_argument("--window", type=int, default=128, help="tokens per text (the tiny models' window is 8)")
    opts = ap.parse_args()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    print(table(run(opts.dir, opts.windows, opts.window)))


if __name__ == "__main__":
    main()
