"""Time a hybrid model's linear-attention layers alone, at a synthetic shape's real size (random weights).

    python3 benchmarks/time_linear_attention.py [--shape qwen3.6-35b-a3b] [--dtype bfloat16]
        [--prompt 512] [--steps 200] [--json FILE]

Builds only the Gated DeltaNet layers of the shape (no experts, no attention), then measures per token:
decode through all of them (one token, the recurrent update, eager and replayed as one CUDA graph) and prefill
of a `--prompt`-token chunk. Divide the decode figure by a bench's decode step time (1 / decode tok/s) for the
linear-attention share of the step. Prints which kernels ran (flash-linear-attention or PyTorch).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from fate_cli.model.gated_deltanet import GatedDeltaNet, backend
from fate_cli.model.kv_cache import KVCache, RowPositions
from fate_cli.model.linear_state import LinearState
from fate_cli.synthetic import synthetic_args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3.6-35b-a3b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, opts.dtype)
    args = synthetic_args(f"synthetic:{opts.shape}")
    layers = nn.ModuleList(GatedDeltaNet(args, i) for i in args.linear_layer_ids).to(device, dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    for p in layers.parameters():
        if p.dim() > 1:
            p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5, generator=gen)
        else:
            p.fill_(0.0)
    cache = KVCache(0, 1, 1, 1, 1, dtype, device)
    cache.state = LinearState.empty(args, 1, dtype, device)
    h = args.hidden_size

    def run(x: torch.Tensor, pos: int | RowPositions) -> torch.Tensor:
        for layer in layers:
            x = x + layer(x, None, cache, pos)
        return x

    prompt = torch.randn(1, opts.prompt, h, generator=gen, device=device, dtype=dtype) * 0.1
    run(prompt, 0)
    _sync(device)
    t0 = time.perf_counter()
    run(prompt, 0)
    _sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3

    token = torch.randn(1, 1, h, generator=gen, device=device, dtype=dtype) * 0.1
    at = RowPositions(torch.tensor([opts.prompt], device=device), opts.prompt + 1)
    for _ in range(3):
        run(token, at)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(opts.steps):
        run(token, at)
    _sync(device)
    eager_ms = (time.perf_counter() - t0) * 1e3 / opts.steps

    graph_ms = None
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run(token, at)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(graph):
            run(token, at)
        graph.replay()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(opts.steps):
            graph.replay()
        _sync(device)
        graph_ms = (time.perf_counter() - t0) * 1e3 / opts.steps

    result = {
        "shape": opts.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": opts.dtype, "kernels": backend(device), "linear_layers": len(layers),
        "state_bytes_per_row": LinearState.bytes_per_row(args, dtype),
        "prefill_ms_per_token": prefill_ms / opts.prompt, "prefill_tokens": opts.prompt,
        "decode_ms_per_token_eager": eager_ms, "decode_ms_per_token_graph": graph_ms,
    }
    print(json.dumps(result, indent=1))
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
