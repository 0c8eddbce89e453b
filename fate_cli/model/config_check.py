"""config.json against the checkpoint's tensor headers, before anything is planned or built from it.

ConfigReader checks each field alone (type, range). A field can still be wrong for these weights: a config
claiming 2**31 experts would be planned (a budget of terabytes) or built (storage overflow) before the
loader found that no tensor has that shape. Here every dimension the config gives is compared with the
headers, in one pass over the tensor names (never a loop over the config's counts), so such a config is
refused as what it is: a config that contradicts its weights (exit 4).
"""

from __future__ import annotations

import re
from collections import defaultdict

from fate_cli.errors import BadModel
from fate_cli.model.args import ModelArgs
from fate_cli.model.model import checkpoint_name
from quant.source import SourceReader


def _is_range(found: set[int], n: int) -> bool:
    """found == set(range(n)), without building range(n): n comes from the config and may be 2**31."""
    return len(found) == n and (n == 0 or (min(found) == 0 and max(found) == n - 1))


def check_against_weights(args: ModelArgs, reader: SourceReader) -> None:
    """Raise BadModel at the first dimension of `args` the checkpoint's headers contradict."""
    where = reader.dir / "config.json"

    def mismatch(what: str) -> BadModel:
        return BadModel(f"{where}: {what}; the weights do not match the config, fix config.json or re-download "
                        "the model")

    prefix = re.escape(args.checkpoint_prefix)  # "model.", or "model.language_model." inside a VLM
    layer_name = re.compile(prefix + r"layers\.(\d+)\.")
    expert_name = re.compile(prefix + r"layers\.(\d+)\.([A-Za-z_]+)\.experts\.(\d+)\.")
    layers: set[int] = set()
    experts: dict[int, set[int]] = defaultdict(set)
    for name in reader.entries:
        if m := layer_name.match(name):
            layers.add(int(m.group(1)))
        if (m := expert_name.match(name)) and m.group(2) == args.moe_module:
            experts[int(m.group(1))].add(int(m.group(3)))
        dtype = reader.dtype(name)
        if name.endswith((".weight", ".bias")) and not dtype.is_floating_point:
            raise BadModel(f"{reader.dir}: tensor {name} is {str(dtype).removeprefix('torch.')}, not a float; fate "
                           "runs 16- and 32-bit float checkpoints, use one")
    if not _is_range(layers, args.num_layers):
        raise mismatch(f"num_hidden_layers is {args.num_layers} but the checkpoint holds {len(layers)} layers")
    # fused experts (gpt_oss: one [E, ...] tensor per matrix) carry their count in a shape, which the loader's
    # shape checks compare; separate ones are counted by name here
    for layer in args.moe_layer_ids if args.expert_layout == "separate" else ():
        found = experts.get(layer, set())
        if not _is_range(found, args.num_experts):
            raise mismatch(f"the number of experts is {args.num_experts} but layer {layer} of the checkpoint holds "
                           f"{len(found)}")
    q_rows = args.num_heads * args.head_dim * (2 if args.attn_output_gate else 1)  # the gate rides in q_proj
    expected = {checkpoint_name(args, "embed_tokens.weight"): (args.vocab_size, args.hidden_size),
                checkpoint_name(args, "layers.0.self_attn.q_proj.weight"): (q_rows, args.hidden_size),
                checkpoint_name(args, "layers.0.self_attn.k_proj.weight"): (args.num_kv_heads * args.head_dim,
                                                                            args.hidden_size)}
    if args.moe_layer_ids and args.expert_layout == "separate":
        names = args.experts.names(args.moe_layer_ids[0], 0)
        expected |= dict(zip(names, args.experts.shapes))
    for name, shape in expected.items():
        if name in reader and reader.shape(name) != shape:
            raise mismatch(f"tensor {name} has shape {list(reader.shape(name))} but config.json implies {list(shape)}")
