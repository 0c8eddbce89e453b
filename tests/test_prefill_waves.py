"""An offloaded prefill whose routed experts outnumber a layer's slots streams them through the slots in waves
(OffloadedExperts.waves, quant/grouped.GroupedPass): the logits, the cache's counts and the bytes moved equal the
expert-by-expert loop's, on the CPU and (where there is one) on a GPU through the grouped Triton kernel; both tiers
and a layer held whole at 16 bits take part."""

from __future__ import annotations

import pytest
import torch

from cache.offload import OffloadedExperts
from cache.policies import PolicyContext, make_policy
from fate_cli.model.loader import load_model
from quant.triton_kernels import HAVE_TRITON
from tests.helpers import fixed_plan
from tests.tiny_gpt_oss import make_tiny_gpt_oss
from tests.tiny_models import FAMILIES, make_fitting_store, make_tiny_model

WAVES = OffloadedExperts.waves
DEVICES = ["cpu"] + (["cuda"] if HAVE_TRITON and torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def fitting(tmp_path_factory):
    return make_fitting_store(tmp_path_factory.mktemp("waves"))


def _prefill(path, store, device: str, policy: str, waves: bool, monkeypatch, slots: int = 3,  # noqa: ANN001
             whole: int = 1) -> tuple:
    """Two prompts' logits through a cache of `slots` slots a layer (the first `whole` MoE layers held whole), with
    or without waves."""
    calls = []
    if waves:
        monkeypatch.setattr(OffloadedExperts, "waves", lambda self, *a: calls.append(a[0]) or WAVES(self, *a))
    else:
        monkeypatch.setattr(OffloadedExperts, "waves", lambda self, *a: None)
    dev = torch.device(device)
    model = load_model(path, dev, torch.float32).model
    args = model.args
    plan = fixed_plan(args, store, slots, whole)
    provider = OffloadedExperts(store, plan, make_policy(policy, PolicyContext.of(args, model.routers())), dev,
                                torch.float32, act=args.expert_act)
    model = model.with_experts(provider)
    logits = []
    for prompt in ([5, 9, 14, 3, 27, 8, 61, 2, 40, 11, 7, 19], [40, 2, 2, 17, 90, 33]):
        cache = model.new_cache(1, 32)
        with torch.no_grad():
            logits.append(model(torch.tensor([prompt], device=dev), cache, 0).float().cpu())
    s = provider.sync_stats()
    return logits, (s.hits, s.misses, dict(s.bytes_moved), s.prefetches), calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["fate", "lru", "ondemand"])
def test_waves_give_the_loops_logits_and_counts(fitting, device, policy, monkeypatch):
    path, store = fitting
    loop, loop_counts, _ = _prefill(path, store, device, policy, False, monkeypatch)
    waved, waved_counts, calls = _prefill(path, store, device, policy, True, monkeypatch)
    assert {1, 2} <= set(calls), "the offloaded layers' prefill did not stream through waves"
    assert waved_counts == loop_counts
    assert loop_counts[1] > 0  # it missed: experts moved during the prefill
    for a, b in zip(waved, loop):
        if device == "cpu":  # the same expert calls on the same rows, summed in the same order
            assert torch.equal(a, b)
        else:  # the grouped kernel's tiles against the per-expert kernels: float32 rounding
            assert ((a - b).norm() / b.norm()).item() < 1e-5
            assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_oss"])
def test_waves_on_every_family_on_the_cpu(tmp_path, family, monkeypatch):
    """Tiny configs of every family (shared experts, linear attention, expert biases and the clamped SwiGLU), every
    MoE layer behind the cache: the waves' logits are the loop's, bit for bit."""
    from fate_cli.engine.stores import quantize_model
    from quant.store import QuantParams, TierStore

    if family == "gpt_oss":
        path = make_tiny_gpt_oss(tmp_path / "model", num_hidden_layers=3)
    else:
        path = make_tiny_model(tmp_path / "model", family=family, num_hidden_layers=3)
    quantize_model(path, tmp_path / "store", QuantParams(method="minmax"))
    store = TierStore.open(tmp_path / "store", path)
    loop, loop_counts, _ = _prefill(path, store, "cpu", "fate", False, monkeypatch, slots=2, whole=0)
    waved, waved_counts, calls = _prefill(path, store, "cpu", "fate", True, monkeypatch, slots=2, whole=0)
    assert len(set(calls)) >= 2 and waved_counts == loop_counts and loop_counts[1] > 0
    assert all(torch.equal(a, b) for a, b in zip(waved, loop))
