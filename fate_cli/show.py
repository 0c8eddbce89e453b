"""`fate show MODEL`: family, parameters, experts, context, checkpoint dtype, tier store, where it lives."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.filesize import decimal as human_size

from fate_cli.engine.runtime import DEFAULT_CONTEXT
from fate_cli.model.kv_cache import KVCache
from fate_cli.model_info import expert_parameters, human_count, model_facts, store_size, tier_summary
from fate_cli.registry import resolve


def show_command(model: str | None) -> None:
    resolved = resolve(model)
    facts = model_facts(resolved.path, resolved.name)
    a = facts.args
    moe = len(a.moe_layer_ids)
    context = min(DEFAULT_CONTEXT, a.max_position_embeddings)  # what a command plans for by default
    rows = [
        ("model", resolved.name + (f" ({resolved.repo})" if resolved.repo else "")),
        ("family", a.family),
        ("parameters", f"{human_count(facts.parameters)} ({human_count(facts.active_parameters)} active per token)"),
        ("layers", f"{a.num_layers} ({moe} MoE)"),
        ("experts", f"{a.num_experts} per MoE layer, top-{a.top_k}, {human_count(expert_parameters(a))} parameters each"
                    + (f", plus a shared expert of width {a.shared_expert_intermediate_size}"
                       if a.shared_expert_intermediate_size else "")),
        ("hidden size", str(a.hidden_size)),
        ("attention", f"{a.num_heads} heads, {a.num_kv_heads} KV heads, head dim {a.head_dim}" + (
            f"; a sliding window of {a.sliding_window} tokens on {sum(a.sliding_layers)} of {a.num_layers} layers"
            if any(a.sliding_layers) else "")),
        ("context", f"{a.max_position_embeddings} tokens"),
        ("KV cache", f"{human_size(KVCache.planned_bytes(a, 1, context, torch.bfloat16))} per row of {context} "
                     "tokens at 16 bits" + (" (sliding layers keep their window only)" if any(a.sliding_layers)
                                            else "")),
        ("vocabulary", f"{a.vocab_size} tokens"),
        ("checkpoint", f"{facts.dtype}, {resolved.path}"),
    ]
    if facts.store is None:
        rows.append(("tier store", f"not built ({facts.store_dir}); `fate quantize {resolved.name}` builds it, "
                                   "or the first run under a budget that needs it"))
    else:
        rows.append(("tier store", f"{tier_summary(facts.store)}; {human_size(store_size(facts.store))}, "
                                   f"{facts.store_dir}"))
    out = Console(highlight=False, soft_wrap=True)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        out.print(f"{key:<{width}}  {value}", markup=False)
