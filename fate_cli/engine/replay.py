"""Trace replay: learned routing measured at a real model's expert size (`replay:mixtral-8x7b`).

No real MoE checkpoint can be downloaded here, and a synthetic model's routing is that of random weights.
So the bundled trained model is run on held-out text and every step's traffic is recorded: each MoE
layer's router input (from which the policies' predictors make their real predictions, through the
bundled model's routers) and the experts it routed to, with token counts. The replay then drives the
offload runtime with exactly that traffic, over the bundled model's layers and experts, but with experts
of the named model's size at the tiers' bit widths: real host-tier copies, real slots, real kernels.
What it does not run is attention and the rest of the bundled model (tiny), so replay speed is expert
time only; every report names it replay.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.errors import UsageError
from fate_cli.model.experts import ExpertFn, ExpertProvider
from fate_cli.model.model import Transformer
from fate_cli.synthetic import CONFIGS, synthetic_args
from fate_cli.synthetic import PREFIX as SYNTHETIC

PREFIX = "replay:"

def is_replay(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)


def replay_shape(name: str) -> tuple[int, int]:
    shape = name.removeprefix(PREFIX)
    custom = re.fullmatch(r"(\d+)x(\d+)", shape)  # replay:HIDDENxWIDTH, any expert size
    if custom and all(int(g) > 0 for g in custom.groups()):
        return int(custom.group(1)), int(custom.group(2))
    if shape not in CONFIGS:
        raise UsageError(
            f"unknown replay target '{name}'; use one of {', '.join(PREFIX + k for k in CONFIGS)} "
            "or replay:HIDDENxWIDTH"
        )
    args = synthetic_args(SYNTHETIC + shape)  # the published shapes, one table for both
    return args.hidden_size, args.moe_intermediate_size


@dataclass
class LayerTraffic:
    layer: int
    gate_input: torch.Tensor  # [tokens, hidden of the recorded model], float32
    ids: list[int]
    counts: list[int]


@dataclass
class Step:
    layers: list[LayerTraffic] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.layers[0].gate_input.shape[0] if self.layers else 0


def merge_steps(steps: Sequence[Step]) -> Step:
    """Prefill steps of several prompts as one step of all their tokens (klotski's groups): per layer, the
    router inputs stacked and the routing summed. Exact: routing is per token."""
    merged = Step()
    for parts in zip(*(s.layers for s in steps)):
        counts: dict[int, int] = {}
        for t in parts:
            for e, n in zip(t.ids, t.counts):
                counts[e] = counts.get(e, 0) + n
        ids = sorted(counts)
        merged.layers.append(LayerTraffic(parts[0].layer, torch.cat([t.gate_input for t in parts]), ids,
                                          [counts[e] for e in ids]))
    return merged


class TraceRecorder(ExpertProvider):
    """An ExpertProvider wrapper that keeps each forward step's router inputs and routing."""

    def __init__(self, inner: ExpertProvider, first_moe_layer: int):
        self.inner, self.first = inner, first_moe_layer
        self.steps: list[Step] = []
        self._pending: dict[int, torch.Tensor] = {}

    def begin_request(self) -> None:
        self.inner.begin_request()

    def gate_input(self, layer: int, hidden: torch.Tensor) -> None:
        if layer == self.first:
            self.steps.append(Step())
        self._pending[layer] = hidden.detach().float().cpu()
        self.inner.gate_input(layer, hidden)

    def experts(self, layer: int, ids: Sequence[int], token_counts: Sequence[int]) -> Iterable[tuple[int, ExpertFn]]:
        self.steps[-1].layers.append(LayerTraffic(layer, self._pending.pop(layer), list(ids), list(token_counts)))
        return self.inner.experts(layer, ids, token_counts)


def _recording(model: Transformer) -> tuple[Transformer, TraceRecorder]:
    """The same model with its provider wrapped in a TraceRecorder."""
    recorder = TraceRecorder(model.provider, list(model.args.moe_layer_ids)[0])
    return model.with_experts(recorder), recorder


def record(model: Transformer, prompts: Sequence[Sequence[int]], gen_len: int) -> list[list[Step]]:
    """Greedy generation of gen_len tokens after each prompt on `model` (the bundled model): its traffic."""
    device = model.embed_tokens.weight.device
    traces = []
    for prompt in prompts:
        recording, recorder = _recording(model)
        generate(recording, prompt, gen_len, Sampler(SamplingParams(temperature=0.0), device))
        traces.append(recorder.steps)
    return traces


def record_batch(model: Transformer, prompts: Sequence[Sequence[int]], gen_len: int) -> list[Step]:
    """The traffic of one batch (generate_batch): one prefill step per prompt, then steps of len(prompts) tokens."""
    device = model.embed_tokens.weight.device
    recording, recorder = _recording(model)
    generate_batch(recording, prompts, gen_len, Sampler(SamplingParams(temperature=0.0), device))
    return recorder.steps


class ReplayModel:
    """Plays recorded steps through a provider: the predictor hook, then each routed expert on its tokens."""

    def __init__(self, provider, hidden: int, device: torch.device, dtype: torch.dtype, max_tokens: int):  # noqa: ANN001
        self.provider, self.device = provider, device
        gen = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(max_tokens, hidden, generator=gen, device=device, dtype=dtype)
        self.out = torch.zeros(max_tokens, hidden, device=device, dtype=dtype)

    def to_device(self, steps: list[Step]) -> list[Step]:
        return [
            Step([LayerTraffic(t.layer, t.gate_input.to(self.device), t.ids, t.counts) for t in s.layers])
            for s in steps
        ]

    def step(self, step: Step) -> None:
        for traffic in step.layers:
            self.provider.gate_input(traffic.layer, traffic.gate_input)
            if self.device.type == "cuda":  # the live runtime reads the routing back to the host here
                torch.cuda.current_stream(self.device).synchronize()
            count = dict(zip(traffic.ids, traffic.counts))
            for e, fn in self.provider.experts(traffic.layer, traffic.ids, traffic.counts):
                n = count[e]
                self.out[:n] += fn(self.x[:n])
