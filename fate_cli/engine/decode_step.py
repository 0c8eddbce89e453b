"""The decode step with fixed shapes: CUDA graphs replayed every token, each MoE layer's experts in two passes.

An eager decode step of an MoE model launches hundreds of small kernels from Python (per layer: norms,
attention, the router, then three matmuls per routed expert), so on a GPU it is bound by launches long
before memory bandwidth. This step
- attends over the whole KV cache with a mask (keys up to the row's own position; a sliding layer over its
  whole ring, each slot's position and ring index computed on the device), so that no shape depends on the
  position, which lives in a device tensor;
- routes on the device and computes a layer's routed experts with quant/moe_kernels.py's fused kernels,
  which find each expert's weights through the layer's bank (a device table expert -> slot, tier);
- is captured as CUDA graphs once and replayed every token.
It runs the model's own composition (Transformer.run_layers with banked=True, a layer's attend and the MoE block's
pick_experts / from_bank around a cut): this module decides only where the graph is cut and what is captured.

When the provider must see a layer's routing (an offloading cache: misses, prefetches, statistics), the
step is cut after that layer's router. Segment i ends with MoE layer h_i's routing, copied (with the next
router's top k+1 on this gate input, when the policy predicts from it) into pinned memory inside the graph;
the host waits for that copy alone, `provider.gate_lookahead` (or `gate_input`) and `provider.prepare` run
the policy, queue the misses' and the prefetches' copies and update the slot table, then segment i + 1,
which starts with h_i's experts, is replayed and `provider.finish` releases the slots. The device idles while
the host works: the step tells the provider its host time (`decode_host_time`; from each routing's arrival to
`prepare`'s return, and `finish`). With every expert resident, the whole step is one graph and the host sees
only the sampled token.

Where the provider computes some experts on the host (`host_computes`: a hybrid cache's misses), the cut also
copies the layer's input and routing weights into the pinned buffer; after `prepare` the host computes its
experts from them (`host_moe`) while the device's copies run, and puts their sum, one small copy, into the
layer's device buffer that segment i + 1 adds to the device's experts before the next layer.

Without capture the same segments run as plain calls: how the CPU tests hold this path to the model's
eager forward, which stays the reference.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from fate_cli.model.kv_cache import KVCache, RowPositions
from fate_cli.model.model import Transformer
from predictors.cross_layer import lookahead
from quant.moe_kernels import FUSED, backend_for

GPU_ONLY = "decode: eager (CUDA graphs need a GPU)"
MIN_CACHE = 256  # tokens: a graph's KV cache length is a power of two from here, so requests can share it


class DecodeStep:
    """One captured (or plain, without `capture`) decode step over one KV cache and the model's provider."""

    def __init__(self, model: Transformer, cache: KVCache, capture: bool):
        self.model, self.cache, self.provider = model, cache, model.provider
        self.device = model.embed_tokens.weight.device
        self.batch = cache.batch
        self.tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.cols = torch.arange(cache.max_len, device=self.device)
        self.mask = torch.zeros(self.batch, 1, 1, cache.max_len, dtype=torch.bool, device=self.device)
        self.at = RowPositions(self.positions, cache.max_len, self.mask)  # the mask is made once a step
        moe = model.args.moe_layer_ids
        for i in moe:  # each bank made (experts stacked, tables synced) before any capture
            self.provider.bank(i)
        self.host_layers = [i for i in moe if self.provider.needs_host(i)]
        self.outputs: list[dict[str, torch.Tensor]] = [{} for _ in range(len(self.host_layers) + 1)]
        self.capture = capture
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        # per cut layer: the next router the policy predicts from (or None), and where the routing lands
        self.lookahead = [self.provider.lookahead_router(i) for i in self.host_layers]
        cuda = self.device.type == "cuda"
        k = model.args.top_k
        width = self.batch * (k + (2 * (k + 1) if any(r is not None for r in self.lookahead) else 0))
        self.head = width  # the routing (and lookahead) the host reads as a list
        hidden = model.args.hidden_size
        self.host_out: list[torch.Tensor] | None = None  # per cut layer: the host's experts' sum, on the device
        if self.provider.host_computes:
            width += self.batch * (k + hidden)  # the routing weights and the layer input, for the host's experts
            dtype = model.embed_tokens.weight.dtype
            self.host_out = [torch.zeros(self.batch, hidden, dtype=dtype, device=self.device) for _ in self.host_layers]
            self.host_written = [False] * len(self.host_layers)
        self.routing = [torch.zeros(width, dtype=torch.float32, pin_memory=cuda) for _ in self.host_layers]
        self.routed = [torch.cuda.Event() if cuda else None for _ in self.host_layers]
        self.host_seconds = 0.0  # the last step's host part (told to the provider's decode_host_time)

    def describe(self) -> str:
        n = len(self.outputs)
        how = "one CUDA graph per step" if n == 1 else f"{n} CUDA graphs per step (the cache sees each MoE layer)"
        return f"decode: {how}, experts by the fused Triton kernels" if self.capture else "decode: static, uncaptured"

    def __call__(self, tokens: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """tokens [batch] at their rows' positions -> logits [batch, vocab] (overwritten by the next call)."""
        self.tokens.copy_(tokens.view(-1, 1))
        if len(positions) == 1:
            self.positions.fill_(positions[0])
        else:
            self.positions.copy_(torch.tensor(positions, dtype=torch.long))
        if self.capture and self.graphs is None:
            self.capture_graphs()
        self.host_seconds = 0.0
        for index in range(len(self.outputs)):
            if index:
                self._show_routing(index - 1)
            if self.graphs is not None:
                self.graphs[index].replay()
            else:
                self._segment(index)
            if index < len(self.routed) and self.routed[index] is not None:
                self.routed[index].record()
            if index:
                start = time.perf_counter()
                self.provider.finish(self.host_layers[index - 1])
                self.host_seconds += time.perf_counter() - start
        if self.host_layers:
            self.provider.decode_host_time(self.host_seconds)
        return self.outputs[-1]["logits"]

    def capture_graphs(self) -> None:
        """Run each segment once (Triton compiles, cuBLAS picks its kernels), then capture each as a graph.
        Both write keys and values at the cache's last position, which no query of a full layer reads before
        decode reaches it and writes it first; what a position cannot be cut back from (linear-attention state,
        sliding layers' rings, whose slot the write takes) is put back; the provider is not called, so no
        statistic or policy state changes."""
        saved = self.positions.clone()
        carried = self.cache.snapshot()
        self.positions.fill_(self.cache.max_len - 1)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for index in range(len(self.outputs)):
                self._segment(index)
        current.wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for index in range(len(self.outputs)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._segment(index)
            graphs.append(graph)
        self.positions.copy_(saved)
        self.cache.restore(carried)
        self.graphs = graphs

    # ---- the segments -----------------------------------------------------------------------------

    def _segment(self, index: int) -> None:
        """Segment `index`: the previous cut layer's experts, whole layers up to the next cut layer, then its
        attention and router (or, in the last segment, the head)."""
        host, layers = self.host_layers, self.model.layers
        rope, cache, at = self.model.rope, self.cache, self.at
        if index == 0:
            self.mask.copy_((self.cols[None, :] <= self.positions[:, None])[:, None, None, :])
            x, start = self.model.embed_tokens(self.tokens), 0
        else:
            prev = self.outputs[index - 1]
            moe = layers[host[index - 1]].mlp
            on_host = None if self.host_out is None else self.host_out[index - 1]
            x = prev["h"] + moe.from_bank(prev["moe_in"], prev["weights"], prev["ids"], on_host).view_as(prev["h"])
            start = host[index - 1] + 1
        stop = host[index] if index < len(host) else len(layers)
        x = self.model.run_layers(x, start, stop, cache, at, banked=True)
        out = self.outputs[index]
        if index < len(host):  # the cut: the layer's attention and router, the rest after the host's turn
            h, moe_in = layers[host[index]].attend(x, rope, cache, at)
            moe_in = moe_in.reshape(-1, moe_in.shape[-1])
            weights, ids = layers[host[index]].mlp.pick_experts(moe_in)
            out.update(h=h, moe_in=moe_in, weights=weights, ids=ids)
            shown = [ids.flatten().float()]  # expert ids are exact in float32
            router = self.lookahead[index]
            if router is not None:
                ahead, probs = lookahead(moe_in, router, ids.shape[1])
                shown += [ahead.flatten().float(), probs.flatten()]
            if self.host_out is not None:
                shown = [*shown, torch.zeros(self.head - sum(t.numel() for t in shown), device=self.device),
                         weights.flatten().float(), moe_in.flatten().float()]
            self.routing[index][: sum(t.numel() for t in shown)].copy_(torch.cat(shown), non_blocking=True)
        else:
            out["logits"] = self.model.head(x)[:, -1]

    def _show_routing(self, index: int) -> None:
        """The host's part between segments: the cut layer's routing (and lookahead) to the provider."""
        layer = self.host_layers[index]
        if self.routed[index] is not None:
            self.routed[index].synchronize()
        start = time.perf_counter()  # the host's part from here: the wait above is the device's
        values = self.routing[index][: self.head].tolist()
        pairs = self.batch * self.model.args.top_k
        counts: dict[int, int] = {}
        for e in map(int, values[:pairs]):
            counts[e] = counts.get(e, 0) + 1
        used = sorted(counts)  # the eager dispatch's order
        if self.lookahead[index] is not None:
            n = self.batch * (self.model.args.top_k + 1)
            ahead = values[pairs : pairs + n]
            self.provider.gate_lookahead(layer, [int(e) for e in ahead], values[pairs + n : pairs + 2 * n])
        else:
            self.provider.gate_input(layer, self.outputs[index]["moe_in"])
        self.provider.prepare(layer, used, [counts[e] for e in used])
        if self.host_out is not None:
            self._host_experts(index, values[:pairs])
        self.host_seconds += time.perf_counter() - start

    def _host_experts(self, index: int, ids: list[float]) -> None:
        """The host's experts of the cut layer, from the input and weights the cut copied; their sum to the
        device buffer the next segment adds (zeros where the host computed none)."""
        k = self.model.args.top_k
        layer, dest = self.host_layers[index], self.host_out[index]
        y = None
        if self.provider.host_pending(layer):
            tail = self.routing[index][self.head :]
            weights = tail[: self.batch * k].view(self.batch, k)
            x = tail[self.batch * k :].view(self.batch, -1).to(dest.dtype)
            ids_t = torch.from_numpy(np.array(ids, dtype=np.int64)).view(self.batch, k)  # tiny: numpy builds it faster
            y = self.provider.host_moe(layer, x, weights, ids_t)
        if y is not None:
            dest.copy_(y, non_blocking=True)
        elif self.host_written[index]:
            dest.zero_()
        self.host_written[index] = y is not None


def unavailable(model: Transformer, batch: int, capture: bool = True) -> str:
    """Why a decode step (captured, or plain) cannot run this model and provider at this batch size ('' if it
    can)."""
    device = model.embed_tokens.weight.device
    provider = model.provider
    if capture and device.type != "cuda":
        return GPU_ONLY
    if not provider.fused:
        return "decode: eager (this expert provider keeps no slot table)"
    if not provider.fits_step(batch * model.args.top_k):
        return f"decode: eager (a batch of {batch} can route to more experts than a layer has slots)"
    for i in model.args.moe_layer_ids if capture else ():
        bank = provider.bank(i)
        if backend_for(device, bank) != FUSED:
            return "decode: eager (Triton is missing or a tier does not fit the fused kernels)"
    return ""


class DecodeGraphs:
    """A runtime's captured decode step. Its KV cache outlives a request (lengths rounded up to a power of
    two), so a step is captured once per batch size, cache length and provider, and replayed by later ones."""

    def __init__(self, model: Transformer, eager: bool = False, capture: bool = True):
        """eager: decode with the model's eager forward (--eager). capture=False runs the same step uncaptured,
        on any device (the CPU tests' way)."""
        self.model, self.capture = model, capture
        self._cache: KVCache | None = None
        self._step: DecodeStep | None = None
        self.set_eager(eager)

    def set_eager(self, eager: bool) -> None:
        """Whether requests decode eagerly from now on, and the line that says why."""
        gpu = self.model.embed_tokens.weight.device.type == "cuda"
        self.enabled = not eager and (gpu or not self.capture)
        self.note = "decode: eager (--eager)" if eager else "" if self.enabled else GPU_ONLY

    def cache(self, batch: int, length: int) -> KVCache:
        """A KV cache of at least `length` positions for `batch` rows, reused when a request fits the last."""
        size = min(max(MIN_CACHE, 1 << (length - 1).bit_length()), self.model.args.max_position_embeddings)
        size = max(size, length)
        old = self._cache
        if old is None or old.batch != batch or old.max_len != size:
            self._step = self._cache = None
            self._cache = self.model.new_cache(batch, size)
        return self._cache

    def step(self, cache: KVCache) -> DecodeStep | None:
        """The captured step over `cache` (the model's provider is fixed when it is built); None (and a note)
        where the eager path must run."""
        if not self.enabled:
            return None
        s = self._step
        if s is not None and s.cache is cache:
            return s
        self._step = None
        self.note = unavailable(self.model, cache.batch, self.capture)
        if self.note:
            return None
        self._step = DecodeStep(self.model, cache, self.capture)
        if self.capture:
            self._step.capture_graphs()
        self.note = self._step.describe()
        return self._step

    def forget(self) -> None:
        """Drop the captured step and its cache (their memory goes with them)."""
        self._step = self._cache = None

    def expected(self, batch: int = 1) -> str:
        """How a request of `batch` rows will decode, before any has: graphs, or eager and why."""
        if not self.enabled:
            return self.note
        return unavailable(self.model, batch, self.capture) or "decode: CUDA graphs, fused Triton expert kernels"

    def describe(self) -> str:
        """How the last request decoded (what is expected, before the first)."""
        return self.note or self.expected()
