"""Checks shared by the CLI tests."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread beats two (no OpenMP barriers), by far on a busy 2-core machine.

    Import it into a test module to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The command failed with `code` and said so in one `error: ...` line naming every needle."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_error_after_progress(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Like assert_one_line_error for failures after loading began: the status lines printed before it
    (the model line, a progress line) stay, and the error is one `error: ...` line, the last."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def fate_in_process(*args: str, home: Path | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    """`fate ARGS` through the installed command's entry point (fate_cli.app.main), in this process: the same
    parsing, errors and exit status as a subprocess, without importing torch again (seconds a call).

    stdin is the text the command reads (never a terminal); home sets FATE_HOME for the call. An exception
    that escapes main() lands in stderr as a traceback with status 1, as it would in a subprocess."""
    from fate_cli.app import main
    from fate_cli.model.model import set_dense, set_prefill_chunk

    out, err = io.StringIO(), io.StringIO()
    saved_env = os.environ.get("FATE_HOME")
    saved_stdin, saved_argv, saved_threads = sys.stdin, sys.argv, torch.get_num_threads()
    if home is not None:
        os.environ["FATE_HOME"] = str(home)
    sys.stdin, sys.argv = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8"), ["fate", *args]  # a pipe
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 - reported as the subprocess would report it
                err.write(traceback.format_exc())
                code = 1
    finally:
        sys.stdin, sys.argv = saved_stdin, saved_argv
        torch.set_num_threads(saved_threads)
        torch.set_flush_denormal(False)  # commands flush denormals; the test process's float math keeps them
        set_dense(None)  # --dense is the process's setting: a later test's model loads at its own dtype
        set_prefill_chunk(None)
        if home is not None:
            if saved_env is None:
                os.environ.pop("FATE_HOME", None)
            else:
                os.environ["FATE_HOME"] = saved_env
    return subprocess.CompletedProcess(["fate", *args], code, out.getvalue(), err.getvalue())


def fixed_plan(args, store, slots: int, whole: int = 0):  # noqa: ANN001, ANN201 - ModelArgs, TierStore -> Plan
    """A plan of `slots` hot-tier slots for each MoE layer (the first `whole` held whole at 16 bits), under a budget
    that never binds: what the cache tests build by hand instead of asking the planner."""
    from cache.planner import Footprint, Plan

    layers = list(args.moe_layer_ids)
    fp = Footprint(tuple(layers), args.num_experts, args.top_k, 0, store.tiers["hot"].layout.nbytes, 0, 0, 0)
    return Plan(10**9, fp, {layer: slots for layer in layers[whole:]}, full_layers=tuple(layers[:whole]))
