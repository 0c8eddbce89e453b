"""`fate pull`, `fate list`, `fate rm`: models from the Hugging Face Hub under $FATE_HOME/models.

A pull, step by step:

1. Resolve the name (alias or org/name), take the model's lock ($FATE_HOME/models/.locks/org--name.lock,
   fcntl.flock, non-blocking: a second pull or rm of the same model gets `Busy`).
2. Ask the Hub for the revision's commit sha and the file list with sizes at that sha.
3. Up to date (marker for this sha, every file present at its size)? Say so and stop: no file request.
4. Fetch the small files (config, tokenizer, index) and check them: supported model_type, the index's
   shards exist. Nothing large is fetched for a model fate cannot run.
5. Show the total, check free disk space, then download config + tokenizer + exactly the safetensors
   weights (never .bin/.pt/consolidated files) with huggingface_hub's snapshot_download into the model's
   folder, with a rich progress bar.
6. Verify every file is present with the size the Hub lists, then write PULL_MARKER last, atomically.
   Only a folder holding the marker is taken as a usable model (`registry.resolve`).
7. `after_pull`: the single call site for what follows a pull: `fate quantize` (skipped by --no-quantize).

A folder holding an older complete revision stays usable through steps 1-5 (its small files are
checked in a staging folder); the marker is removed right before the new files start landing, so a
half-updated folder reads as "did not finish", never as a mix of two revisions.

huggingface_hub 2.4 (read in its source, file_download.py / _local_folder.py): a local_dir download
streams into local_dir/.cache/huggingface/download/<name-hash>.<etag>.<random>.incomplete, in 10 MiB
writes, and renames it into place only once its size matches, so a file under its final name is whole.
Within one process a dropped or stalled connection is resumed with a Range request (up to 5 tries);
across processes nothing is resumed: the temporary name is unique per attempt, so a killed pull leaves
an orphan `.incomplete` that no later pull reuses or deletes. We delete those orphans (under our lock)
before downloading again. A file already downloaded at this commit (NAME.metadata records commit and
ETag) is never fetched again, and one from an older commit with the same ETag costs only a HEAD.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.filesize import decimal as human_size
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from fate_cli.errors import BadModel, Busy, FateError, ModelNotFound, NetworkError, ResourceError, UsageError
from fate_cli.registry import (
    BUNDLED_ROOT,
    PULL_MARKER,
    alias_for_pull,
    aliases,
    is_complete,
    looks_like_repo,
    models_dir,
    pull_record,
    repo_dir,
    unknown_alias,
)
from quant.files import UnreadableJSON, exclusive_lock, lock_note, read_json_object, write_json_atomic

INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
# Small files a checkpoint needs besides its weights; only config.json and tokenizer.json are required.
SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
REQUIRED_FILES = ("config.json", "tokenizer.json")
DISK_HEADROOM = 64 * 1024 * 1024  # bytes kept free beyond what the download needs (metadata, logs)
API_TIMEOUT = 30.0  # seconds for the revision look-up


def _hf_download_dir(model_dir: Path) -> Path:
    """Where huggingface_hub keeps per-file metadata and partial downloads of a local_dir download."""
    return model_dir / ".cache" / "huggingface" / "download"


def _folder_name(repo: str) -> str:
    return repo.replace("/", "--")


def _staging_dir(repo: str) -> Path:
    return models_dir() / ".staging" / _folder_name(repo)


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


# --------------------------------------------------------------------------------------------- locks


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".fate-write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ResourceError(
            f"cannot write to {path} ({err.strerror or err}); set FATE_HOME to a writable folder"
        ) from None


def _lock_path(repo: str) -> Path:
    return models_dir() / ".locks" / f"{_folder_name(repo)}.lock"


def _holder(note: str) -> tuple[str, str]:
    """(pid, "pulling" or "removing") from the note the lock's holder wrote."""
    words = note.split()
    return (words[0] if words else "unknown"), ("removing" if words[1:2] == ["rm"] else "pulling")


def lock_holder(repo: str) -> tuple[str, str] | None:
    """Who holds `repo`'s lock right now, or None (for `fate list`)."""
    note = lock_note(_lock_path(repo))
    return None if note is None else _holder(note)


