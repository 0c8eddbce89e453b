"""Open a model for a command: resolve the name, pick device and dtype, load weights and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cache.offload import OffloadedExperts
from fate_cli.engine.coactivation import offline_coactivation
from fate_cli.engine.decode_step import DecodeGraphs
from fate_cli.engine.profile import offline_miss_curves
from fate_cli.engine.stores import open_store
from fate_cli.errors import UsageError
from fate_cli.model.experts import ExpertProvider, ResidentExperts, store_layer_experts
from fate_cli.model.loader import LoadedModel, Weights, checked_args, load_resident_experts, load_weights
from fate_cli.model.moe import GROUPED_MIN_TOKENS
from fate_cli.registry import ResolvedModel, resolve
from fate_cli.synthetic import (
    SyntheticTokenizer,
    is_synthetic,
    random_weights,
    synthetic_args,
    synthetic_model,
    synthetic_store,
)
from fate_cli.tokenizer import Tokenizer
from quant.grouped import grouped_backend, waves_backend, why_not_grouped

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from cache.host_tier import HostTier
    from cache.hybrid import HybridOptions
    from cache.setup import OffloadSetup
    from fate_cli.model.args import ModelArgs
    from predictors.coactivation import Coactivation
    from quant.expert_act import ClampedSwiGLU
    from quant.store import TierStore

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device '{name}'; use cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {name} was asked for but CUDA is not available (torch {torch.__version__}, "
            f"{'no GPU visible' if torch.version.cuda else 'a CPU-only build'}); use --device cpu"
        )
    return torch.device(name)


def device_label(device: torch.device) -> str:
    """The GPU's name, or CPU: what a report says it ran on."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DEFAULT_CONTEXT = 4096  # tokens of KV cache the plan reserves, capped at the model's own limit


@dataclass
class Runtime:
    resolved: ResolvedModel
    loaded: LoadedModel
    tokenizer: Tokenizer
    setup: OffloadSetup | None = None  # None: plain resident model, no planner
    offload: OffloadedExperts | None = None  # None: every expert resident at 16 bits
    graphs: DecodeGraphs | None = None  # the captured decode step (fate_cli/engine/decode_step.py); None: eager

    @property
    def model(self):  # noqa: ANN201 - the Transformer
        return self.loaded.model

    def describe(self) -> str:
        a, d = self.loaded.args, self.loaded.device
        where = device_label(d)
        head = (
            f"{self.resolved.name} ({a.family}, {a.num_layers} layers, {a.num_experts} experts, top-{a.top_k}) "
            f"on {d.type} [{where}], {dtype_name(self.loaded.dtype)}"
        )
        decode = self.graphs.expected() if self.graphs else "decode: eager"
        if a.linear is not None:  # a Gated DeltaNet hybrid: which kernels run it, and that it reads text only
            from fate_cli.model.gated_deltanet import backend

            vision = ", text only (the vision tower is not loaded)" if "language_model" in a.checkpoint_prefix else ""
            head = f"{head}{vision}; {backend(d)}"
        prefill = prefill_note(self.model)
        head = f"{head}{dense_note(self.model)}"
        if self.offload is None:
            return f"{head}; experts resident at 16 bits; {prefill}; {decode}"
        from quant.kernels import backend_label

        backends = ", ".join(sorted({backend_label(b) for b in self.offload.backends.values()}))
        return f"{head}; policy {self.setup.policy}, expert kernels {backends}; {prefill}; {decode}"

    def announce(self, console) -> None:  # noqa: ANN001 - a rich Console on stderr
        """The device/backend/policy line, and the plan's summary when there is a plan."""
        console.print(f"[dim]{self.describe()}[/dim]", soft_wrap=True)
        if self.plan_line():
            console.print(f"[dim]{self.plan_line()}[/dim]", soft_wrap=True)

    def plan_line(self) -> str:
        if self.setup is None:
            return ""
        plan = self.setup.plan
        return "; ".join([plan.summary(), *plan.notes, *(self.offload.host.notes if self.offload else [])])


def dense_note(model) -> str:  # noqa: ANN001 - a Transformer
    """How the dense (non-expert) Linears compute, where --dense changed it; empty otherwise."""
    from quant.dense_int8 import KERNEL_MAX_ROWS, Int8Linear

    if not any(isinstance(m, Int8Linear) for m in model.modules()):
        return ""
    return (f", dense weights INT8 (torch _weight_int8pack_mm up to {KERNEL_MAX_ROWS} tokens, bfloat16 "
            "activations; dequantized blocks above)")


