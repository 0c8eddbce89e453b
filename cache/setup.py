"""From a model, a policy and a budget to a plan and a running OffloadedExperts.

The plan is made from the model's shapes before any weight is loaded, so a budget too small to run is
refused at once, naming the minimum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cache.host_tier import HostTier
from cache.offload import OffloadedExperts
from cache.planner import Footprint, Plan, make_plan
from cache.policies import POLICIES, POLICY_TYPES, Policy, PolicyContext, make_policy
from fate_cli.errors import UsageError
from fate_cli.model.args import ModelArgs
from fate_cli.model.gated_deltanet import prefill_bytes_per_token
from fate_cli.model.kv_cache import KVCache
from fate_cli.model.model import dense_setting, int8_dense_linears, prefill_chunk, weight_shapes
from quant.expert_act import ClampedSwiGLU
from quant.layout import ExpertLayout
from quant.store import QuantParams, TierStore

if TYPE_CHECKING:
    from cache.hybrid import HybridOptions
CUDA_WORKSPACE = 64 * 1024**2  # allocator slack and cuBLAS workspaces on a GPU


@dataclass
class OffloadSetup:
    plan: Plan
    policy: str
    budget: int
    full_precision: bool  # every expert fits at 16 bits: nothing is quantized or offloaded


def non_expert_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """The non-expert weights at the run's dtype; under --dense int8 its Linears at a byte a weight and a
    bfloat16 scale a row (a tied lm_head an INT8 copy beside the embedding, which lookups still read)."""
    size = torch.finfo(dtype).bits // 8
    total = sum(math.prod(shape) for shape in weight_shapes(args).values()) * size
    if dense_setting() == "int8":
        for name, rows, cols in int8_dense_linears(args):
            dropped = 0 if name == "lm_head" and args.tie_word_embeddings else rows * cols * size
            total += rows * cols + 2 * rows - dropped
    return total


def footprint(args: ModelArgs, dtype: torch.dtype, context: int, params: QuantParams, cuda: bool,
              rows: int = 1) -> Footprint:
    """context: the positions of each of `rows` rows of the KV cache (sliding layers keep only their window,
    linear-attention layers a fixed state)."""
    size = torch.finfo(dtype).bits // 8
    kv = KVCache.planned_bytes(args, rows, context, dtype)
    h, i, k = args.hidden_size, args.moe_intermediate_size, args.top_k
    chunk = prefill_chunk()  # a prompt passes through the layers this many tokens at a time
    prompt = 4 * chunk * (6 * h + 3 * k * i)  # float32 upper bound, every routed expert's at once
    prompt += chunk * prefill_bytes_per_token(args)  # a linear-attention layer's chunked prefill
    activations = prompt + 3 * h * i * 4  # and dequant scratch
    bias = "bfloat16" if args.expert_bias else None  # 16 bits in every tier (its size is what counts here)
    hot = ExpertLayout.quantized(h, i, params.hot_bits, params.hot_group_size, bias).nbytes
    return Footprint(
        moe_layers=tuple(args.moe_layer_ids),
        num_experts=args.num_experts,
        top_k=k,
        non_expert=non_expert_bytes(args, dtype),
        expert_hot=hot,
        expert_full=3 * h * i * 2 + ((2 * i + h) * 2 if args.expert_bias else 0),
        kv_cache=kv,
        workspace=(CUDA_WORKSPACE if cuda else 0) + activations,
        # a prompt token prefilled in a group: four hidden-sized tensors, a float32 expert output, one expert's
        # intermediates (experts run one at a time; attention runs per prompt)
        token_bytes=(4 * size + 4) * h + 3 * i * size,
        group_bytes=prompt,
    )


def plan_for(args: ModelArgs, dtype: torch.dtype, policy: str, budget: int, context: int, params: QuantParams,
             cuda: bool, one_tier: bool = False, shallow_layers: int | None = None, rows: int = 1,
             curves: Mapping[int, Sequence[float]] | None = None) -> OffloadSetup:
    """one_tier: every expert at one tier (--transfer-bits), so no layer is held whole at 16 bits. The KV cache
    is planned for `rows` rows of `context` positions each. curves: the model's miss curves
    (fate_cli/engine/profile.py), for a policy whose slots are planned by measurement."""
    check_policy(policy)
    fp = footprint(args, dtype, context, params, cuda, rows)
    all_full = fp.fixed + len(fp.moe_layers) * fp.num_experts * fp.expert_full
    if policy != "resident" and not one_tier and budget >= all_full:
        plan = Plan(budget, fp, {}, tuple(fp.moe_layers))
        return OffloadSetup(plan, policy, budget, full_precision=True)
    plan = plan_slots(fp, policy, budget, one_tier, shallow_layers, curves)
    return OffloadSetup(plan, policy, budget, full_precision=False)


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise UsageError(f"unknown policy '{policy}'; use one of {', '.join(POLICIES)}")


def plan_slots(fp: Footprint, policy: str, budget: int, one_tier: bool, shallow_layers: int | None = None,
               curves: Mapping[int, Sequence[float]] | None = None) -> Plan:
    """Expert slots for a policy: `resident` holds every expert at the hot tier whatever the budget (the
    ceiling); the others split the budget the policy's way."""
    if policy == "resident":
        return make_plan(fp, max(budget, fp.fixed + fp.all_hot), "uniform", whole_first=False)
    kind = POLICY_TYPES[policy]
    plan = make_plan(fp, budget, kind.split, shallow_layers, whole_first=not one_tier, curves=curves)
    if kind.pipeline and fp.token_bytes:
        # a group's activations use the workspace's (sized for a prefill chunk's tokens at float32 with every
        # routed expert's intermediates at once) at a token's real cost, plus what the slots leave of the budget
        plan.group_tokens = (fp.group_bytes + max(0, budget - plan.device_bytes)) // fp.token_bytes
    return plan


