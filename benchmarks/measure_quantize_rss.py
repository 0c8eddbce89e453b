"""Peak memory of `fate quantize` on a generated Mixtral-shaped checkpoint of several GB.

    python3 benchmarks/measure_quantize_rss.py [--dir /tmp/fate-rss] [--layers 2] [--experts 8] [--hqq-iters 2]

1. Writes a random bf16 checkpoint with Mixtral's expert shape (hidden 4096, expert width 14336; a small
   vocabulary so that the largest tensor is an expert matrix, 112 MiB), tensor by tensor, in shards of
   at most 2 GiB with a weight index, as the Hub holds it. 2 layers x 8 experts: 5.6 GB.
2. Runs the real command, `python -m fate_cli quantize DIR --device cpu ...`, as a child process,
   sampling its /proc status every 0.2 s: VmHWM (the kernel's peak resident set of the process since its
   exec; getrusage's ru_maxrss is not used because it also counts the parent's pages between fork and
   exec), and the peaks of RssAnon and RssFile.
3. Runs a child that only imports what `fate quantize` imports and prints its own VmHWM: the fixed cost.
Prints one summary table (markdown). HQQ's optimiser on this 2-core CPU takes about 0.35 us per weight
per tier and iteration; its memory does not depend on the iteration count, so --hqq-iters 2 keeps the
run to tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def mixtral_tensors(layers: int, experts: int, hidden: int, inter: int, vocab: int) -> list[tuple[str, tuple]]:
    heads, kv, head_dim = 32, 8, hidden // 32
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv * head_dim, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv * head_dim, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (f"{p}.block_sparse_moe.gate.weight", (experts, hidden)),
        ]
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            out += [(f"{q}.w1.weight", (inter, hidden)), (f"{q}.w3.weight", (inter, hidden)),
                    (f"{q}.w2.weight", (hidden, inter))]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def write_checkpoint(path: Path, layers: int, experts: int, hidden: int, inter: int, vocab: int) -> int:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": hidden // 32,
        "num_local_experts": experts, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tensors = mixtral_tensors(layers, experts, hidden, inter, vocab)
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = 2 * int(torch.tensor(shape).prod())
        if current and size + nbytes > 2 << 30:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in shard:
            nbytes = 2 * int(torch.tensor(shape).prod())
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(path / fname, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for _name, shape in shard:  # one tensor in memory at a time
                t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
                f.write(t.view(torch.uint8).numpy().tobytes())
                del t
        total += (path / fname).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def run_measured(argv: list[str], env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0}

    def sample() -> None:
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
            except OSError:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    return {"rc": proc.returncode, "out": out, "seconds": time.perf_counter() - start,
            **{f"peak_{k}": v for k, v in peaks.items()}}


def vm_hwm_line() -> str:
    return "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fate-rss"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hqq-iters", type=int, default=2)
    ap.add_argument("--method", default="hqq")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and store afterwards")
    a = ap.parse_args()

    model = a.dir / "model"
    home = a.dir / "home"
    shutil.rmtree(home, ignore_errors=True)
    if (model / "model.safetensors.index.json").is_file():
        total = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        print(f"reusing the checkpoint in {model} ({total / 1e9:.2f} GB)", flush=True)
    else:
        t = time.perf_counter()
        total = write_checkpoint(model, a.layers, a.experts, a.hidden, a.inter, a.vocab)
        print(f"wrote {total / 1e9:.2f} GB to {model} in {time.perf_counter() - t:.0f} s", flush=True)
    largest = 2 * max(a.inter * a.hidden, a.vocab * a.hidden)

    env = {**os.environ, "FATE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    baseline = run_measured([sys.executable, "-c", "import fate_cli.app, fate_cli.quantize, quant.store, "
                             "quant.hqq_quant, hqq.core.optimize, torch; torch.randn(8) + 1; " + vm_hwm_line()], env)
    imports = int(baseline["out"].strip().splitlines()[-1]) * 1024
    argv = [sys.executable, "-m", "fate_cli", "quantize", str(model), "--device", "cpu",
            "--method", a.method, "--hqq-iters", str(a.hqq_iters)]
    print("running:", " ".join(argv), flush=True)
    run = run_measured(argv, env)
    print(run["out"].strip()[-2000:])
    if run["rc"] != 0:
        sys.exit(f"fate quantize failed with status {run['rc']}")
    store = sum(p.stat().st_size for p in (home / "tiers").rglob("*.safetensors"))
    print()
    peak = run["peak_VmHWM"]
    print("| checkpoint | largest tensor | store | method | time | peak RSS | peak RssAnon | peak RssFile | "
          "imports alone |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {total / 1e9:.2f} GB | {largest / MIB:.0f} MiB | {store / 1e9:.2f} GB | {a.method}, "
          f"{a.hqq_iters} iters | {run['seconds']:.0f} s | {peak / MIB:.0f} MiB | "
          f"{run['peak_RssAnon'] / MIB:.0f} MiB | {run['peak_RssFile'] / MIB:.0f} MiB | "
          f"{imports / MIB:.0f} MiB |")
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
