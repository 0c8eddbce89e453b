"""The decoder-only MoE transformer shared by every supported family.

One token's path: embed_tokens -> for each layer [input_layernorm -> self_attn (KV cache) -> residual
-> post_attention_layernorm -> mlp (MoEBlock or dense MLP) -> residual] -> norm -> lm_head.
Module names follow the Hugging Face checkpoints (see checkpoint_name) so weights load by name.
Hybrid families (qwen3_5_moe) have a linear_attn (gated_deltanet.py) in place of self_attn in some layers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fate_cli.model.args import ModelArgs
from fate_cli.model.experts import ExpertProvider, ResidentExperts
from fate_cli.model.gated_deltanet import GatedDeltaNet
from fate_cli.model.kv_cache import KVCache, RowPositions
from fate_cli.model.layers import MLP, Attention, Rotary, make_norm
from fate_cli.model.moe import MoEBlock
from fate_cli.model.sink_attention import SinkAttention
from fate_cli.model.threads import step_macs, step_threads
from quant.dense_int8 import Int8Linear


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, provider: ExpertProvider):
        super().__init__()
        self.input_layernorm = make_norm(args, args.hidden_size)
        self.linear = args.is_linear_layer(layer)
        if self.linear:
            self.linear_attn = GatedDeltaNet(args, layer)
        else:
            self.self_attn = SinkAttention(args, layer) if args.attention_sinks else Attention(args, layer)
        self.post_attention_layernorm = make_norm(args, args.hidden_size)
        if args.is_moe_layer(layer):
            self.mlp: nn.Module = MoEBlock(args, layer, provider)
        else:
            self.mlp = MLP(args.hidden_size, args.dense_intermediate_size)

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache, pos: int | RowPositions,
                banked: bool = False) -> torch.Tensor:
        """banked: a MoE layer's experts through its provider's bank, with no host work (the captured step)."""
        h, mlp_in = self.attend(x, rope, cache, pos)
        return h + self.feed_forward(mlp_in, banked)

    def attend(self, x: torch.Tensor, rope: Rotary, cache: KVCache, pos: int | RowPositions
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention with its residual -> (h, the MLP's input: post_attention_layernorm(h))."""
        mixer = self.linear_attn if self.linear else self.self_attn
        h = x + mixer(self.input_layernorm(x), rope, cache, pos)
        return h, self.post_attention_layernorm(h)

    def feed_forward(self, mlp_in: torch.Tensor, banked: bool = False) -> torch.Tensor:
        """Token-wise: any stack of tokens, from one sequence or several."""
        return self.mlp(mlp_in, banked) if isinstance(self.mlp, MoEBlock) else self.mlp(mlp_in)


DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per pass through the layers; --prefill-chunk changes it
_prefill_chunk = DEFAULT_PREFILL_CHUNK


def set_prefill_chunk(tokens: int | None) -> None:
    """Prompts longer than this many tokens are prefilled in chunks (the process's setting, as the CPU threads
    are): activations, the grouped experts' scratch and attention's scores stay bounded, and the planner sizes
    its workspace for one chunk."""
    global _prefill_chunk
    _prefill_chunk = tokens or DEFAULT_PREFILL_CHUNK


def prefill_chunk() -> int:
    return _prefill_chunk


DENSE_CHOICES = ("int8",)
_dense: str | None = None


def set_dense(kind: str | None) -> None:
    """--dense: the dense (non-expert) Linears of every model this process loads at `kind` (int8, CPU only;
    `int8_dense_modules`), or None for the run's dtype."""
    global _dense
    _dense = kind


