"""`fate run MODEL PROMPT`: generate a completion, streamed to stdout, or as one JSON object."""

from __future__ import annotations

import json
import sys

from rich.console import Console

from fate_cli.generate import Sampler, SamplingParams, generate
from fate_cli.runtime import Runtime, open_model
from fate_cli.tokenizer import Message, StreamDecoder


def sampling_from(
    runtime: Runtime, temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None
) -> SamplingParams:
    """Options given on the command line win; the rest come from generation_config.json."""
    gen = runtime.tokenizer.generation_defaults
    sampled = bool(gen.get("do_sample", False))
    return SamplingParams(
        temperature=temperature if temperature is not None else float(gen.get("temperature", 1.0)) if sampled else 0.0,
        top_p=top_p if top_p is not None else float(gen.get("top_p", 1.0)) if sampled else 1.0,
        top_k=top_k if top_k is not None else int(gen.get("top_k", 0)) if sampled else 0,
        seed=seed,
    )


def prompt_ids(runtime: Runtime, prompt: str, raw: bool) -> list[int]:
    if raw:
        return runtime.tokenizer.encode(prompt)
    return runtime.tokenizer.encode_chat([Message("user", prompt)])


def run_command(
    model: str,
    prompt: str,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    raw: bool,
    device: str | None,
    dtype: str | None,
    as_json: bool,
    vram: str | None = None,
    policy: str | None = "fate",
    transfer_bits: int | None = None,
) -> None:
    err = Console(stderr=True, highlight=False)
    runtime = open_model(model, device, dtype, policy, vram, transfer_bits)
    if not as_json:
        runtime.announce(err)
    params = sampling_from(runtime, temperature, top_p, top_k, seed)
    ids = prompt_ids(runtime, prompt, raw)
    stream = StreamDecoder(runtime.tokenizer)

    def on_token(token_id: int) -> None:
        piece = stream.push(token_id)
        if piece and not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    result = generate(
        runtime.model,
        ids,
        max_tokens,
        Sampler(params, runtime.loaded.device),
        eos_ids=runtime.tokenizer.eos_ids,
        on_token=on_token,
    )
    text = runtime.tokenizer.decode(result.token_ids)
    stats = result.stats.as_dict() | {"temperature": params.temperature, "top_p": params.top_p,
                                      "top_k": params.top_k, "seed": params.seed}
    if runtime.setup is not None:
        stats["policy"] = runtime.setup.policy
        stats["plan"] = runtime.plan_line()
    if runtime.offload is not None:
        stats["cache"] = runtime.offload.stats.as_dict()
    if as_json:
        payload = {
            "model": runtime.resolved.name,
            "device": str(runtime.loaded.device),
            "prompt_token_ids": ids,
            "token_ids": result.token_ids,
            "text": text,
            "stats": stats,
        }
        sys.stdout.write(json.dumps(payload) + "\n")
        return
    sys.stdout.write("\n")
    s = result.stats
    err.print(
        f"[dim]prompt {s.prompt_tokens} tok, {s.prefill_tokens_per_s:.1f} tok/s | "
        f"generated {s.generated_tokens} tok, {s.decode_tokens_per_s:.1f} tok/s | stop: {s.stop_reason}[/dim]"
    )
