"""Generation: prefill the prompt, then decode one token at a time through the KV cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from fate_cli.engine.finite import NON_FINITE, non_finite_error
from fate_cli.errors import ResourceError
from fate_cli.model.kv_cache import KVCache, RowPositions
from fate_cli.model.model import Transformer

if TYPE_CHECKING:
    from fate_cli.engine.decode_step import DecodeGraphs


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    seed: int | None = 0


# Sampling's limit as the temperature goes to 0 is greedy; below float32's smallest normal number the
# division below would underflow to 0 / 0.
GREEDY_BELOW = torch.finfo(torch.float32).tiny


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [batch, vocab] -> token ids [batch]; NON_FINITE for a row whose logits hold NaN or infinity
        (the caller sees it with the token, no extra synchronisation)."""
        p = self.params
        if p.temperature < GREEDY_BELOW:
            token = logits.argmax(dim=-1)
            chosen = logits.gather(-1, token[:, None]).squeeze(-1)  # NaN and +inf win the argmax: their row shows
            return torch.where(torch.isfinite(chosen), token, NON_FINITE)
        logits = logits.float()
        top = logits.amax(dim=-1, keepdim=True)
        finite = torch.isfinite(top)  # NaN and +inf propagate through the max
        # shifted to <= 0 before dividing, so that a tiny temperature gives -inf, never inf - inf = NaN
        logits = torch.where(finite, logits - top, 0.0) / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) > p.top_p  # keep the token that crosses p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        token = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        return torch.where(finite.squeeze(-1), token, NON_FINITE)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    stop_reason: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: GenerationStats


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so host clocks time it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampler: Sampler,
    eos_ids: Sequence[int] = (),
    on_token: Callable[[int], bool | None] | None = None,
    cache: KVCache | None = None,
    start_pos: int = 0,
    graphs: DecodeGraphs | None = None,
) -> GenerationResult:
    """Generate up to max_new_tokens after prompt_ids (placed at start_pos of `cache`).

    on_token(id) is called for each new token; returning True stops generation. With `graphs`, decode
    steps replay a captured step (fate_cli/engine/decode_step.py) where it can run, the eager forward elsewhere.
    """
    device = model.embed_tokens.weight.device
    max_len = model.args.max_position_embeddings
    needed = start_pos + len(prompt_ids) + max_new_tokens
    if start_pos + len(prompt_ids) >= max_len:
        raise ResourceError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {max_len}; shorten the prompt"
        )
    if cache is None:
        cache = graphs.cache(1, min(needed, max_len)) if graphs else model.new_cache(1, min(needed, max_len))
    step = graphs.step(cache) if graphs else None  # captured here, before the clock starts
    max_new_tokens = min(max_new_tokens, cache.max_len - start_pos - len(prompt_ids))
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    out: list[int] = []
    if max_new_tokens <= 0:
        stats.stop_reason = "length"
        return GenerationResult(out, stats)
    eos = set(eos_ids)
    model.begin_request()

    synchronize(device)
    t0 = time.perf_counter()
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    logits = model(tokens, cache, start_pos, last_only=True)[:, -1]
    token = sampler(logits)
    next_id = int(token.item())  # the host must see each token to stream it and test for EOS
    if next_id == NON_FINITE:
        raise non_finite_error(model)
    t1 = time.perf_counter()
    stats.prefill_seconds = t1 - t0

    pos = start_pos + len(prompt_ids)
    stats.stop_reason = "length"
    while True:
        out.append(next_id)
        if next_id in eos:
            stats.stop_reason = "eos"
            break
        if on_token is not None and on_token(next_id):
            stats.stop_reason = "stopped"
            break
        if len(out) >= max_new_tokens:
            break
        logits = step(token, [pos]) if step else model(token.view(1, 1), cache, pos)[:, -1]
        pos += 1
        token = sampler(logits)
        next_id = int(token.item())
        if next_id == NON_FINITE:
            raise non_finite_error(model)
    synchronize(device)
    stats.decode_seconds = time.perf_counter() - t1
    stats.generated_tokens = len(out)
    stats.prefill_tokens_per_s = len(prompt_ids) / stats.prefill_seconds if stats.prefill_seconds else 0.0
    # decode speed counts the tokens produced by decode steps (the first comes from prefill)
    steps = len(out) - 1
    stats.decode_tokens_per_s = steps / stats.decode_seconds if steps > 0 and stats.decode_seconds else 0.0
    return GenerationResult(out, stats)


