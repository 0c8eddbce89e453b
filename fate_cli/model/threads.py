"""CPU threads: how many torch may use, and which steps are too small to spread over them.

As llama.cpp does, the default is one thread per physical core (hyperthreads share a core's arithmetic
units, so a second thread on a core adds barriers and no speed). An operation spread over threads waits
at a barrier for the slowest of them; when other programs keep the cores busy, the slowest has been
descheduled, and the operation costs a scheduler time slice (milliseconds) instead of microseconds. A
decode step of a small model is hundreds of such microsecond operations, so a step whose largest matrix
product is small runs on one thread: on a loaded 2-core machine the bundled model decodes several times
faster that way, and on an idle one no slower.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# Multiply-adds of the step's largest matrix product below which the step runs on one thread: about a
# millisecond of one core's work, the scale of a scheduler slice that a busy machine charges a barrier.
SMALL_STEP_MACS = 1 << 25


def physical_cores(sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores among the CPUs this process may run on (one per (package, core) pair)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:  # no topology to read: count every CPU as a core
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def default_threads() -> int:
    """OMP_NUM_THREADS when the user set it, else one per physical core."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else physical_cores()


def use_threads(count: int | None) -> int:
    """Give torch `count` threads (None: default_threads()); -> the count in use."""
    n = count if count is not None else default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    from quant.cpu_kernels import configure_threads

    configure_threads(n)  # the CPU expert kernels' own pool (numba's), for calls large enough to spread
    return n


def step_macs(args, tokens: int) -> int:  # noqa: ANN001 - fate_cli.model.args.ModelArgs
    """Multiply-adds of the largest matrix product of a forward over `tokens` tokens, the output head aside
    (one product a step, while attention and the experts make hundreds). A step whose largest matrix holds
    SMALL_MATRIX weights or more counts as large at any token count: at one token it is bound by reading that
    matrix (16 MB for a 2048x2048 float32 projection, a few milliseconds on one core), which threads share."""
    widest = max(args.num_heads * args.head_dim, args.hidden_size, args.dense_intermediate_size,
                 args.shared_expert_intermediate_size, args.moe_intermediate_size)
    weights = args.hidden_size * widest
    return tokens * weights if weights < SMALL_MATRIX else max(tokens * weights, SMALL_STEP_MACS)


@contextmanager
def step_threads(macs: int, device: torch.device) -> Iterator[None]:
    """Run a step on one CPU thread when its largest product is small (see SMALL_STEP_MACS)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1 or macs >= SMALL_STEP_MACS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def matrix_threads(elements: int, device: torch.device) -> Iterator[None]:
    """Work over matrices of `elements` weights each (quantizing experts: elementwise passes, small reductions)
    on one CPU thread when a matrix is small, as step_threads does for a forward step."""
    with step_threads(elements * (SMALL_STEP_MACS // SMALL_MATRIX), device):
        yield


SMALL_MATRIX = 1 << 20  # weights of a matrix below which passes over it run on one thread (4 MB in float32)
