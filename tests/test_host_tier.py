"""The pinned host tier when the system refuses to page-lock all of it: the layers locked before the refusal stay
locked, the rest pageable, the same bytes, and a note saying how much was locked."""

from __future__ import annotations

import torch

from cache import host_tier
from cache.budget import format_size
from cache.host_tier import HostTier, chunk_bytes
from quant.synthetic import SyntheticStore


def test_a_refused_page_lock_keeps_what_was_locked_and_says_so(monkeypatch):
    store = SyntheticStore(64, 32, [0, 1], 4, name="synthetic:test")
    real_empty = torch.empty
    refused, locked = [], []

    def empty(*args, pin_memory=False, **kwargs):  # noqa: ANN002, ANN003, ANN202 - torch.empty's signature
        if pin_memory:
            if locked:  # the first layer's buffer is locked, then the system refuses
                refused.append(args[0])
                raise RuntimeError("CUDA error: out of memory")
            locked.append(args[0])
        return real_empty(*args, **kwargs)

    hot = store.tiers["hot"].layout.nbytes
    monkeypatch.setattr(host_tier, "CHUNK_BYTES", 4 * hot + 1)  # a chunk of 4 experts: the first layer's
    monkeypatch.setattr(torch, "empty", empty)
    host = HostTier(store, [0, 1], 4, ["hot", "cold"], pin=True)
    assert len(locked) == 1 and len(refused) == 1  # no lock tried after the refusal
    assert any(f"page-locked {format_size(4 * hot)} of {format_size(8 * hot)}" in n and "hot experts" in n
               for n in host.notes), host.notes
    for tier in ("hot", "cold"):
        for layer in (0, 1):
            assert torch.equal(host.get(tier, layer, 3), store.read(tier, layer, 3))
    assert host.pin is False


def test_chunks_are_powers_of_two_so_the_pinned_allocator_wastes_nothing():
    assert chunk_bytes(10) == 16 and chunk_bytes(16) == 16 and chunk_bytes(1) == 1
    assert chunk_bytes(64 * 2**30) == 2**30  # a 64 GB tier: 1 GiB chunks, not one 128 GB request
    store = SyntheticStore(64, 32, [0, 1, 2], 8, name="synthetic:test")
    host = HostTier(store, [0, 1, 2], 8, ["hot"], pin=False)
    total = 24 * store.tiers["hot"].layout.nbytes
    assert host.nbytes == total and len(host.buffers["hot"]) == 1
    assert torch.equal(host.get("hot", 2, 7), store.read("hot", 2, 7))