@contextlib.contextmanager
def model_lock(repo: str, action: str) -> Iterator[None]:
    """Hold $FATE_HOME/models/.locks/org--name.lock for a pull or rm of `repo`, or raise Busy (within 0.2 s).

    flock is released by the kernel when the process dies, so a killed pull never leaves a stale lock.
    """
    path = _lock_path(repo)
    _ensure_dir(path.parent)

    def busy(note: str) -> Busy:
        pid, doing = _holder(note)
        return Busy(f"another fate process is {doing} {repo} (pid {pid}); wait for it to finish")

    try:
        path.touch()
    except OSError as err:
        raise ResourceError(f"cannot write to {path} ({err.strerror}); set FATE_HOME to a writable folder") from None
    # a few tries: `fate list` probes the lock for an instant (lock_holder)
    with exclusive_lock(path, busy, note=f"{os.getpid()} {action}\n", tries=5):
        yield


# ------------------------------------------------------------------------------------- error mapping


def _reason(err: BaseException) -> str:
    """A short, one-line reason from an exception (and its cause), e.g. 'connection refused'."""
    seen: set[int] = set()
    while err.__cause__ is not None and id(err) not in seen and not str(err).strip():
        seen.add(id(err))
        err = err.__cause__
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if text.startswith("[Errno"):
        text = text.split("]", 1)[-1].strip()
    text = text[:1].lower() + text[1:]
    return text[:160] or type(err).__name__


@contextlib.contextmanager
def hub_errors(repo: str, revision: str) -> Iterator[None]:
    """huggingface_hub / httpx exceptions -> one-line FateErrors naming the fix."""
    import httpx2
    from huggingface_hub import errors as hf

    endpoint = _endpoint()
    unreachable = f"cannot reach the Hugging Face Hub at {endpoint} ({{}}); check the network or HF_ENDPOINT"
    try:
        yield
    except FateError:
        raise
    except hf.GatedRepoError:
        raise NetworkError(f"{repo} is gated; accept its licence on huggingface.co and set HF_TOKEN") from None
    except hf.RevisionNotFoundError:
        raise ModelNotFound(f"revision {revision} not found in {repo} on the Hub; check --revision") from None
    except hf.DisabledRepoError:
        raise ModelNotFound(f"repo {repo} is disabled on the Hub; pull another repo") from None
    except hf.RepositoryNotFoundError:
        raise ModelNotFound(
            f"repo {repo} not found on the Hub at {endpoint}; check the spelling (a private repo needs HF_TOKEN)"
        ) from None
    except hf.RemoteEntryNotFoundError as err:
        raise NetworkError(
            f"the Hub lists a file of {repo} that it then does not serve ({err.response.url}); try again later"
        ) from None
    except hf.OfflineModeIsEnabled:
        raise NetworkError("HF_HUB_OFFLINE is set, so nothing can be pulled; unset it and try again") from None
    except hf.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        if status in (401, 403):
            raise NetworkError(f"the Hub refused access to {repo} (HTTP {status}); check HF_TOKEN") from None
        raise NetworkError(
            f"the Hugging Face Hub at {endpoint} answered HTTP {status} for {repo}; try again later"
        ) from None
    except hf.FileMetadataError as err:
        raise NetworkError(
            f"{endpoint} does not answer like a Hugging Face Hub ({_reason(err)}); check HF_ENDPOINT"
        ) from None
    except hf.LocalEntryNotFoundError as err:  # snapshot_download's wrapper around a failed connection
        cause = err.__cause__ or err
        raise NetworkError(unreachable.format(_reason(cause))) from None
    except (httpx2.TransportError, httpx2.InvalidURL, httpx2.UnsupportedProtocol) as err:
        raise NetworkError(unreachable.format(_reason(err) or type(err).__name__)) from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ResourceError(f"the disk filled up while pulling {repo}; free space and pull again") from None
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = err.filename or models_dir()
            raise ResourceError(
                f"cannot write to {where} ({err.strerror}); set FATE_HOME to a writable folder"
            ) from None
        if "Consistency check failed" in str(err):
            raise NetworkError(
                f"a download from {endpoint} was cut short ({repo}); run `fate pull` again to fetch the rest"
            ) from None
        raise NetworkError(f"pulling {repo} failed ({_reason(err)}); run `fate pull` again") from None
    except (ValueError, KeyError, TypeError) as err:  # a JSON body that is not what the Hub sends
        raise NetworkError(
            f"{endpoint} gave an answer fate cannot read for {repo} ({_reason(err)}); check HF_ENDPOINT"
        ) from None


# ----------------------------------------------------------------------------------------- progress


