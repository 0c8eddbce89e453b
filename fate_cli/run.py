"""`fate run MODEL PROMPT`: generate a completion, streamed to stdout, or as one JSON object.

`fate run MODEL --prompts FILE --batch B`: a completion for every prompt of the file, B prompts decoded
together; stdout gets one completion per paragraph (or one JSON object per line), in the file's order.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console

from cache.hybrid import HybridOptions
from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.engine.runtime import Runtime, open_model
from fate_cli.errors import UsageError
from fate_cli.model.generation_config import generation_defaults
from fate_cli.model.values import check_sampling, check_text
from fate_cli.registry import resolve
from fate_cli.tokenizer import Message, StreamDecoder, Tokenizer


def sampling_from(
    runtime: Runtime, temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None
) -> SamplingParams:
    """Options given on the command line win; the rest come from generation_config.json."""
    check_sampling(temperature, top_p, top_k, seed)
    given = {n for n, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)) if v is not None}
    gen = generation_defaults(runtime.tokenizer.generation_defaults,
                              runtime.resolved.path / "generation_config.json", given)
    sampled = gen.do_sample
    return SamplingParams(
        temperature=temperature if temperature is not None else gen.temperature if sampled else 0.0,
        top_p=top_p if top_p is not None else gen.top_p if sampled else 1.0,
        top_k=top_k if top_k is not None else gen.top_k if sampled else 0,
        seed=seed,
    )


def prompt_ids(runtime: Runtime | Tokenizer, prompt: str, raw: bool) -> list[int]:
    tok = runtime.tokenizer if isinstance(runtime, Runtime) else runtime
    if raw:
        return tok.encode(prompt)
    return tok.encode_chat([Message("user", prompt)])


def prompt_from_stdin(prompt: str | None) -> str:
    """PROMPT as given; `-`, or none with stdin piped, reads the prompt from stdin (`echo hi | fate run tiny`)."""
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and (sys.stdin is None or sys.stdin.isatty()):
        raise UsageError("no prompt; give PROMPT, pipe it to stdin, or --prompts FILE for many")
    # read as bytes: a pipe's invalid UTF-8 gets a one-line error, not a traceback
    text = check_text(sys.stdin.buffer.read().decode("utf-8", "surrogateescape"), "the prompt on stdin").strip()
    if not text:
        raise UsageError("stdin holds no prompt; pipe some text, or give PROMPT")
    return text


def run_command(
    model: str,
    prompt: str | None,
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
    prompts_file: str | None = None,
    batch: int = 1,
    eager: bool = False,
    hybrid: HybridOptions | None = None,
) -> None:
    err = Console(stderr=True, highlight=False, soft_wrap=True)  # a pipe gets whole lines, not 80 columns
    check_sampling(temperature, top_p, top_k, seed)  # before anything loads
    if prompt is not None and prompt != "-":
        check_text(prompt, "PROMPT")
    if prompts_file is not None or batch != 1:
        if prompt is not None or prompts_file is None:
            raise UsageError("PROMPT and --prompts FILE (with --batch B) are two ways to give prompts; give one, "
                             "not both")
        return _run_batches(model, prompts_file, batch, max_tokens, temperature, top_p, top_k, seed, raw, device,
                            dtype, as_json, vram, policy, transfer_bits, err, eager, hybrid)
    prompt = prompt_from_stdin(prompt)
    runtime = open_model(model, device, dtype, policy, vram, transfer_bits, eager=eager, hybrid=hybrid)
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
        graphs=runtime.graphs,
    )
    text = runtime.tokenizer.decode(result.token_ids)
    stats = result.stats.as_dict() | {"temperature": params.temperature, "top_p": params.top_p,
                                      "top_k": params.top_k, "seed": params.seed, "decode": runtime.graphs.describe()}
    if runtime.setup is not None:
        # a budget that holds every expert at 16 bits runs no policy: say so rather than name the one asked for
        stats["policy"] = None if runtime.offload is None else runtime.setup.policy
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
    err.print(f"[dim]{footer(result.stats, runtime)}[/dim]")


def footer(s, runtime: Runtime) -> str:  # noqa: ANN001 - GenerationStats
    """`prompt 16 tok, 1000.0 tok/s | generated 128 tok, 250.0 tok/s | experts hit 93.1% | stop: length`"""
    # the first token comes from the prefill: a decode speed needs at least one decode step after it
    decode = f", {s.decode_tokens_per_s:.1f} tok/s" if s.generated_tokens > 1 else " (no decode step)"
    parts = [f"prompt {s.prompt_tokens} tok, {s.prefill_tokens_per_s:.1f} tok/s",
             f"generated {s.generated_tokens} tok{decode}"]
    if runtime.offload is not None:
        c = runtime.offload.stats
        parts.append(f"experts hit {100 * c.hit_rate:.1f}% ({c.hits} hits, {c.misses} misses)")
    return " | ".join([*parts, f"stop: {s.stop_reason}"])


def row_stats(result, batch) -> dict:  # noqa: ANN001 - GenerationResult, the batch's GenerationStats
    """One prompt's stats in a batch, with the fields a single run reports: its own token counts, and its
    tokens over the batch's prefill and decode time (the rows share those passes); `batch_total` holds the
    whole batch's."""
    own = len(result.token_ids)
    return {
        "prompt_tokens": result.stats.prompt_tokens,
        "generated_tokens": own,
        "prefill_tokens_per_s": result.stats.prompt_tokens / batch.prefill_seconds if batch.prefill_seconds else 0.0,
        "decode_tokens_per_s": (own - 1) / batch.decode_seconds if own > 1 and batch.decode_seconds else 0.0,
        "stop_reason": result.stats.stop_reason,
        "batch_total": batch.as_dict(),
    }


