"""Prefill under an offloading cache, on the same scripted routing (the bundled model's recorded traffic replayed
through experts of another size): the `fate` policy issues no more expert launches than `lru` and no more copies
at any budget, so its prediction never turns a prompt into extra traffic. The two evict differently (ARC against
LRU), which moves a copy or two either way on what the previous prompt left in the slots: the copies are compared
over the prompts together, within 2%; a prediction that added traffic adds a copy per layer or more."""

from __future__ import annotations

import pytest
import torch

from cache.offload import QuantExpert
from fate_cli.bench import prompt_set
from fate_cli.bench_targets import ReplayTarget
from fate_cli.engine.runtime import experts_for, open_weights
from fate_cli.registry import resolve
from tests.helpers import one_thread  # noqa: F401 - one_thread applies to this module

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def replay():
    weights = open_weights(resolve("tiny"), CPU, torch.float32)
    recorded = weights.model(experts_for(weights, None, None, None))
    return ReplayTarget("replay:test", recorded, 64, 128, CPU, torch.float32, None)


def _prefill_traffic(target: ReplayTarget, policy: str, budget: int, prompts: list[list[int]],
                     monkeypatch) -> list[tuple[int, int]]:
    """(copies, expert launches) of each prompt's prefill, the prompts run one after another on one cache."""
    launches = []
    original = QuantExpert.__call__
    monkeypatch.setattr(QuantExpert, "__call__", lambda self, x: launches.append(1) or original(self, x))
    session = target.session(policy, budget)
    traffic = []
    for prompt in prompts:
        session.offload.reset_stats()
        launches.clear()
        target.run(session, [prompt], 1)  # the prompt's step and the first token's
        stats = session.offload.sync_stats()
        traffic.append((sum(stats.as_dict()["loads"].values()), len(launches)))
    session.close()
    return traffic


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_fate_prefill_moves_and_launches_no_more_than_lru(replay, share, monkeypatch):
    prompts = prompt_set(128, 3, None)
    budget = int(replay.footprint.fixed + share * replay.footprint.all_hot)
    fate = _prefill_traffic(replay, "fate", budget, prompts, monkeypatch)
    lru = _prefill_traffic(replay, "lru", budget, prompts, monkeypatch)
    assert all(launches > 0 for _, launches in lru)  # the prompts ran through the experts
    assert all(f[1] <= r[1] for f, r in zip(fate, lru)), (fate, lru)
    assert sum(f[0] for f in fate) <= 1.02 * sum(r[0] for r in lru), (fate, lru)