class _SilentTqdm:
    """A tqdm stand-in that shows nothing (for the few small files fetched before the weights)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.n = kwargs.get("initial") or 0
        self.total = kwargs.get("total")

    def __enter__(self) -> _SilentTqdm:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: float | None = 1) -> None:
        self.n += n or 0

    @property
    def format_dict(self) -> dict[str, Any]:
        return {"n": self.n, "total": self.total, "rate": None}

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        pass

    close = clear = set_description = set_description_str = set_postfix = set_postfix_str = refresh


def rich_tqdm(progress: Progress, task: Any, n_files: int, total_bytes: int) -> type:
    """A tqdm_class for snapshot_download that drives one rich task: bytes, speed, ETA, files done.

    snapshot_download opens a file-count bar and two byte bars (network transfer and bytes written;
    equal for plain HTTP, transfer lower for Xet). The task shows the larger byte count.
    """
    lock = threading.Lock()
    bars: list[_SilentTqdm] = []
    total = [total_bytes]

    class RichTqdm(_SilentTqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.counts_bytes = kwargs.get("unit") == "B"
            with lock:
                bars.append(self)
            self._show()

        def update(self, n: float | None = 1) -> None:
            with lock:
                self.n += n or 0
            self._show()

        def _show(self) -> None:
            with lock:
                done = max((b.n for b in bars if b.counts_bytes), default=0)
                files = max((b.n for b in bars if not b.counts_bytes), default=0)
                total[0] = max(total[0], done)  # a file fetched again after all (changed on the Hub)
            progress.update(task, completed=done, total=total[0], description=f"{int(files)}/{n_files} files")

    return RichTqdm


# ---------------------------------------------------------------------------------------------- pull


@dataclass(frozen=True)
class RemoteFile:
    size: int
    etag: str  # what the Hub's resolve endpoint answers as ETag: the sha256 of LFS/Xet files, else the git blob id


def _tree(api: Any, repo: str, sha: str) -> dict[str, RemoteFile]:
    from huggingface_hub.hf_api import RepoFile

    return {
        f.path: RemoteFile(int(f.size), f.lfs.sha256 if f.lfs is not None else f.blob_id)
        for f in api.list_repo_tree(repo, recursive=True, revision=sha)
        if isinstance(f, RepoFile)
    }


def _download(repo: str, sha: str, names: list[str], local_dir: Path, tqdm_class: type) -> None:
    import glob

    from huggingface_hub import snapshot_download

    snapshot_download(
        repo,
        revision=sha,
        allow_patterns=[glob.escape(n) for n in names],  # exact names (fnmatch would expand [ * ?)
        local_dir=local_dir,
        endpoint=_endpoint(),
        tqdm_class=tqdm_class,
        max_workers=8,
    )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except UnreadableJSON as err:
        raise BadModel(f"{what} ({path.name}) cannot be used ({err}); the repo is not a usable model") from None


def _check_family(config: dict[str, Any], repo: str, alias_family: str | None, con: Console) -> str:
    from fate_cli.model.loader import FAMILIES

    family = config.get("model_type")
    if family not in FAMILIES:
        raise BadModel(
            f"{repo} is a {family!r} model (config.json model_type), which fate does not run; "
            f"supported families: {', '.join(sorted(FAMILIES))}"
        )
    if alias_family and alias_family != family:
        con.print(f"[yellow]note: models.toml lists {repo} as {alias_family}, its config.json says {family}[/]")
    return family


def _weight_files(repo: str, tree: dict[str, RemoteFile], index: dict[str, Any] | None) -> list[str]:
    if index is None:
        return [SINGLE_WEIGHTS]
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadModel(f"{repo}: {INDEX_FILE} has no weight_map; the repo is not a usable model")
    shards = sorted({str(v) for v in weight_map.values()})
    for shard in shards:
        if "/" in shard or "\\" in shard or shard.startswith(".") or not shard.endswith(".safetensors"):
            raise BadModel(f"{repo}: {INDEX_FILE} lists an unexpected shard name {shard!r}; "
                           f"the repo is not a usable model")
        if shard not in tree:
            raise BadModel(f"{repo}: {INDEX_FILE} lists {shard}, which the repo does not have; "
                           "the repo is not a usable model")
    return shards


def _is_done(model_dir: Path, name: str, remote: RemoteFile, sha: str) -> bool:
    """Is `name` already in the folder as the Hub has it at `sha`? (Then snapshot_download fetches no body.)

    huggingface_hub records the commit and ETag of each file it downloads (local_dir/.cache/huggingface/
    download/NAME.metadata); a file from an older commit with the same ETag is kept after one HEAD.
    """
    path = model_dir / name
    if not path.is_file() or path.stat().st_size != remote.size:
        return False
    try:
        from huggingface_hub._local_folder import read_download_metadata

        meta = read_download_metadata(model_dir, name)
    except Exception:  # a private helper: if it moves or fails, trust the size
        return True
    if meta is None:  # copied in by hand: huggingface_hub hashes LFS files against their sha256 and keeps them
        return True
    return meta.commit_hash == sha or meta.etag.strip('"') == remote.etag


def _remove_orphan_partials(model_dir: Path) -> int:
    """Delete `.incomplete` files left by a killed pull (we hold the lock: no live download owns them)."""
    freed = 0
    folder = _hf_download_dir(model_dir)
    if folder.is_dir():
        for part in folder.rglob("*.incomplete"):
            with contextlib.suppress(OSError):
                size = part.stat().st_size
                part.unlink()
                freed += size
    return freed


def _write_marker(model_dir: Path, record: dict[str, Any]) -> None:
    write_json_atomic(model_dir / PULL_MARKER, record, indent=2)


def after_pull(name: str, model_dir: Path, record: dict[str, Any], quantize: bool = True) -> None:
    """The one place where work on a complete pulled checkpoint starts: requantize its experts into tiers.

    Runs on a folder that holds PULL_MARKER, still under the model's lock. An interrupted quantization
    leaves the download usable and no store that looks complete; `fate quantize` finishes it.
    """
    if not quantize:
        return
    import torch

    from fate_cli.engine.stores import quantize_model_for
    from fate_cli.registry import ResolvedModel
    from quant.store import QuantParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"requantizing experts into tiers on {device} (fate quantize)")
    result = quantize_model_for(ResolvedModel(name, model_dir, repo=record.get("repo")), QuantParams(device=device))
    state = "up to date" if result.up_to_date else f"built in {result.seconds:.0f} s"
    Console(highlight=False, soft_wrap=True).print(f"tier store {state}: {result.store_dir}")


@contextlib.contextmanager
def exit_on_interrupt(name: str) -> Iterator[None]:
    """Ctrl-C during a download ends the process at once.

    snapshot_download runs its downloads in a thread pool and, on KeyboardInterrupt, waits for the files in
    flight to finish (and a stalled one retries for up to a minute). Exiting right away is safe: partial
    files live under temporary names, the next pull removes them, and the kernel releases our lock.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        show_cursor = "\x1b[?25h" if sys.stderr.isatty() else ""  # rich hides it while the bar is live
        sys.stderr.write(f"{show_cursor}\ninterrupted; run `fate pull {name}` again to continue\n")
        sys.stderr.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _remote(repo: str, requested: str) -> tuple[str, dict[str, RemoteFile]]:
    """The commit sha `requested` points at, and the repo's files at that commit."""
    with hub_errors(repo, requested):
        from huggingface_hub import HfApi

        api = HfApi(endpoint=_endpoint())
        sha = api.model_info(repo, revision=requested, timeout=API_TIMEOUT).sha
        if not sha:
            raise NetworkError(f"{_endpoint()} did not name a commit for {repo}@{requested}; check HF_ENDPOINT")
        return sha, _tree(api, repo, sha)


