"""Checks shared by the CLI tests."""

from __future__ import annotations

import subprocess

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
