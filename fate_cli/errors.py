"""Errors a user can act on. Each carries the exit status the CLI documents (README, "Exit status").

The CLI prints `error: <message>` on one line and exits with the status; nothing else ever
reaches the user as a traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2  # bad option or argument (also typer's own status for usage errors)
EXIT_NOT_FOUND = 3  # unknown alias, model not pulled, missing file
EXIT_BAD_MODEL = 4  # malformed config, corrupt or mismatched weights, unsupported architecture
EXIT_NETWORK = 5  # hub unreachable, download failed
EXIT_RESOURCES = 6  # memory budget, disk space, context length
EXIT_BUSY = 7  # another fate process holds the model's lock


class FateError(Exception):
    """An error with a one-line message that names the problem and the fix."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(FateError):
    exit_code = EXIT_USAGE


class ModelNotFound(FateError):
    exit_code = EXIT_NOT_FOUND


class BadModel(FateError):
    exit_code = EXIT_BAD_MODEL


class NetworkError(FateError):
    exit_code = EXIT_NETWORK


class ResourceError(FateError):
    exit_code = EXIT_RESOURCES


class Busy(FateError):
    exit_code = EXIT_BUSY


def oom_line() -> str:
    """What to tell a user whose GPU ran out of memory mid-run."""
    return ("the GPU ran out of memory: other programs may hold some of it, or the plan underestimated a "
            "workspace; run again with a lower --vram (e.g. 80% of what you gave), or close other GPU programs")