def _up_to_date(model_dir: Path, record: dict[str, Any], sha: str) -> bool:
    files = record.get("files") or {}
    return record.get("revision") == sha and bool(files) and all(
        (model_dir / n).is_file() and (model_dir / n).stat().st_size == size for n, size in files.items()
    )


def _check_tree(repo: str, sha: str, tree: dict[str, RemoteFile]) -> list[str]:
    """Refuse a repo fate cannot run from its file list alone; return the small files to fetch first."""
    for required in REQUIRED_FILES:
        if required not in tree:
            raise BadModel(f"repo {repo} has no {required} at {sha[:12]}; fate needs it to run the model")
    if INDEX_FILE not in tree and SINGLE_WEIGHTS not in tree:
        raise BadModel(
            f"repo {repo} has no safetensors weights ({SINGLE_WEIGHTS} or {INDEX_FILE}); "
            "fate loads safetensors only, not .bin/.pt/consolidated checkpoints"
        )
    return [n for n in (*SMALL_FILES, INDEX_FILE) if n in tree]


def pull_command(name: str, revision: str | None, quantize: bool = True) -> None:
    repo, alias_family = alias_for_pull(name)
    with model_lock(repo, "pull"):
        with exit_on_interrupt(name):
            model_dir, record = _pull(name, repo, alias_family, revision or "main")
        after_pull(name, model_dir, record, quantize)  # the one call site for what follows a pull


