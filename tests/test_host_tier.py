"""The pinned host tier when the system refuses to page-lock it: pageable buffers, the same bytes, a note."""

from __future__ import annotations

import torch

from cache.host_tier import HostTier
from quant.synthetic import SyntheticStore


def test_a_refused_page_lock_leaves_the_tier_pageable_and_says_so(monkeypatch):
    store = SyntheticStore(64, 32, [0, 1], 4, name="synthetic:test")
    real_empty = torch.empty
    refused = []

    def empty(*args, pin_memory=False, **kwargs):  # noqa: ANN002, ANN003, ANN202 - torch.empty's signature
        if pin_memory:
            refused.append(args[0])
            raise RuntimeError("CUDA error: out of memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    host = HostTier(store, [0, 1], 4, ["hot"], pin=True)
    assert refused and not host.buffers["hot"].is_pinned()
    assert any("could not page-lock" in n and "hot experts" in n for n in host.notes)
    assert torch.equal(host.get("hot", 1, 3), store.read("hot", 1, 3))
    assert host.pin is False