def answer_paragraph(text: str) -> str:
    """An answer as one paragraph of the text output: blank lines inside it dropped, so that one blank line
    always separates two answers (--json keeps the text exactly)."""
    return "\n".join(line for line in text.strip().splitlines() if line.strip())


def _run_batches(model: str, prompts_file: str, batch: int, max_tokens: int, temperature: float | None,
                 top_p: float | None, top_k: int | None, seed: int | None, raw: bool, device: str | None,
                 dtype: str | None, as_json: bool, vram: str | None, policy: str | None, transfer_bits: int | None,
                 err: Console, eager: bool = False, hybrid: HybridOptions | None = None) -> None:
    from fate_cli.prompts import read_prompts

    texts = read_prompts(prompts_file)
    tokenizer = Tokenizer(resolve(model).path)
    ids = [prompt_ids(tokenizer, t, raw) for t in texts]
    groups = [list(range(i, min(i + batch, len(ids)))) for i in range(0, len(ids), batch)]
    # the planner sizes the KV cache for every row of the largest batch, each as long as the longest row
    context = max(map(len, ids)) + max_tokens
    runtime = open_model(model, device, dtype, policy, vram, transfer_bits, context=context, eager=eager,
                         rows=max(len(g) for g in groups), hybrid=hybrid)
    if not as_json:
        runtime.announce(err)
    params = sampling_from(runtime, temperature, top_p, top_k, seed)
    sampler = Sampler(params, runtime.loaded.device)
    generated, prefill_seconds, decode_seconds = 0, 0.0, 0.0
    prefilled: list[int] = []  # prompts per prefill pass (klotski groups a batch's prompts)
    for group in groups:
        done = generate_batch(runtime.model, [ids[i] for i in group], max_tokens, sampler, runtime.tokenizer.eos_ids,
                              graphs=runtime.graphs)
        if runtime.offload is not None and len(group) > 1:
            prefilled += [len(g) for g in runtime.offload.last_groups]
        s = done.stats
        generated += s.generated_tokens
        prefill_seconds += s.prefill_seconds
        decode_seconds += s.decode_seconds
        for i, result in zip(group, done.results):
            text = runtime.tokenizer.decode(result.token_ids)
            if as_json:
                payload = {
                    "index": i, "model": runtime.resolved.name, "device": str(runtime.loaded.device),
                    "batch": len(group), "prompt": texts[i], "prompt_token_ids": ids[i],
                    "token_ids": result.token_ids, "text": text, "stats": row_stats(result, s),
                }
                sys.stdout.write(json.dumps(payload) + "\n")
            else:
                sys.stdout.write(answer_paragraph(text) + "\n\n")
            sys.stdout.flush()
    if not as_json:
        prompt_tokens = sum(map(len, ids))
        steps = generated - len(ids)  # each prompt's first token comes from its prefill
        n = len(prefilled)
        together = (f" | prefilled together in {n} group{'s' if n > 1 else ''} of up to {max(prefilled)}"
                    if prefilled and max(prefilled) > 1 else "")
        err.print(
            f"[dim]{len(ids)} prompts in batches of {batch}{together} | prompts {prompt_tokens} tok, "
            f"{prompt_tokens / prefill_seconds if prefill_seconds else 0:.1f} tok/s | generated "
            f"{generated} tok, {steps / decode_seconds if decode_seconds else 0:.1f} tok/s decode (all rows)[/dim]"
        )