def prefill_note(model) -> str:  # noqa: ANN001 - a Transformer
    """Which path a prompt's experts and attention take (fate_cli/model/moe.py, quant/grouped.py), as the device line
    says it."""
    args, provider = model.args, model.provider
    if not args.moe_layer_ids:
        return "prefill: no MoE layers"
    if not provider.fused:
        why = "this provider keeps no bank for the grouped kernels"
        return f"prefill: experts one by one ({why}), {attention_note(model)}"
    weight = model.embed_tokens.weight
    x = torch.empty(GROUPED_MIN_TOKENS, args.hidden_size, device=weight.device, dtype=weight.dtype)
    bank = provider.bank(args.moe_layer_ids[-1])
    path, streamed = grouped_backend(x, bank), waves_backend(x, bank)
    if path is None and streamed is None:
        experts = f"experts one by one ({why_not_grouped(x, bank)})"
    elif path is None:
        experts = streamed
    elif provider.fits_step(args.num_experts):
        experts = path
    else:
        experts = f"{path}, in waves through a layer's slots where its routed experts outnumber them"
    return f"prefill: {experts}, {attention_note(model)}"


def attention_note(model) -> str:  # noqa: ANN001 - a Transformer
    """The SDPA kernel torch picks for a prompt's first chunk (causal) and for a later one (an explicit mask)."""
    a, weight = model.args, model.embed_tokens.weight
    if a.attention_sinks:
        return "attention with sinks in plain torch (query chunks)"
    if all(a.is_linear_layer(i) for i in range(a.num_layers)):
        return "no softmax attention"
    from torch.nn.attention import SDPBackend

    q = torch.zeros(1, a.num_heads, 8, a.head_dim, device=weight.device, dtype=weight.dtype)
    k = torch.zeros(1, a.num_kv_heads, 8, a.head_dim, device=weight.device, dtype=weight.dtype)
    mask = torch.ones(8, 8, dtype=torch.bool, device=weight.device)
    gqa = a.num_kv_heads != a.num_heads
    names = [SDPBackend(torch._fused_sdp_choice(q, k, k, m, 0.0, m is None, enable_gqa=gqa)).name.lower()
             for m in (None, mask)]
    names = [n.replace("_attention", "").replace("efficient", "memory-efficient") for n in names]
    if names[0] == names[1]:
        return f"attention SDPA {names[0]}"
    return f"attention SDPA {names[0]} (a prompt's first chunk), {names[1]} (later chunks)"


def hybrid_options(miss: str = "auto", link: str | None = None, cpu_threads: int | None = None) -> HybridOptions:
    """--miss, --link SIZE (per second) and --cpu-threads, checked: where a cache computes misses."""
    from cache.budget import parse_size
    from cache.cost_model import MODES
    from cache.hybrid import HybridOptions

    if miss not in MODES:
        raise UsageError(f"unknown --miss '{miss}'; use auto, cpu or link")
    rate = None
    if link is not None:
        rate = float(parse_size(link.removesuffix("/s")))
        if not torch.cuda.is_available():
            raise UsageError("--link slows the GPU's copy stream, and there is no GPU; leave --link out")
    return HybridOptions(miss, rate, cpu_threads)


def check_device_free(device: torch.device, budget: int, asked: str | None) -> None:
    """A budget above the GPU's free memory would end in an out-of-memory mid-run: refuse it before loading."""
    if device.type != "cuda" or asked is None:
        return
    from cache.budget import format_size

    free, _ = torch.cuda.mem_get_info(device)
    if budget > free:
        from fate_cli.errors import ResourceError

        raise ResourceError(
            f"--vram {asked} is more than the GPU's free memory ({format_size(free)}); lower --vram, "
            "or close the programs holding GPU memory"
        )


def open_model(
    name: str | None,
    device: str | None = None,
    dtype: str | None = None,
    policy: str | None = None,
    vram: str | None = None,
    transfer_bits: int | None = None,
    context: int | None = None,
    eager: bool = False,
    rows: int = 1,
    hybrid: HybridOptions | None = None,
) -> Runtime:
    """Load a model for a command. With a policy, plan its experts against the VRAM budget first, with a KV
    cache of `rows` rows of `context` positions each. eager: decode with the model's eager forward (the
    reference) instead of captured CUDA graphs. hybrid: --miss, --link, --cpu-threads (cache/hybrid.py)."""
    runtime = _open(name, device, dtype, policy, vram, transfer_bits, context, rows, hybrid)
    runtime.graphs = DecodeGraphs(runtime.model, eager)
    return runtime


def resolve_model(name: str | None) -> ResolvedModel:
    """A model name, alias, folder or `synthetic:<shape>`, checked before anything loads."""
    return synthetic_model(name) if is_synthetic(name) else resolve(name)


def model_args(name: str | None) -> ModelArgs:
    """The model's config, read (or, for a synthetic shape, made) without loading weights."""
    from fate_cli.model.loader import load_args

    return synthetic_args(name) if is_synthetic(name) else load_args(resolve(name).path)


