"""GPU expert slots: one device buffer cut into fixed-size slots, filled by a dedicated copy stream.

Each slot has two CUDA events: `ready` (its copy finished) and `free` (the compute that read it
finished). Compute waits only for the slots it needs (stream.wait_event, no host synchronisation);
a copy into a slot waits only for the last compute that read it. On a CPU the "device" is just
another memory pool and copies are synchronous.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

STALL_PAIRS = 1024  # timing event pairs kept before they are read back (one host sync per this many stalls)


class StallTimer:
    """GPU time the compute stream spent waiting for copies, from CUDA event pairs around each wait.

    A pair is recorded only when the copy was still running as the host queued the wait; the events
    are preallocated and read back (one synchronisation) when the ring fills or stats are asked for.
    """

    def __init__(self) -> None:
        self.pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(STALL_PAIRS)]
        self.used = 0
        self.seconds = 0.0
        self.waits = 0
        self.layer_of: list[int | None] = [None] * STALL_PAIRS
        self.by_layer: dict[int, float] = {}

    def wait(self, stream: torch.cuda.Stream, ready: list[torch.cuda.Event], layer: int | None = None) -> None:
        """Make the stream wait for copies the host has seen still running (query() was False), timed as one."""
        if self.used == len(self.pairs):
            self.collect()
        before, after = self.pairs[self.used]
        self.layer_of[self.used] = layer
        self.used += 1
        self.waits += len(ready)
        before.record(stream)
        for event in ready:
            stream.wait_event(event)
        after.record(stream)

    def collect(self) -> float:
        if self.used:
            self.pairs[self.used - 1][1].synchronize()
            for (b, a), layer in zip(self.pairs[: self.used], self.layer_of):
                seconds = b.elapsed_time(a) / 1000
                self.seconds += seconds
                if layer is not None:
                    self.by_layer[layer] = self.by_layer.get(layer, 0.0) + seconds
            self.used = 0
        return self.seconds


class SlotPool:
    def __init__(self, device: torch.device, slot_nbytes: int, slots_per_layer: dict[int, int]):
        self.device = device
        self.slot_nbytes = slot_nbytes
        self.first: dict[int, int] = {}
        total = 0
        for layer, n in slots_per_layer.items():
            self.first[layer] = total
            total += n
        self.buf = torch.empty((total, slot_nbytes), dtype=torch.uint8, device=device)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event() for _ in range(total)]
            self.slot_free = [torch.cuda.Event() for _ in range(total)]
            self.free = list(self.slot_free)  # the event a copy into the slot waits for (its own, or its layer's)
            self.layer_free = {layer: torch.cuda.Event() for layer in slots_per_layer}
            self.settled = [True] * total  # the slot's last copy is known to be complete
            self.stalls = StallTimer()
        self.sleep_cycles_per_byte = 0.0  # an emulated slower link (--link): the copy stream's wait per byte
        self._copying = False  # inside `copying`: the copy stream is current

    def emulate_link(self, link_bytes_per_s: float, measured_bytes_per_s: float, clock_hz: float) -> None:
        """Hold the copy stream busy after each copy for the time a link of `link_bytes_per_s` would take beyond
        the measured one's: what moves is unchanged, copies end when the slower link's would."""
        extra = max(0.0, 1 / link_bytes_per_s - 1 / measured_bytes_per_s)
        self.sleep_cycles_per_byte = extra * clock_hz

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes

    def view(self, layer: int, slot: int, nbytes: int) -> torch.Tensor:
        return self.buf[self.first[layer] + slot, :nbytes]

    @contextmanager
    def copying(self) -> Iterator[None]:
        """Loads queued inside share one switch to the copy stream (a step's misses and prefetches): switching
        streams costs the host more than queueing a copy. Nothing but loads may be queued inside."""
        if not self.cuda or self._copying:
            yield
            return
        with torch.cuda.stream(self.copy_stream):
            self._copying = True
            try:
                yield
            finally:
                self._copying = False

    def load(self, layer: int, slot: int, host: torch.Tensor) -> None:
        """Copy one expert's buffer into a slot: one copy, asynchronous on CUDA."""
        row = self.first[layer] + slot
        dest = self.buf[row, : host.numel()]
        if not self.cuda:
            dest.copy_(host)
            return
        with self.copying():
            self.copy_stream.wait_event(self.free[row])
            dest.copy_(host, non_blocking=True)
            if self.sleep_cycles_per_byte:
                torch.cuda._sleep(int(host.numel() * self.sleep_cycles_per_byte))
            self.ready[row].record(self.copy_stream)
        self.settled[row] = False

    def wait_ready(self, layer: int, slots: list[int]) -> None:
        """Compute waits for the slots' copies, except those the host has already seen complete; the waits of a
        layer are timed together (one pair of events: a step's host calls into CUDA are what it costs)."""
        if not self.cuda:
            return
        running = []
        for slot in slots:
            row = self.first[layer] + slot
            if self.settled[row]:
                continue
            if self.ready[row].query():
                self.settled[row] = True
                continue
            running.append(self.ready[row])
        if running:
            self.stalls.wait(torch.cuda.current_stream(self.device), running, layer)

    def release(self, layer: int, slot: int) -> None:
        """The compute stream is done reading this slot (once the work queued so far completes)."""
        if self.cuda:
            row = self.first[layer] + slot
            self.free[row] = self.slot_free[row]
            self.free[row].record(torch.cuda.current_stream(self.device))

    def release_layer(self, layer: int, slots: list[int]) -> None:
        """`release` for several slots of a layer read by one kernel: one event for all of them."""
        if self.cuda and slots:
            event = self.layer_free[layer]
            event.record(torch.cuda.current_stream(self.device))
            for slot in slots:
                self.free[self.first[layer] + slot] = event
