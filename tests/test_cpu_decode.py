"""CPU decode: the dense weights at INT8 (--dense int8), a real model's decode step over threads, and a layer's
CPU experts in one kernel call."""

from __future__ import annotations

import pytest
import torch

from fate_cli.model.loader import load_model, load_weights
from fate_cli.model.model import GATE_PROJECTIONS, set_dense
from fate_cli.model.threads import SMALL_STEP_MACS, step_macs
from fate_cli.registry import BUNDLED_ROOT
from fate_cli.synthetic import synthetic_args
from quant import cpu_experts
from quant.dense_int8 import BLOCK_ROWS, KERNEL_IN_MULTIPLE, KERNEL_MAX_ROWS, Int8Linear
from tests.helpers import assert_one_line_error, fate_in_process
from tests.tiny_models import make_tiny_model


@pytest.mark.parametrize("rows", [1, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("bias,width", [(False, 96), (True, 96), (False, 40)])
def test_int8_linear_is_its_dequantized_weight_times_x(rows, bias, width):
    """Two blocks on the matmul path; a width torch's kernel cannot take (40) takes that path at any row count."""
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(BLOCK_ROWS + 300, width, generator=gen)
    b = torch.randn(w.shape[0], generator=gen) if bias else None
    q = Int8Linear.quantize(w, b)
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() == 127
    assert (q.dequantized() - w).abs().max() <= q.scale.float().max() * 0.5 + 1e-6  # rounding within half a step
    x = torch.randn(2, rows, width, generator=gen)
    y = q(x)
    ref = x @ q.dequantized().t() + (0 if b is None else b)
    assert y.shape == (2, rows, w.shape[0]) and y.dtype == x.dtype
    # at up to KERNEL_MAX_ROWS rows torch's kernel takes x in bfloat16: its rounding, not the weights', differs
    tol = 3e-2 if rows * 2 <= KERNEL_MAX_ROWS and width % KERNEL_IN_MULTIPLE == 0 else 1e-4
    assert torch.allclose(y, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_int8_dense_replaces_every_linear_but_the_gates(tmp_path):
    path = make_tiny_model(tmp_path / "m", family="qwen2_moe")  # a shared expert and its gate
    weights = load_weights(path)
    int8 = weights.with_int8_dense()
    names = set(int8.int8)
    assert {"lm_head", "layers.0.self_attn.q_proj", "layers.0.mlp.shared_expert.down_proj"} <= names
    assert not any(n.endswith(GATE_PROJECTIONS) for n in names)
    assert "layers.0.mlp.gate.weight" in int8.tensors and "layers.0.self_attn.q_proj.weight" not in int8.tensors
    full = load_model(path)
    model = int8.model(full.model.provider)
    assert isinstance(model.layers[0].self_attn.q_proj, Int8Linear)
    again = model.with_experts(full.model.provider)  # a bench row's model: the same INT8 modules, shared
    assert again.layers[0].self_attn.q_proj is model.layers[0].self_attn.q_proj
    tokens = torch.tensor([[3, 17, 42, 9, 11]])
    ref = full.model(tokens, full.model.new_cache(1, 8), 0)
    got = again(tokens, again.new_cache(1, 8), 0)
    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item())  # the INT8 rounding, not a wrong weight
    assert not torch.equal(got, ref)


def test_dense_int8_on_the_command_line(tmp_path):
    ran = fate_in_process("run", "tiny", "What is a kludge?", "-n", "8", "--temperature", "0", "--device", "cpu",
                          "--dense", "int8")
    assert ran.returncode == 0, ran.stderr
    assert "dense weights INT8 (torch _weight_int8pack_mm" in ran.stderr.splitlines()[0]
    plain = fate_in_process("run", "tiny", "What is a kludge?", "-n", "8", "--temperature", "0", "--device", "cpu")
    assert "dense weights" not in plain.stderr  # the setting ended with the command
    assert_one_line_error(fate_in_process("run", "tiny", "hi", "--dense", "int4"), 2, "--dense", "int4", "int8")
    bench = fate_in_process("bench", "tiny", "--vram", "50%", "--policy", "lru", "-p", "4", "-n", "2", "-r", "1",
                            "--device", "cpu", "--dense", "int8")
    assert bench.returncode == 0, bench.stderr
    assert "float32, dense weights INT8;" in bench.stderr.splitlines()[0]


def test_dense_int8_refuses_a_gpu_run():
    set_dense("int8")
    try:
        from fate_cli.errors import UsageError

        with pytest.raises(UsageError, match="--device cpu"):
            load_weights(BUNDLED_ROOT / "tiny", device="meta")
    finally:
        set_dense(None)


def test_a_real_shape_decode_step_spreads_over_threads():
    """One token through 2048x2048 projections reads 16 MB a matrix: it runs on every thread, unlike the bundled
    model's step (test_cli_surface)."""
    for shape in ("olmoe-1b-7b", "qwen3-30b-a3b"):
        assert step_macs(synthetic_args(f"synthetic:{shape}"), 1) >= SMALL_STEP_MACS


def test_a_cpu_layer_computes_its_quantized_experts_in_one_call(monkeypatch, capsys):
    """On the CPU, a layer whose routed experts sit in quantized slots calls the kernels once, not once an expert,
    and the sum is the per-expert loop's."""
    from fate_cli.engine.runtime import open_model

    runtime = open_model("tiny", device="cpu", policy="lru", vram="16MB")
    model, tokens = runtime.model, torch.tensor([[5, 9, 200, 31]])
    calls: list[int] = []
    real = cpu_experts.cpu_moe

    def counted(x, experts, weights, act=None, threads=None):  # noqa: ANN001, ANN202
        calls.append(len(experts))
        return real(x, experts, weights, act, threads)

    monkeypatch.setattr("fate_cli.model.moe.cpu_moe", counted)
    cache = model.new_cache(1, 8)
    model(tokens, cache, 0)
    calls.clear()
    together = model(torch.tensor([[7]]), cache, 4)[:, -1]
    top_k = model.args.top_k
    assert calls and max(calls) > 1 and sum(calls) <= top_k * len(model.args.moe_layer_ids)
    monkeypatch.setattr("fate_cli.model.moe.MoEBlock._cpu_together", lambda self, x, w, i, served, out: served)
    cache = model.new_cache(1, 8)
    model(tokens, cache, 0)
    alone = model(torch.tensor([[7]]), cache, 4)[:, -1]
    assert torch.allclose(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_the_plan_counts_the_int8_dense_weights_it_will_hold(tmp_path, family):
    from cache.setup import non_expert_bytes

    path = make_tiny_model(tmp_path / family, family=family, tie_word_embeddings=family == "qwen3_moe")
    weights = load_weights(path).with_int8_dense()
    held = sum(t.nbytes for t in weights.tensors.values())
    held += sum(b.nbytes for m in weights.int8.values() for b in m.buffers())  # codes, scales, biases
    set_dense("int8")
    try:
        planned = non_expert_bytes(weights.args, torch.float32)
    finally:
        set_dense(None)
    assert planned == held
    assert planned < non_expert_bytes(weights.args, torch.float32)
