"""Checks shared by the CLI tests."""

from __future__ import annotations

import subprocess


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The command failed with `code` and said so in one `error: ...` line naming every needle."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
