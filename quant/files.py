"""Durable files, for everything fate writes or locks: the tier store, pulled models' records, tuned tiles.

- A file is written under a temporary name in its folder, flushed to disk and renamed over the old one, so a
  crash, a full disk or Ctrl-C leaves the old complete file or the new one, never a part.
- A JSON object is read with one error that says why it cannot be used; each caller words what to do.
- A lock is an exclusive flock on a file: the kernel drops it when its process dies, so none goes stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class UnreadableJSON(ValueError):
    """A JSON file that is missing, unreadable, not JSON or not an object; str() says which, in a few words."""


def write_atomic(path: Path, fill: Callable[[Path], None]) -> None:
    """fill(tmp) writes the new content to a temporary file beside `path`; it is synced, then renamed over it."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fill(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: the old file stays whole and no partial copy is left
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    def fill(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, fill)


def write_json_atomic(path: Path, data: Any, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some file systems refuse to sync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or UnreadableJSON saying why not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnreadableJSON("missing") from None
    except OSError as err:
        raise UnreadableJSON(err.strerror or type(err).__name__) from None
    except UnicodeDecodeError:
        raise UnreadableJSON("not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise UnreadableJSON(f"not valid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(data, dict):
        raise UnreadableJSON("not a JSON object")
    return data


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: Callable[[str], Exception], note: str = "", tries: int = 1) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if need be) for the block. When another process holds it after
    `tries` attempts 0.05 s apart, raise busy(its note). `note` is written into the file for others to read."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(tries):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == tries - 1:
                    raise busy(os.pread(fd, 200, 0).decode(errors="replace")) from None
                time.sleep(0.05)
        if note:
            os.ftruncate(fd, 0)
            os.pwrite(fd, note.encode(), 0)
        yield
    finally:
        os.close(fd)  # also releases the lock


def lock_note(path: Path) -> str | None:
    """The note of the process holding `path`'s lock right now ("" if it wrote none), or None when no process
    holds it (probed with a shared lock, not kept)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    return None