def _pull(name: str, repo: str, alias_family: str | None, requested: str) -> tuple[Path, dict[str, Any]]:
    """Bring $FATE_HOME/models/org--name to `requested`; return the folder and its PULL_MARKER record."""
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    model_dir = repo_dir(repo)
    sha, tree = _remote(repo, requested)
    old = pull_record(model_dir) if is_complete(model_dir) else {}
    if _up_to_date(model_dir, old, sha):
        size = human_size(sum(old["files"].values()))
        out.print(f"{repo} @ {sha[:12]} is up to date ({len(old['files'])} files, {size}) in {model_dir}")
        return model_dir, old
    small = _check_tree(repo, sha, tree)

    # 1. The small files, to check the model before anything large is fetched. While the folder holds a
    #    complete older revision they go to a staging folder, so a rejected update leaves it intact; a
    #    folder this pull created is removed again if the model is rejected.
    updating = bool(old)
    created = not model_dir.exists()
    meta_dir = _staging_dir(repo) if updating else model_dir
    small_before = set() if updating else {n for n in small if _is_done(model_dir, n, tree[n], sha)}
    try:
        with hub_errors(repo, requested):
            _ensure_dir(meta_dir)
            _download(repo, sha, small, meta_dir, _SilentTqdm)
        config = _read_json(meta_dir / "config.json", f"{repo}'s config")
        family = _check_family(config, repo, alias_family, err)
        index = _read_json(meta_dir / INDEX_FILE, f"{repo}'s weight index") if INDEX_FILE in tree else None
        names = [*small, *_weight_files(repo, tree, index)]
    except BadModel:
        if created:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise
    finally:
        if updating:
            shutil.rmtree(meta_dir, ignore_errors=True)

    # 2. Sizes and disk space.
    files = {n: tree[n].size for n in names}
    total = sum(files.values())
    remaining = sum(tree[n].size for n in names if not _is_done(model_dir, n, tree[n], sha))
    fetched = remaining + sum(tree[n].size for n in small if n not in small_before and not updating)
    more = f" ({human_size(fetched)} to download)" if fetched < total else ""
    out.print(f"Pulling {repo} @ {sha[:12]}: {len(files)} files, {human_size(total)}{more}")
    free = shutil.disk_usage(models_dir()).free
    if remaining + DISK_HEADROOM > free:
        raise ResourceError(
            f"not enough disk space for {repo}: {human_size(remaining)} to download, {human_size(free)} "
            f"free under {models_dir()}; free some space or set FATE_HOME to a larger disk"
        )

    # 3. The old model stays usable until here. From now on files in the folder change, so the marker goes
    #    first: a half-updated folder reads as incomplete ("did not finish"), never as a mix of revisions.
    #    (Keeping the old revision usable through the whole download would need a second copy on disk.)
    if (model_dir / PULL_MARKER).exists():
        was = str(old.get("revision"))[:12]
        why = f"updating from {was}" if old.get("revision") != sha else "some files are missing or changed"
        out.print(f"{why.capitalize()}: the model reads as incomplete until this pull ends")
        (model_dir / PULL_MARKER).unlink()
    freed = _remove_orphan_partials(model_dir)
    if freed:
        err.print(f"[dim]removed {human_size(freed)} of partial downloads left by an interrupted pull[/dim]")
    with hub_errors(repo, requested):
        _ensure_dir(model_dir)
        if remaining:
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn())
            with Progress(*columns, console=err) as progress:
                task = progress.add_task(f"0/{len(names)} files", total=remaining)
                _download(repo, sha, names, model_dir, rich_tqdm(progress, task, len(names), remaining))
        else:  # nothing to fetch, but huggingface_hub still records the new commit per file (HEAD only)
            _download(repo, sha, names, model_dir, _SilentTqdm)

    # 4. Verify, drop what the previous revision had and this one does not, and mark complete (last).
    bad = [n for n in names if not _is_done(model_dir, n, tree[n], sha)]
    if bad:
        raise NetworkError(
            f"the pull of {repo} is incomplete ({len(bad)} files missing or of the wrong size, e.g. {bad[0]}); "
            f"run `fate pull {name}` again"
        )
    for stale in set(old.get("files") or {}) - set(files):
        (model_dir / stale).unlink(missing_ok=True)
    record = {
        "repo": repo,
        "revision": sha,
        "requested_revision": requested,
        "family": family,
        "files": files,
        "total_bytes": total,
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _write_marker(model_dir, record)
    if fetched:
        out.print(f"Pulled {repo} @ {sha[:12]} into {model_dir}")
    else:
        out.print(f"{repo} @ {sha[:12]} is up to date: every file was already here")
    return model_dir, record


# ---------------------------------------------------------------------------------------------- list


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, n)).st_size
    return total


