"""What `fate bench` measures: a model, a synthetic model or a trace replay, opened once, run under many plans.

Each target loads what every row shares once (non-expert weights, the tier store, the pinned host
tier), then `session(policy, budget)` builds a fresh expert cache for one row, and `Session.run` times
one request: prefill of the prompt, then greedy decode.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from cache.host_tier import HostTier
from cache.hybrid import HybridOptions
from cache.offload import OffloadedExperts
from cache.planner import Footprint
from cache.policies import PolicyContext
from cache.setup import (
    OffloadSetup,
    build_offloaded,
    check_policy,
    footprint,
    plan_for,
    plan_slots,
    transfer_tier_for,
)
from fate_cli.engine.coactivation import bundled_coactivation
from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch, synchronize
from fate_cli.engine.profile import offline_miss_curves
from fate_cli.engine.runtime import DEFAULT_CONTEXT, store_dense_experts
from fate_cli.model.experts import ExpertProvider, ResidentExperts
from fate_cli.model.loader import Weights, load_resident_experts
from fate_cli.model.model import Transformer, prefill_chunk
from fate_cli.registry import BUNDLED_ROOT
from predictors.coactivation import Coactivation
from quant.kernels import select_backend
from quant.store import QuantParams


@dataclass
class RunTiming:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    token_ids: list[int]  # a batch's outputs one after the other
    request_tokens_per_s: float = 0.0  # prompt and generated tokens over the whole request's time


class Session:
    """One row's expert cache over a target's shared parts (and, for a model, the model built over them)."""

    def __init__(self, target: Target, setup: OffloadSetup, provider: ExpertProvider,
                 offload: OffloadedExperts | None):
        self.target, self.setup, self.provider, self.offload = target, setup, provider, offload
        self.model: Transformer | None = None
        self.graphs: DecodeGraphs | None = None

    def run(self, prompts: Sequence[Sequence[int]], gen_len: int) -> RunTiming:
        """One request of len(prompts) prompts decoded together (a batch of one: a plain request)."""
        return self.target.run(self, prompts, gen_len)

    def decode_mode(self) -> str:
        """How the last request's decode steps ran."""
        return self.graphs.describe() if self.graphs else "decode: eager (trace replay)"

    def close(self) -> None:
        self.target.release(self)


class Target:
    kind = "model"  # "model" | "synthetic" | "replay"

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, store, footprint: Footprint,  # noqa: ANN001
                 ctx: PolicyContext, transfer_bits: int | None):
        self.name, self.device, self.dtype, self.store = name, device, dtype, store
        self.footprint, self.ctx, self.transfer_bits = footprint, ctx, transfer_bits
        self.transfer_tier = transfer_tier_for(store, transfer_bits)
        self.act = None  # the experts' activation, where the model's is not silu(gate) * up
        self._hosts: dict[tuple[str, ...], HostTier] = {}
        self.hybrid = HybridOptions()  # --miss, --link, --cpu-threads; the cost model measured once, kept here
        self.eager = False  # decode with the eager forward (--eager), not the captured step
        self.capture = True  # False: the decode step runs uncaptured, on any device (the CPU tests' way)

    @property
    def size_bytes(self) -> int:
        """Non-expert weights plus every expert at the hot tier: what `resident` holds."""
        return self.footprint.non_expert + self.footprint.all_hot

    def backend(self) -> str:
        return select_backend(self.device, self.store.tiers["hot"].layout)

    def plan(self, policy: str, budget: int) -> OffloadSetup:
        raise NotImplementedError

    def host(self, tiers: tuple[str, ...]) -> HostTier:
        """The pinned host tier, built once per tier set and shared by every row."""
        if tiers not in self._hosts:
            self._hosts.clear()  # a different tier set (another --transfer-bits): free the old one first
            self._hosts[tiers] = HostTier(self.store, self.ctx.moe_layers, self.ctx.num_experts, tiers,
                                          pin=self.device.type == "cuda")
        return self._hosts[tiers]

    def session(self, policy: str, budget: int, miss: str | None = None) -> Session:
        """miss: where fate's misses go for this row (None: --miss as given)."""
        setup = self.plan(policy, budget)
        if setup.full_precision:
            return Session(self, setup, self.dense_experts(), None)
        tiers = (self.transfer_tier,) if self.transfer_tier else ("hot", "cold")
        options = self.hybrid if miss is None else dataclasses.replace(self.hybrid, miss=miss)
        offload = build_offloaded(self.ctx, self.store, setup, self.device, self.dtype, self.transfer_bits,
                                  host=self.host(tiers), act=self.act, hybrid=options)
        return Session(self, setup, offload, offload)

    def cost_line(self) -> str:
        """The cost model's measured numbers at the hot tier (or --transfer-bits'), for the bench's header."""
        from cache.hybrid import costs_for

        tier = self.transfer_tier or "hot"
        tiers = (self.transfer_tier,) if self.transfer_tier else ("hot", "cold")
        layer = self.ctx.moe_layers[-1]
        costs = costs_for(self.host(tiers), self.store.tiers[tier].layout, tier, layer, self.ctx.top_k, self.device,
                          self.dtype, self.act, self.hybrid)
        return f"{self.name}: {costs.summary()}"

    def dense_experts(self) -> ResidentExperts:
        return store_dense_experts(self.store, self.ctx.num_experts, self.ctx.moe_layers, self.device, self.dtype,
                                   self.act)

    def run(self, session: Session, prompts: Sequence[Sequence[int]], gen_len: int) -> RunTiming:
        raise NotImplementedError

    def release(self, session: Session) -> None:
        session.provider = session.offload = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


