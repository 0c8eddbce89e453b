"""The tier store, damaged or interrupted: `fate verify` and `fate run` agree on every manifest, `fate quantize`
repairs whatever either rejects, and a failed or interrupted write leaves the old complete file or nothing."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quant.files
import quant.store
from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.runtime import open_model
from fate_cli.engine.stores import default_store_dir, quantize_model
from fate_cli.errors import EXIT_BAD_MODEL, EXIT_BUSY, FateError
from fate_cli.quantize import verify_command
from fate_cli.registry import resolve
from quant.store import MANIFEST, QuantParams, store_lock
from tests.helpers import one_thread  # noqa: F401 - autouse fixture

PARAMS = QuantParams(method="minmax")  # the store's bytes do not matter here, only how they are kept
OLD_PARAMS = QuantParams(method="minmax", cold_bits=3)  # a complete store a rebuild replaces file by file
VRAM = "16MB"  # the bundled model offloads its experts from the store at this budget


def _store(home: Path) -> Path:
    os.environ["FATE_HOME"] = str(home)
    tiny = resolve("tiny").path
    return default_store_dir(tiny, "tiny")


def _build(home: Path, params: QuantParams) -> Path:
    store = _store(home)
    quantize_model(resolve("tiny").path, store, params)
    return store


def _run_tokens() -> list[int]:
    rt = open_model("tiny", "cpu", None, "fate", VRAM)
    assert rt.offload is not None  # the experts come from the store
    return generate(rt.model, [1, 2, 3, 4], 4, Sampler(SamplingParams(), rt.loaded.device), graphs=rt.graphs).token_ids


def outcome(action) -> tuple[int, object]:  # noqa: ANN001
    """(0, result), or (exit status, message) of the FateError; anything else fails the test."""
    try:
        return 0, action()
    except FateError as err:
        text = str(err)
        assert "\n" not in text and "; " in text, text
        return err.exit_code, text


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """A clean store, an older complete one (other parameters), and the clean store's answer."""
    saved = os.environ.get("FATE_HOME")
    root = tmp_path_factory.mktemp("stores")
    counter = _Disk(None, None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant.store, "open", counter.open, raising=False)
        mp.setattr(quant.files, "open", counter.open, raising=False)
        clean = _build(root / "clean", PARAMS)
    old = _build(root / "old", OLD_PARAMS)
    os.environ["FATE_HOME"] = str(root / "clean")
    tokens = _run_tokens()
    yield {"clean": clean, "old": old, "tokens": tokens, "writes": counter.writes,
           "manifest": json.loads((clean / MANIFEST).read_text())}
    if saved is None:
        os.environ.pop("FATE_HOME", None)
    else:
        os.environ["FATE_HOME"] = saved


def _fresh_home(tmp: Path, template: Path | None) -> Path:
    home = tmp / f"home-{len(list(tmp.iterdir()))}"
    store = _store(home)
    if template is not None:
        shutil.copytree(template, store)
    return store


def _assert_repaired(store: Path, templates: dict) -> None:
    result = quantize_model(resolve("tiny").path, store, PARAMS)
    assert not result.up_to_date or result.manifest["files"] == templates["manifest"]["files"]
    assert outcome(lambda: verify_command("tiny"))[0] == 0
    assert outcome(_run_tokens) == (0, templates["tokens"])
    assert json.loads((store / MANIFEST).read_text())["files"] == templates["manifest"]["files"]


# ------------------------------------------------------------------------------------------ named cases


def test_wrong_expert_hashes_are_caught_by_verify_and_repaired_by_quantize(templates, tmp_path):
    store = _fresh_home(tmp_path, templates["clean"])
    m = json.loads((store / MANIFEST).read_text())
    for rec in m["experts"].values():  # every expert's hash wrong, every file's hash right
        rec["sha256"] = hashlib.sha256(rec["sha256"].encode()).hexdigest()
    (store / MANIFEST).write_text(json.dumps(m))
    code, text = outcome(lambda: verify_command("tiny"))
    assert code == EXIT_BAD_MODEL and "does not match its sha256" in text
    assert outcome(_run_tokens)[0] == EXIT_BAD_MODEL
    _assert_repaired(store, templates)


def test_unknown_params_field_is_caught_by_verify_and_run_and_repaired(templates, tmp_path):
    store = _fresh_home(tmp_path, templates["clean"])
    m = json.loads((store / MANIFEST).read_text())
    m["params"]["colour"] = "blue"
    (store / MANIFEST).write_text(json.dumps(m))
    code, text = outcome(lambda: verify_command("tiny"))
    assert code == EXIT_BAD_MODEL and "colour" in text and "fate quantize tiny" in text
    assert outcome(_run_tokens)[0] == EXIT_BAD_MODEL
    _assert_repaired(store, templates)