def prefill_rows(model: Transformer, prompts: Sequence[Sequence[int]], cache: KVCache, first_row: int = 0
                 ) -> list[torch.Tensor]:
    """Prompt i prefilled from position 0 into row first_row + i of `cache`, alone or in the groups the expert
    provider asks for (klotski's pass through each layer together) -> each prompt's last logits [vocab]."""
    device = model.embed_tokens.weight.device
    logits: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for group in model.provider.prefill_groups([len(p) for p in prompts]):
        inputs = [torch.tensor([list(prompts[i])], dtype=torch.long, device=device) for i in group]
        rows = [cache.rows(first_row + i, first_row + i + 1) for i in group]
        if len(group) == 1:
            out = model(inputs[0], rows[0], 0, last_only=True)[:, -1]
        else:
            out = model.prefill_together(inputs, rows)
        for i, row_logits in zip(group, out):
            logits[i] = row_logits
    return logits


@dataclass
class BatchResult:
    results: list[GenerationResult]  # one per prompt, in order
    stats: GenerationStats  # the batch's: all prompts' tokens over the batch's prefill and decode time


@torch.inference_mode()
def generate_batch(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampler: Sampler,
    eos_ids: Sequence[int] = (),
    graphs: DecodeGraphs | None = None,
) -> BatchResult:
    """Generate for several prompts at once: each prompt prefilled into its own row of one KV cache (alone,
    or in groups that pass through each layer together where the expert provider asks: klotski), then
    one decode step for all rows together, each row at its own position. Greedy outputs equal generate()'s
    for each prompt alone; a row that has finished idles until every row has."""
    device = model.embed_tokens.weight.device
    max_len = model.args.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= max_len:
        raise ResourceError(f"a prompt is {longest} tokens but the model's context is {max_len}; shorten it")
    length = min(longest + max_new_tokens, max_len)
    cache = graphs.cache(len(prompts), length) if graphs else model.new_cache(len(prompts), length)
    step = graphs.step(cache) if graphs else None
    limits = [min(max_new_tokens, length - len(p)) for p in prompts]
    eos = set(eos_ids)
    model.begin_request()

    synchronize(device)
    t0 = time.perf_counter()
    tokens = sampler(torch.stack(prefill_rows(model, prompts, cache)))
    ids = tokens.tolist()
    if NON_FINITE in ids:
        raise non_finite_error(model)
    t1 = time.perf_counter()

    outs: list[list[int]] = [[] for _ in prompts]
    reasons = [""] * len(prompts)
    pos = [len(p) for p in prompts]
    while True:
        for i, token_id in enumerate(ids):
            if reasons[i]:
                continue
            outs[i].append(token_id)
            if token_id in eos:
                reasons[i] = "eos"
            elif len(outs[i]) >= limits[i]:
                reasons[i] = "length"
        if all(reasons):
            break
        if step:
            logits = step(tokens, pos)
        else:
            logits = model(tokens.view(-1, 1), cache, RowPositions.of(pos, device))[:, -1]
        pos = [p if reasons[i] else p + 1 for i, p in enumerate(pos)]  # a finished row rewrites its last slot
        tokens = sampler(logits)
        ids = tokens.tolist()
        if NON_FINITE in ids:
            raise non_finite_error(model)
    synchronize(device)
    decode_seconds = time.perf_counter() - t1

    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), generated_tokens=sum(map(len, outs)),
                            prefill_seconds=t1 - t0, decode_seconds=decode_seconds, stop_reason="batch")
    stats.prefill_tokens_per_s = stats.prompt_tokens / stats.prefill_seconds if stats.prefill_seconds else 0.0
    steps = stats.generated_tokens - len(prompts)  # each prompt's first token comes from its prefill
    stats.decode_tokens_per_s = steps / decode_seconds if steps > 0 and decode_seconds else 0.0
    results = [
        GenerationResult(out, GenerationStats(prompt_tokens=len(p), generated_tokens=len(out), stop_reason=r))
        for p, out, r in zip(prompts, outs, reasons)
    ]
    return BatchResult(results, stats)
