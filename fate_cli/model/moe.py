"""The MoE block: router, top-k selection, dispatch of tokens to experts from an ExpertProvider."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch import nn

from fate_cli.model.args import ModelArgs
from fate_cli.model.experts import ExpertFn, ExpertProvider
from fate_cli.model.layers import MLP
from quant.cpu_experts import cpu_moe
from quant.grouped import GroupedPass, grouped_backend, grouped_ffn, waves_backend
from quant.moe_kernels import Bank, moe_ffn

GROUPED_MIN_TOKENS = 2  # one token: the expert loop's GEMVs (a decode step outside a captured graph)


def route(
    logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax in float32 over all experts, then top-k; renormalise the k weights if asked."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class MoEBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, provider: ExpertProvider):
        super().__init__()
        self.layer = layer
        self.top_k, self.num_experts, self.normalize = args.top_k, args.num_experts, args.norm_topk_prob
        self.topk_then_softmax = args.topk_then_softmax
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=args.router_bias)
        if args.shared_expert_intermediate_size:
            self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
        self.provider = provider

    def forward(self, x: torch.Tensor, banked: bool = False) -> torch.Tensor:
        """x [..., hidden]. Eager: the provider sees the router input, then serves each routed expert. banked: the
        routed experts through the layer's bank in two fused launches, with no host work (a captured step)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if not banked:
            self.provider.gate_input(self.layer, x)
        weights, ids = self.pick_experts(x)
        out = self.from_bank(x, weights, ids) if banked else self.add_shared(x, self.dispatch(x, weights, ids))
        return out.reshape(shape)

    def from_bank(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  host: torch.Tensor | None = None) -> torch.Tensor:
        """The routed experts of x [tokens, hidden] by the fused kernels over the provider's bank (every routed
        expert must be in it, or be computed by the host: `host` holds their sum), plus the shared expert."""
        routed = moe_ffn(x, weights, ids, self.provider.bank(self.layer))
        return self.add_shared(x, routed if host is None else routed + host)

    def pick_experts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> routing weights and expert ids [tokens, top_k]."""
        if self.topk_then_softmax:  # gpt_oss: the k largest logits, then a softmax over those k
            top, ids = torch.topk(self.gate(x), self.top_k, dim=-1)
            return torch.softmax(top.float(), dim=-1), ids
        return route(self.gate(x), self.top_k, self.normalize)

    def add_shared(self, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum plus the gated shared expert, where the family has one (qwen2_moe)."""
        if self.shared_expert is None:
            return routed
        return routed + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def grouped(self, x: torch.Tensor, used: int) -> str | None:
        """The grouped path that computes this layer's `used` routed experts for x at once, or None (a loop over
        them): a step of several tokens whose routed experts all fit the provider's bank together."""
        p = self.provider
        if x.shape[0] < GROUPED_MIN_TOKENS or not p.fused or not p.fits_step(used):
            return None
        return grouped_backend(x, p.bank(self.layer))

    def waves(self, x: torch.Tensor, used: list[int], counts: list[int]) -> Iterator[Bank] | None:
        """The provider's waves of slots for a step of several tokens whose routed experts do not fit at once
        (the provider has done the step's bookkeeping), or None (a loop over the experts)."""
        p = self.provider
        if x.shape[0] < GROUPED_MIN_TOKENS or not p.fused or waves_backend(x, p.bank(self.layer)) is None:
            return None
        return p.waves(self.layer, used, counts)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Group the (token, choice) pairs by expert and run each expert once on its tokens: every routed expert
        of the layer in one grouped pass where the provider's bank can hold them all at once (quant/grouped.py),
        else expert by expert as the provider serves them. A layer whose bank holds every expert and whose
        provider needs no routing (`needs_host`) never shows the host its routing: no synchronisation."""
        if not self.provider.needs_host(self.layer) and self.grouped(x, self.num_experts):
            return grouped_ffn(x, weights, ids, self.provider.bank(self.layer))
        flat_ids = ids.flatten()
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        used = [e for e, c in enumerate(counts) if c]
        if self.grouped(x, len(used)):
            self.provider.prepare(self.layer, used, [counts[e] for e in used])  # misses moved, slots held
            self.provider.host_begin(self.layer, x, weights, ids)
            out = grouped_ffn(x, weights, ids, self.provider.bank(self.layer))
            self.provider.finish(self.layer)
            return self.provider.host_end(self.layer, out)
        waves = self.waves(x, used, [counts[e] for e in used])
        if waves is not None:
            self.provider.host_begin(self.layer, x, weights, ids)
            step = GroupedPass(x, weights, ids, self.num_experts)
            for bank in waves:  # each wave's kernels queued before the next wave's copies
                step.run(bank)
            return self.provider.host_end(self.layer, step.result())
        order = torch.argsort(flat_ids, stable=True)
        flat_weights = weights.flatten()
        out = torch.zeros_like(x)
        starts = [0, *itertools.accumulate(counts)]
        served = self.provider.experts(self.layer, used, [counts[e] for e in used])
        self.provider.host_begin(self.layer, x, weights, ids)  # the host's experts start before the device's
        if not out.is_cuda and self.provider.fits_step(len(used)):  # every expert in place at once: no waves
            served = self._cpu_together(x, weights, ids, list(served), out)
        for e, fn in served:
            picks = order[starts[e] : starts[e] + counts[e]]
            tokens = picks // self.top_k
            y = (fn(x[tokens]).float() * flat_weights[picks, None]).to(out.dtype)
            if out.is_cuda:
                out.index_add_(0, tokens, y)
            else:  # CPU index_add_ spreads even a few rows over threads (~100x slower); a token meets an expert
                out.index_put_((tokens,), y, accumulate=True)  # at most once, so the sums are the same
        return self.provider.host_end(self.layer, out)

    def _cpu_together(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                      served: list[tuple[int, ExpertFn]], out: torch.Tensor) -> list[tuple[int, ExpertFn]]:
        """On a CPU: the served experts that the CPU kernels compute (a `cpu_buffer` method that gives their
        buffer) added into out by one call over all of them (quant/cpu_experts.py) in place of a call each;
        -> the others, for the loop."""
        buffers = [getattr(fn, "cpu_buffer", lambda: None)() for _, fn in served]
        together = [j for j, b in enumerate(buffers) if b is not None]
        if len(together) < 2:
            return served
        column = torch.full((self.num_experts,), -1, dtype=torch.long)
        column[[served[j][0] for j in together]] = torch.arange(len(together))
        cols = column[ids]
        kept = cols >= 0
        w = torch.zeros(x.shape[0], len(together), dtype=torch.float32)
        w[kept.nonzero()[:, 0], cols[kept]] = weights[kept].float()
        out += cpu_moe(x, [buffers[j] for j in together], w, served[together[0]][1].act)
        return [item for item, b in zip(served, buffers) if b is None]