def test_a_store_being_built_is_busy_not_damaged(templates, tmp_path):
    store = _fresh_home(tmp_path, templates["clean"])
    (store / MANIFEST).unlink()  # what a rebuild does first
    with store_lock(store):
        assert outcome(lambda: verify_command("tiny"))[0] == EXIT_BUSY
        assert outcome(_run_tokens)[0] == EXIT_BUSY
    code, text = outcome(lambda: verify_command("tiny"))  # the lock released: an interrupted build
    assert code == EXIT_BAD_MODEL and "incomplete" in text


# ------------------------------------------------------------------------------------------ manifest fuzz


def _leaves(value, path=()):  # noqa: ANN001, ANN202
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value:
        for n, item in enumerate(value):
            yield from _leaves(item, (*path, n))
    else:
        yield path


WRONG = [None, [], {}, "x", "../../escape", -1, 0, 1, 2**31, 2**70, 1.5, True, "0" * 64]


@settings(max_examples=45, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_verify_agrees_with_run_on_any_manifest_field(templates, tmp_path, data):
    store = _fresh_home(tmp_path, templates["clean"])
    m = json.loads((store / MANIFEST).read_text())
    paths = sorted(_leaves(m), key=repr)
    for _ in range(data.draw(st.integers(1, 2))):
        path = data.draw(st.sampled_from(paths))
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            parent.pop(path[-1])
        else:
            parent[path[-1]] = data.draw(st.sampled_from(WRONG))
        paths = sorted(_leaves(m), key=repr)
    (store / MANIFEST).write_text(json.dumps(m))
    verified = outcome(lambda: verify_command("tiny"))[0]
    ran = outcome(_run_tokens)
    if verified == 0:  # what verify passes, run runs, with the clean store's answer
        assert ran == (0, templates["tokens"])
    if ran[0] == EXIT_BAD_MODEL:  # what run calls damaged, verify does too
        assert verified != 0
    _assert_repaired(store, templates)


# ------------------------------------------------------------------------------------------ interrupted writes


class _Disk:
    """The store's writes (quant.store, quant.files) through a disk that fills after `room` bytes, or a Ctrl-C at
    the n-th write."""

    def __init__(self, room: int | None, interrupt_at: int | None):
        self.room, self.interrupt_at, self.writes, self.full = room, interrupt_at, 0, False

    def open(self, file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        f = builtins.open(file, mode, *args, **kwargs)
        return _File(f, self) if "w" in mode else f

    def spend(self, n: int) -> None:
        self.writes += 1
        if self.interrupt_at is not None and self.writes == self.interrupt_at:
            raise KeyboardInterrupt
        if self.room is not None:
            if self.full or n > self.room:
                self.full = True
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= n


class _File:
    def __init__(self, f, disk: _Disk):  # noqa: ANN001
        self.f, self.disk = f, disk

    def write(self, data) -> int:  # noqa: ANN001
        n = data.nbytes if isinstance(data, memoryview) else len(data.encode() if isinstance(data, str) else data)
        self.disk.spend(n)
        return self.f.write(data)

    def flush(self) -> None:
        if self.disk.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
        if self.disk.full:  # closing flushes: on a full disk it fails again
            raise OSError(errno.ENOSPC, "No space left on device")

    def fileno(self) -> int:
        return self.f.fileno()

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(start=st.sampled_from(["empty", "old"]), fault=st.sampled_from(["disk full", "ctrl-c"]),
       permille=st.integers(0, 1000))
def test_a_failed_write_leaves_the_old_file_or_nothing_and_the_next_run_repairs_it(templates, tmp_path, start,
                                                                                    fault, permille):
    store = _fresh_home(tmp_path, templates["old"] if start == "old" else None)
    total = sum(r["size"] for r in templates["manifest"]["files"].values())
    at = permille / 1000
    disk = _Disk(int(at * total), None) if fault == "disk full" else _Disk(None, 1 + int(at * templates["writes"]))
    old = json.loads((templates["old"] / MANIFEST).read_text()) if start == "old" else {"files": {}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant.store, "open", disk.open, raising=False)  # the shards
        mp.setattr(quant.files, "open", disk.open, raising=False)  # the journal and the manifest
        try:
            quantize_model(resolve("tiny").path, store, PARAMS)
            finished = True
        except (OSError, KeyboardInterrupt):
            finished = False
    assert not list(store.glob("*.tmp")), "a partial file was left behind"
    known = {r["sha256"] for m in (old, templates["manifest"]) for r in m["files"].values()}
    for shard in store.glob("*.safetensors"):  # every shard is some build's complete file
        assert _sha(shard) in known, shard.name
    for name in (MANIFEST, "progress.json"):  # each JSON file is whole, or absent
        if (store / name).exists():
            json.loads((store / name).read_text())
    if (store / MANIFEST).exists():  # a manifest never describes a partial store
        assert outcome(lambda: verify_command("tiny"))[0] == 0
    assert finished or not (store / MANIFEST).exists()
    _assert_repaired(store, templates)