class ModelTarget(Target):
    """A real model (pulled, bundled or local) or a synthetic one: its non-expert weights and a tier store; each
    row builds a model over the same weights with that row's experts."""

    def __init__(self, name: str, kind: str, weights: Weights, store, transfer_bits: int | None,  # noqa: ANN001
                 coactivation: Callable[[], Coactivation] | None = None,
                 curves: Mapping[int, Sequence[float]] | None = None):
        args = weights.args
        params = QuantParams(**store.manifest["params"])
        self.context = min(DEFAULT_CONTEXT, args.max_position_embeddings)
        fp = footprint(args, weights.dtype, self.context, params, weights.device.type == "cuda")
        ctx = PolicyContext.of(args, weights.routers(), coactivation)
        super().__init__(name, weights.device, weights.dtype, store, fp, ctx, transfer_bits)
        self.kind, self.weights, self.params, self.act = kind, weights, params, args.expert_act
        self.curves = curves  # miss curves for a measured plan, where the model has them

    def plan(self, policy: str, budget: int) -> OffloadSetup:
        return plan_for(self.weights.args, self.dtype, policy, budget, self.context, self.params,
                        self.device.type == "cuda", self.transfer_bits is not None, curves=self.curves)

    def dense_experts(self) -> ResidentExperts:
        if self.weights.checkpoint is None:  # synthetic: the store's 16-bit tier
            return super().dense_experts()
        return load_resident_experts(self.weights.args, self.weights.checkpoint, self.device, self.dtype)

    def session(self, policy: str, budget: int, miss: str | None = None) -> Session:
        session = super().session(policy, budget, miss)
        session.model = self.weights.model(session.provider)
        session.graphs = DecodeGraphs(session.model, self.eager, self.capture)
        return session

    def run(self, session: Session, prompts: Sequence[Sequence[int]], gen_len: int) -> RunTiming:
        sampler = Sampler(SamplingParams(temperature=0.0), self.device)
        if len(prompts) == 1:
            result = generate(session.model, prompts[0], gen_len, sampler, graphs=session.graphs)
            s, tokens = result.stats, result.token_ids
        else:
            batch = generate_batch(session.model, prompts, gen_len, sampler, graphs=session.graphs)
            s, tokens = batch.stats, [t for r in batch.results for t in r.token_ids]
        request = (s.prompt_tokens + s.generated_tokens) / (s.prefill_seconds + s.decode_seconds)
        return RunTiming(s.prefill_tokens_per_s, s.decode_tokens_per_s, tokens, request)

    def release(self, session: Session) -> None:
        session.graphs.forget()  # its graphs and banks hold the session's memory
        session.model = None
        super().release(session)