def transfer_tier_for(store: TierStore, bits: int | None) -> str | None:
    """The quantized tier of that bit width (--transfer-bits), or None when not forced."""
    if bits is None:
        return None
    by_bits = {info.layout.bits: name for name, info in store.tiers.items() if info.layout.kind == "quantized"}
    if bits not in by_bits:
        raise UsageError(
            f"--transfer-bits {bits} matches no tier of the store (tiers: "
            f"{', '.join(f'INT{b}' for b in sorted(by_bits))}); give one of those bits, or leave it out"
        )
    return by_bits[bits]


def build_offloaded(
    ctx: PolicyContext,
    store: TierStore,
    setup: OffloadSetup,
    device: torch.device,
    dtype: torch.dtype,
    transfer_bits: int | None = None,
    host: HostTier | None = None,
    act: ClampedSwiGLU | None = None,
    hybrid: HybridOptions | None = None,
) -> OffloadedExperts:
    """The expert cache a plan and a policy make over the tier store (the host tier is built here unless given:
    a bench shares one across its rows). act: the model's expert activation (ModelArgs.expert_act). hybrid:
    --miss, --link, --cpu-threads (cache/hybrid.py): fate's misses, and the cpu and freetoken policies, computed
    on the CPU where it pays."""
    from cache.hybrid import PROVIDERS, HybridOptions, emulate_link, is_hybrid

    hybrid = hybrid or HybridOptions(miss="link")  # no options (a library caller): every miss moved, as measured
    policy: Policy = make_policy(setup.policy, ctx)
    transfer_tier = transfer_tier_for(store, transfer_bits)
    if is_hybrid(setup.policy, hybrid.miss):
        offload = PROVIDERS[setup.policy](store, setup.plan, policy, device, dtype, transfer_tier, host=host,
                                          act=act, options=hybrid)
    else:
        offload = OffloadedExperts(store, setup.plan, policy, device, dtype, transfer_tier, host=host, act=act)
    emulate_link(offload, hybrid)
    return offload
