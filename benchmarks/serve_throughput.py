"""Throughput of `fate serve` under N concurrent streaming clients.

Starts `python -m fate_cli serve MODEL --port 0` (any free port, loopback), waits until /health answers,
sends one warm-up request, then for each N of --clients runs N clients at once, each streaming one
/v1/completions request of --max-tokens tokens (end of sequence banned through logit_bias, so every
request generates exactly that many). Prints, per N: generated tokens over the wall time from the first
request sent to the last one done (all clients together), per-client tokens/s, mean time to first token.
One JSON object per N also goes to --out when given.

    PYTHONPATH=. python3 benchmarks/serve_throughput.py tiny --clients 1,4,16 --max-tokens 128 --out r.jsonl
    (extra arguments after `--` go to fate serve, e.g. `-- --vram 50% --policy fate`)
    PYTHONPATH=. python3 benchmarks/serve_throughput.py synthetic:qwen3-30b-a3b -- --vram 8GB --policy fate
    (a synthetic shape: random weights, prompts read as bytes; see fate_cli/synthetic.py)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time

PROMPT = "The hacker ethic is"


def start_server(model: str, max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "fate_cli", "serve", model, "--port", "0", "--max-batch", str(max_batch), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        sys.stderr.write(line)
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if found:
            port = int(found.group(1))
            threading.Thread(target=lambda: [sys.stderr.write(x) for x in proc.stderr], daemon=True).start()
            return proc, port
    raise SystemExit(f"fate serve exited ({proc.wait()}) before listening")


def wait_ready(port: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def model_id(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/v1/models")
    return json.loads(conn.getresponse().read())["data"][0]["id"]


def one_client(port: int, model: str, max_tokens: int, bias: dict, out: dict) -> None:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, "logit_bias": bias})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body.encode(), {"Content-Type": "application/json"})
    response = conn.getresponse()
    first = None
    tokens = 0
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("choices") and first is None:
            first = time.perf_counter()
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    out.update(start=t0, first=first or time.perf_counter(), end=time.perf_counter(), tokens=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--eos", default="", help="end-of-sequence ids to ban, comma-separated "
                        "[default: read from the model's generation_config.json]")
    parser.add_argument("--out", default=None, help="append one JSON line per client count here")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    eos = [int(x) for x in args.eos.split(",") if x] or eos_of(args.model)
    bias = {str(t): -100 for t in eos}
    proc, port = start_server(args.model, args.max_batch, extra)
    try:
        wait_ready(port)
        model = model_id(port)
        one_client(port, model, 8, bias, {})  # warm-up
        for n in [int(x) for x in args.clients.split(",")]:
            results = [{} for _ in range(n)]
            threads = [threading.Thread(target=one_client, args=(port, model, args.max_tokens, bias, r))
                       for r in results]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = max(r["end"] for r in results) - min(r["start"] for r in results)
            tokens = sum(r["tokens"] for r in results)
            row = {"model": args.model, "clients": n, "max_batch": args.max_batch, "max_tokens": args.max_tokens,
                   "generated_tokens": tokens, "wall_s": round(wall, 3),
                   "tokens_per_s": round(tokens / wall, 1),
                   "per_client_tokens_per_s": round(sum(r["tokens"] / (r["end"] - r["start"]) for r in results) / n, 1),
                   "mean_ttft_s": round(sum(r["first"] - r["start"] for r in results) / n, 4),
                   "serve_args": extra}
            print(f"{n:3d} clients: {row['tokens_per_s']:9.1f} tokens/s all clients, "
                  f"{row['per_client_tokens_per_s']:8.1f} per client, TTFT {row['mean_ttft_s'] * 1000:.0f} ms "
                  f"({tokens} tokens in {wall:.2f} s)", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def eos_of(model: str) -> list[int]:
    sys.path.insert(0, os.getcwd())
    from fate_cli.synthetic import is_synthetic

    if is_synthetic(model):  # random weights, no vocabulary: nothing ends a request early
        return []
    from fate_cli.registry import resolve
    from fate_cli.tokenizer import Tokenizer

    return Tokenizer(resolve(model).path).eos_ids


if __name__ == "__main__":
    main()