def dense_setting() -> str | None:
    return _dense


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, provider: ExpertProvider):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, provider) for i in range(args.num_layers))
        self.norm = make_norm(args, args.hidden_size)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, False)
        self.rope: Rotary | None = None

    def with_experts(self, provider: ExpertProvider) -> Transformer:
        """The same model (every weight shared, nothing copied) with its experts from another provider."""
        int8 = {name: m for name, m in self.named_modules() if isinstance(m, Int8Linear)}
        return build_model(self.args, dict(self.named_parameters()), provider, int8)

    def routers(self) -> dict[int, torch.Tensor]:
        """Each MoE layer's router weight [experts, hidden] (what cross-layer predictors multiply by)."""
        return {i: layer.mlp.gate.weight for i, layer in enumerate(self.layers) if isinstance(layer.mlp, MoEBlock)}

    @property
    def provider(self) -> ExpertProvider | None:
        return next((layer.mlp.provider for layer in self.layers if isinstance(layer.mlp, MoEBlock)), None)

    def begin_request(self) -> None:
        """Tell the expert provider a new request starts (per-request predictors keep state across steps)."""
        self.provider.begin_request()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a, w = self.args, self.embed_tokens.weight
        if self.rope is None or self.rope.cos.shape[0] < max_len:
            self.rope = Rotary(a.rotary_dim or a.head_dim, a.rope_theta, max_len, w.device, a.rope_scaling)
        return KVCache.for_model(a, batch, max_len, w.dtype, w.device)

    def forward(
        self, tokens: torch.Tensor, cache: KVCache, pos: int | RowPositions, last_only: bool = False
    ) -> torch.Tensor:
        """tokens [batch, T] at positions pos..pos+T -> logits [batch, T (or 1), vocab].

        With RowPositions, T is 1 and each row of the batch is at its own position (batched decode). A prompt
        longer than `prefill_chunk()` tokens goes through in chunks, each attending to the cache before it."""
        if self.rope is None:
            raise RuntimeError("call new_cache() before forward()")
        chunk, length = prefill_chunk(), tokens.shape[1]
        if isinstance(pos, int) and length > chunk:
            outs = [self.forward(tokens[:, i : i + chunk], cache, pos + i, last_only) for i in range(0, length, chunk)]
            return outs[-1] if last_only else torch.cat(outs, dim=1)
        with step_threads(step_macs(self.args, tokens.numel()), tokens.device):
            x = self.run_layers(self.embed_tokens(tokens), 0, len(self.layers), cache, pos)
            if last_only:
                x = x[:, -1:]
            return self.head(x)

    def run_layers(self, x: torch.Tensor, start: int, stop: int, cache: KVCache, pos: int | RowPositions,
                   banked: bool = False) -> torch.Tensor:
        """Hidden states through layers start..stop-1: the one composition of the eager forward, prefill and the
        captured decode step (banked: MoE layers through their banks, no host work; decode_step.py cuts the
        step between such runs)."""
        for layer in self.layers[start:stop]:
            x = layer(x, self.rope, cache, pos, banked=banked)
        return x

    def prefill_together(self, prompts: list[torch.Tensor], caches: list[KVCache]) -> torch.Tensor:
        """Several prompts ([1, T_i] each, into caches of one row each, from position 0) through each layer
        together: each attends on its own, then one MoE pass over all their tokens, so an expert is fetched
        once for the group (klotski's micro-batches). -> the last position's logits [prompts, vocab]."""
        if self.rope is None:
            raise RuntimeError("call new_cache() before prefill_together()")
        lengths = [p.shape[1] for p in prompts]
        with step_threads(step_macs(self.args, sum(lengths)), prompts[0].device):
            xs = [self.embed_tokens(p)[0] for p in prompts]
            for layer in self.layers:
                attended = [layer.attend(x[None], self.rope, c, 0) for x, c in zip(xs, caches)]
                h = torch.cat([a[0][0] for a in attended])
                xs = list((h + layer.feed_forward(torch.cat([a[1][0] for a in attended]))).split(lengths))
            return self.head(torch.stack([x[-1] for x in xs]))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden states -> logits: final norm, then lm_head (or the tied embedding)."""
        if self.lm_head is None:
            return torch.nn.functional.linear(self.norm(x), self.embed_tokens.weight)
        return self.lm_head(self.norm(x))


def checkpoint_name(args: ModelArgs, param: str) -> str:
    """Our parameter name -> the Hugging Face checkpoint's tensor name."""
    if param.startswith("lm_head."):
        return param
    if args.router_module != "gate":
        param = param.replace(".mlp.gate.", f".mlp.{args.router_module}.", 1)
    if args.moe_module != "mlp":
        param = param.replace(".mlp.", f".{args.moe_module}.", 1)
    return args.checkpoint_prefix + param


def build_model(args: ModelArgs, weights: dict[str, torch.Tensor], provider: ExpertProvider,
                int8: dict[str, Int8Linear] | None = None) -> Transformer:
    """A Transformer over `weights` (every non-expert parameter by name, on its device; used as they are, not
    copied) with its experts from `provider`. int8: Linear modules by name (`int8_dense_modules`) that stand in
    for the float ones, whose weights `weights` then leaves out."""
    int8 = int8 or {}
    with torch.device("meta"):
        model = Transformer(args, provider)
    replaced = replaced_params(int8)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if unexpected or set(missing) - replaced:
        raise RuntimeError(f"weights do not match the model: missing {sorted(set(missing) - replaced)[:4]}, "
                           f"unexpected {sorted(unexpected)[:4]}")
    for name, module in int8.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)
    return model.eval().requires_grad_(False)


def int8_dense_linears(args: ModelArgs) -> list[tuple[str, int, int]]:
    """(module name, out features, in features) of every Linear that --dense int8 holds at INT8, lm_head included
    (from the embedding where the two are tied). What computes a gate stays at the run's dtype: the routers
    (their logits pick the experts, and a rounded router would route differently), the shared expert's gate and
    the Gated DeltaNet's decay and beta projections (one value per head, their bytes negligible)."""
    with torch.device("meta"):
        skeleton = Transformer(args, ResidentExperts({}))
    out = [(name, m.out_features, m.in_features) for name, m in skeleton.named_modules()
           if isinstance(m, nn.Linear) and not name.endswith(GATE_PROJECTIONS)]
    if args.tie_word_embeddings:
        out.append(("lm_head", args.vocab_size, args.hidden_size))
    return out


def replaced_params(modules: Iterable[str]) -> set[str]:
    """The float parameters (weight, bias) that INT8 modules of these names stand in for."""
    return {f"{name}.{p}" for name in modules for p in ("weight", "bias")}


def dense_label() -> str:
    """What --dense changes, for a report's header line: ', dense weights INT8', or empty."""
    return f", dense weights {_dense.upper()}" if _dense else ""


def int8_dense_modules(args: ModelArgs, weights: dict[str, torch.Tensor]) -> dict[str, Int8Linear]:
    """Every Linear of `int8_dense_linears` at INT8 (quant/dense_int8.py), by module name."""
    out = {}
    for name, _, _ in int8_dense_linears(args):
        source = "embed_tokens" if name == "lm_head" and args.tie_word_embeddings else name
        out[name] = Int8Linear.quantize(weights[f"{source}.weight"], weights.get(f"{name}.bias"))
    return out


GATE_PROJECTIONS = ("mlp.gate", "mlp.shared_expert_gate", "linear_attn.in_proj_a", "linear_attn.in_proj_b")


def weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every non-expert parameter's name and shape (what a checkpoint or a random init must supply)."""
    with torch.device("meta"):
        skeleton = Transformer(args, ResidentExperts({}))
    return {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