def _family_of(path: Path) -> str:
    try:
        family = read_json_object(path / "config.json").get("model_type")
    except UnreadableJSON:
        return "?"
    return family if isinstance(family, str) else "?"


def _pulled_models() -> list[tuple[str, Path]]:
    """(repo id, folder) for every pulled folder under $FATE_HOME/models, complete or not."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir() or "--" not in path.name:
            continue
        repo = pull_record(path).get("repo") or path.name.replace("--", "/", 1)
        found.append((repo, path))
    return found


def _facts_cells(path: Path, name: str) -> tuple[str, str, str]:
    """(parameters, context, quantization) of a model folder; `?` where it cannot be read (an incomplete pull)."""
    from fate_cli.model_info import human_count, tier_bits, try_model_facts

    facts = try_model_facts(path, name)
    if facts is None:
        return "?", "?", "?"
    quant = facts.dtype.replace("bfloat16", "bf16").replace("float16", "fp16").replace("float32", "fp32")
    if facts.store is not None:
        quant += f" + {tier_bits(facts.store)} tiers"
    return human_count(facts.parameters), str(facts.args.max_position_embeddings), quant


def list_command() -> None:
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=max(out.width, 160))
    table = Table(box=None, pad_edge=False)
    columns = ("name", "repo", "family", "params", "context", "quantization", "size", "status")
    for column in columns:
        table.add_column(column, justify="right" if column in ("params", "context", "size") else "left",
                         no_wrap=column != "repo")
    by_repo = {a.repo: a.name for a in aliases().values() if a.repo}
    pulled = _pulled_models()
    for repo, path in pulled:
        status = "complete" if is_complete(path) else "incomplete"
        if holder := lock_holder(repo):
            status += f" ({holder[1]}, pid {holder[0]})"
        name = by_repo.get(repo, repo)
        table.add_row(name, repo, _family_of(path), *_facts_cells(path, name), human_size(_dir_size(path)), status)
    for alias in aliases().values():
        if alias.bundled:
            path = BUNDLED_ROOT / alias.bundled
            size = human_size(_dir_size(path)) if path.is_dir() else "-"
            table.add_row(alias.name, "(bundled)", alias.family, *_facts_cells(path, alias.name), size, "bundled")
    out.print(table)
    if not pulled:
        out.print("no models pulled yet; try `fate pull olmoe`")


# ------------------------------------------------------------------------------------------------ rm


def rm_command(name: str, yes: bool) -> None:
    table = aliases()
    if name in table:
        alias = table[name]
        if alias.bundled:
            raise UsageError(f"'{name}' is bundled with fate and cannot be removed; `fate rm {name} --tiers` deletes "
                             "its tier store")
        repo = alias.repo or ""
    elif looks_like_repo(name):
        repo = name
    else:
        raise unknown_alias(name)
    path = repo_dir(repo)
    if not path.is_dir():
        raise ModelNotFound(f"model '{name}' ({repo}) is not pulled; nothing to remove")
    size = human_size(_dir_size(path))
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"not removing {repo} without confirmation (stdin is not a terminal); pass --yes")
        import typer

        if not typer.confirm(f"Delete {repo} ({size}) from {path}?", default=False):
            Console(highlight=False, soft_wrap=True).print("nothing removed")
            return
    with model_lock(repo, "rm"):
        # One atomic rename takes the folder out of sight, so no half-deleted folder ever looks usable.
        trash = path.parent / f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            raise ModelNotFound(f"model '{name}' ({repo}) is not pulled; nothing to remove") from None
        except OSError as err:
            raise ResourceError(f"cannot remove {path} ({err.strerror}); check its permissions") from None
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(_staging_dir(repo), ignore_errors=True)
        for leftover in path.parent.glob(f".trash-{path.name}-*"):  # from an rm that was killed mid-way
            shutil.rmtree(leftover, ignore_errors=True)
    Console(highlight=False, soft_wrap=True).print(f"removed {repo} ({size})")