def open_weights(resolved: ResolvedModel, device: torch.device, dtype: torch.dtype,
                 args: ModelArgs | None = None) -> Weights:
    """A model's non-expert weights on the device: what every command (and each row of a bench) builds on.
    args: its config as `checked_args` gave it, when the caller has it already."""
    # Trained weights produce denormal activations, which slow CPU float math ~80x; they round to zero.
    torch.set_flush_denormal(True)
    return load_weights(resolved.path, device, dtype, args)


def experts_for(weights: Weights, setup: OffloadSetup | None, store: TierStore | None, transfer_bits: int | None,
                coactivation: Callable[[], Coactivation] | None = None, host: HostTier | None = None,
                hybrid: HybridOptions | None = None) -> ExpertProvider:
    """The experts a plan asks for: the checkpoint's at 16 bits (no plan, or every expert fits), else an expert
    cache over the tier store."""
    if (setup is None or setup.full_precision) and weights.checkpoint is None:  # synthetic: the store's 16 bits
        return store_dense_experts(store, weights.args.num_experts, weights.args.moe_layer_ids, weights.device,
                                   weights.dtype, weights.args.expert_act)
    if setup is None or setup.full_precision:
        return load_resident_experts(weights.args, weights.checkpoint, weights.device, weights.dtype)
    from cache.policies import PolicyContext
    from cache.setup import build_offloaded

    ctx = PolicyContext.of(weights.args, weights.routers(), coactivation)
    return build_offloaded(ctx, store, setup, weights.device, weights.dtype, transfer_bits, host=host,
                           act=weights.args.expert_act, hybrid=hybrid)


def store_dense_experts(store: TierStore, num_experts: int, moe_layers: Sequence[int], device: torch.device,
                        dtype: torch.dtype, act: ClampedSwiGLU | None = None) -> ResidentExperts:
    """Every expert at 16 bits from a store's dense tier (with its biases, where the layout has them): a synthetic
    model's stand-in for checkpoint experts. act: the model's expert activation (ModelArgs.expert_act)."""
    return ResidentExperts({layer: store_layer_experts(store, layer, num_experts, device, dtype, act)
                            for layer in moe_layers})


def _open(name: str | None, device: str | None, dtype: str | None, policy: str | None, vram: str | None,
          transfer_bits: int | None, context: int | None, rows: int = 1,
          hybrid: HybridOptions | None = None) -> Runtime:
    synthetic = is_synthetic(name)
    resolved = resolve_model(name)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tokenizer = SyntheticTokenizer(synthetic_args(name)) if synthetic else Tokenizer(resolved.path)
    policy = policy or ("resident" if synthetic else None)  # no checkpoint: its experts live in the tiers
    setup = store = args = None
    if policy is not None:  # planned from config.json alone: a budget too small is refused before loading
        from cache.budget import auto_budget, parse_size
        from cache.setup import plan_for
        from quant.store import QuantParams

        # a config the weights contradict is never planned
        args = synthetic_args(name) if synthetic else checked_args(resolved.path)
        budget = parse_size(vram) if vram else auto_budget(dev)
        check_device_free(dev, budget, vram)
        ctx_len = min(context or DEFAULT_CONTEXT, args.max_position_embeddings)
        store = synthetic_store(args, name) if synthetic else open_store(resolved, build=False)
        params = QuantParams(**store.manifest["params"]) if store else QuantParams()
        if transfer_bits is not None and transfer_bits not in (params.hot_bits, params.cold_bits):
            raise UsageError(  # checked before a store is built or a plan made
                f"--transfer-bits {transfer_bits} matches no tier of the store (hot INT{params.hot_bits}, cold "
                f"INT{params.cold_bits}); give {params.hot_bits} or {params.cold_bits}, or leave it out"
            )
        setup = plan_for(args, dt, policy, budget, ctx_len, params, dev.type == "cuda", transfer_bits is not None,
                         rows=rows, curves=offline_miss_curves(resolved.path))
        if not setup.full_precision:
            store = store or open_store(resolved, build=True)
    if synthetic:
        torch.set_flush_denormal(True)
        weights = random_weights(args, dev, dt)
        experts = experts_for(weights, setup, store, transfer_bits, hybrid=hybrid)
    else:
        weights = open_weights(resolved, dev, dt, args)
        experts = experts_for(weights, setup, store, transfer_bits, offline_coactivation(resolved.path),
                              hybrid=hybrid)
    loaded = LoadedModel(weights.model(experts), weights.args, weights.checkpoint, dev, dt)
    offload = experts if isinstance(experts, OffloadedExperts) else None
    return Runtime(resolved, loaded, tokenizer, setup, offload)
