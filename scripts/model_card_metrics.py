"""Measure a model's card metrics through fate's own runtime and loader.

    python scripts/model_card_metrics.py --model tiny --write-card

Reports held-out loss and perplexity, train loss (from data/train.bin when present, else the
training log), per-layer expert utilisation on held-out text (top expert's share, normalised
entropy), and per-layer cross-layer predictability: layer i-1's gate input through layer i's router,
the recall of layer i's true top-k within the predicted top-k and top-(k+1).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from fate_cli.engine.runtime import open_model
from fate_cli.perplexity import perplexity
from predictors.evaluate import GateInputRecorder, routing_report

CARD_START, CARD_END = "<!-- metrics:start -->", "<!-- metrics:end -->"
CI_WINDOWS = 32  # the bundled-model test re-measures this prefix of the held-out text on every CI run


def measure(
    model_name: str, window: int, device: str, train_bin: Path | None, max_windows: int | None
) -> tuple[dict, Path]:
    runtime = open_model(model_name, device, "float32")
    model, path = runtime.model, runtime.resolved.path
    heldout_text = (path / "heldout.txt").read_text(encoding="utf-8")
    heldout_ids = runtime.tokenizer.encode(heldout_text, add_special_tokens=False)

    recorder = GateInputRecorder(model.provider)
    held = perplexity(model.with_experts(recorder), heldout_ids, window, max_windows)
    layers = routing_report(model, recorder.inputs)
    prefix = perplexity(model, heldout_ids, window, CI_WINDOWS)

    metrics: dict = {
        "model": model_name,
        "window": window,
        "heldout_tokens": held.tokens,
        "heldout_loss": round(held.mean_nll, 4),
        "heldout_perplexity": round(held.perplexity, 3),
        "ci_windows": CI_WINDOWS,
        "ci_heldout_perplexity": round(prefix.perplexity, 3),
    }
    if train_bin is not None and train_bin.is_file():
        train_ids = np.fromfile(train_bin, dtype=np.uint16)[: held.tokens + held.windows].tolist()
        train = perplexity(model, train_ids, window, max_windows)
        metrics["train_loss"] = round(train.mean_nll, 4)
        metrics["train_loss_source"] = f"{train_bin} (first {train.tokens} tokens)"
    else:
        log = path / "train_log.json"
        if log.is_file():
            metrics["train_loss"] = json.loads(log.read_text())["final_train_loss"]
            metrics["train_loss_source"] = "train_log.json (last steps of training)"
    metrics["layers"] = [
        {
            "layer": r.layer,
            "top_expert_share": round(r.top_share, 4),
            "entropy": round(r.entropy, 4),
            "recall_at_k": None if r.recall_at_k is None else round(r.recall_at_k, 4),
            "recall_at_k_plus_1": None if r.recall_at_k1 is None else round(r.recall_at_k1, 4),
        }
        for r in layers
    ]
    predicted = [r for r in layers if r.recall_at_k is not None]
    metrics["mean_recall_at_k"] = round(sum(r.recall_at_k for r in predicted) / len(predicted), 4)
    metrics["mean_recall_at_k_plus_1"] = round(sum(r.recall_at_k1 for r in predicted) / len(predicted), 4)
    metrics["top_k"] = model.args.top_k
    metrics["num_experts"] = model.args.num_experts
    return metrics, path


def markdown(m: dict) -> str:
    k = m["top_k"]
    lines = [
        f"Measured by `python scripts/model_card_metrics.py --model {m['model']} --write-card` "
        f"(float32, windows of {m['window']} tokens).",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| held-out loss | {m['heldout_loss']:.4f} |",
        f"| held-out perplexity | {m['heldout_perplexity']:.2f} |",
        f"| held-out tokens scored | {m['heldout_tokens']} |",
        f"| held-out perplexity, first {m['ci_windows']} windows (checked in CI) | {m['ci_heldout_perplexity']:.2f} |",
    ]
    if "train_loss" in m:
        lines.append(f"| train loss | {m['train_loss']:.4f} ({m['train_loss_source']}) |")
    lines += [
        f"| mean cross-layer recall, top-{k} in predicted top-{k} | {m['mean_recall_at_k']:.3f} |",
        f"| mean cross-layer recall, top-{k} in predicted top-{k + 1} | {m['mean_recall_at_k_plus_1']:.3f} |",
        "",
        f"| layer | top expert's share | entropy / log({m['num_experts']}) | recall@{k} | recall@{k + 1} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in m["layers"]:
        rk = "-" if r["recall_at_k"] is None else f"{r['recall_at_k']:.3f}"
        rk1 = "-" if r["recall_at_k_plus_1"] is None else f"{r['recall_at_k_plus_1']:.3f}"
        lines.append(f"| {r['layer']} | {r['top_expert_share']:.3f} | {r['entropy']:.3f} | {rk} | {rk1} |")
    return "\n".join(lines)


def write_card(card: Path, table: str) -> None:
    text = card.read_text(encoding="utf-8") if card.is_file() else f"{CARD_START}\n{CARD_END}\n"
    block = f"{CARD_START}\n{table}\n{CARD_END}"
    pattern = re.compile(re.escape(CARD_START) + ".*?" + re.escape(CARD_END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block + "\n"
    tmp = card.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-bin", type=Path, default=Path("data/train.bin"))
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--write-card", action="store_true", help="update the card (README.md) beside the weights")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics to this file")
    a = parser.parse_args()
    torch.manual_seed(0)
    m, model_dir = measure(a.model, a.window, a.device, a.train_bin, a.max_windows)
    table = markdown(m)
    print(table)
    if a.json:
        a.json.write_text(json.dumps(m, indent=2) + "\n")
    if a.write_card:
        write_card(model_dir / "README.md", table)
        (model_dir / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
        print(f"wrote {model_dir / 'README.md'} and metrics.json", file=sys.stderr)


if __name__ == "__main__":
    main()