class ReplayTarget(Target):
    """The bundled model's recorded traffic through experts of another model's size (see replay.py)."""

    kind = "replay"

    def __init__(self, name: str, recorded_model: Transformer, hidden: int, inter: int, device: torch.device,
                 dtype: torch.dtype, transfer_bits: int | None):
        from quant.synthetic import SyntheticStore

        args = recorded_model.args
        params = QuantParams()
        store = SyntheticStore(hidden, inter, args.moe_layer_ids, args.num_experts, params, name=name)
        hot = store.tiers["hot"].layout.nbytes
        activations = 4 * prefill_chunk() * (2 * hidden + 3 * args.top_k * inter)
        workspace = activations + 3 * hidden * inter * 4 + (64 * 1024**2 if device.type == "cuda" else 0)
        fp = Footprint(tuple(args.moe_layer_ids), args.num_experts, args.top_k, 0, hot, 3 * hidden * inter * 2, 0,
                       workspace, (3 * hidden + 3 * inter) * dtype.itemsize,  # x, out, an expert's output and work
                       activations)
        # the predictors run the bundled model's routers on its recorded router inputs, in float32
        ctx = PolicyContext.of(args, {k: v.to(device, torch.float32) for k, v in recorded_model.routers().items()},
                               bundled_coactivation)  # the recorded model is the bundled one
        super().__init__(name, device, dtype, store, fp, ctx, transfer_bits)
        self.recorded, self.hidden = recorded_model, hidden
        self.traces: dict[tuple[tuple[int, ...], int], list] = {}

    def plan(self, policy: str, budget: int) -> OffloadSetup:
        check_policy(policy)  # never 16-bit experts: the replay's topology has no checkpoint to hold them
        # the recorded model is the bundled one: its miss curves plan a measured split
        plan = plan_slots(self.footprint, policy, budget, self.transfer_bits is not None,
                          curves=offline_miss_curves(BUNDLED_ROOT / "tiny"))
        return OffloadSetup(plan, policy, budget, full_precision=False)

    def steps(self, prompts: Sequence[Sequence[int]], gen_len: int) -> list:
        from fate_cli.engine.replay import record, record_batch

        key = (tuple(map(tuple, prompts)), gen_len)
        if key not in self.traces:
            self.traces[key] = (record(self.recorded, prompts, gen_len)[0] if len(prompts) == 1
                                else record_batch(self.recorded, prompts, gen_len))
        return self.traces[key]

    def run(self, session: Session, prompts: Sequence[Sequence[int]], gen_len: int) -> RunTiming:
        from fate_cli.engine.replay import ReplayModel, merge_steps

        steps = self.steps(prompts, gen_len)
        prefill, decode = steps[: len(prompts)], steps[len(prompts) :]  # one prefill step per prompt
        groups = session.offload.prefill_groups([s.tokens for s in prefill])  # a replay always offloads
        prefill = [merge_steps([prefill[i] for i in g]) if len(g) > 1 else prefill[g[0]] for g in groups]
        player = ReplayModel(session.provider, self.hidden, self.device, self.dtype,
                             max(s.tokens for s in prefill + decode))
        prefill, decode = player.to_device(prefill), player.to_device(decode)
        session.provider.begin_request()
        synchronize(self.device)
        t0 = time.perf_counter()
        for step in prefill:
            player.step(step)
        synchronize(self.device)
        t1 = time.perf_counter()
        for step in decode:
            player.step(step)
        synchronize(self.device)
        t2 = time.perf_counter()
        prompt_tokens = sum(s.tokens for s in prefill)
        decode_tokens = sum(s.tokens for s in decode)
        generated = len(prompts) + decode_tokens  # each prompt's first token comes from its prefill
        return RunTiming(prompt_tokens / (t1 - t0), decode_tokens / (t2 - t1) if decode else 0.0, [],
                         (prompt_tokens + generated) / (t2 - t0))
