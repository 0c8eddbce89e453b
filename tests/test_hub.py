"""`fate pull / list / rm` against a real loopback Hub: an HTTP server in a thread that answers the
endpoints huggingface_hub 2.4 calls (revision info, recursive tree, HEAD/GET resolve with ETag,
X-Repo-Commit, Range, X-Error-Code), counts requests per path, and can stall a file halfway.
`fate` runs as a subprocess (huggingface_hub reads HF_ENDPOINT at import) with FATE_HOME and HF_HOME
in a temporary folder.

Time: importing transformers to build the tiny qwen3_moe takes ~10 s, so it builds in a thread while
the first two tests (which need no runnable model: a synthetic repo of random safetensors shards) run
their subprocesses; independent subprocesses run side by side. About 30-35 s on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from fate_cli.errors import ResourceError
from tests.helpers import assert_one_line_error
from tests.tiny_models import make_tiny_model

REPO = "org/tiny"
SHARDED_TO = 2
DECOYS = {  # files a real repo has that a pull must never fetch
    "pytorch_model.bin": b"\x80\x02pickle" * 64,
    "consolidated.safetensors": b"not for us" * 64,
    "original/consolidated.00.pth": b"\x80\x02pickle" * 64,
    "README.md": b"# tiny\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
}
LFS_SUFFIXES = (".safetensors", ".bin", ".pth")
SYNTH = "org/synthetic"  # random safetensors shards under a qwen3_moe config: pullable, not runnable


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def hub_sha(repo: str) -> str:
    """The commit FakeHub gives a repo added without an explicit sha."""
    return _sha(repo)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _synthetic_repo() -> dict[str, bytes]:
    """Files of a repo that passes every check of a pull (supported model_type, tokenizer, an index and the
    safetensors shards it lists) without transformers: ready at once, while the real tiny model builds."""
    import numpy as np
    from safetensors.numpy import save

    from tests.tiny_models import train_tokenizer

    rng = np.random.default_rng(0)
    shards = {
        "model-00001-of-00002.safetensors": {"model.embed_tokens.weight": rng.standard_normal((128, 64))},
        "model-00002-of-00002.safetensors": {"model.layers.0.mlp.experts.0.up_proj.weight":
                                             rng.standard_normal((512, 512))},  # 1 MiB: the one to stall
    }
    files = {name: save({k: v.astype(np.float32) for k, v in tensors.items()}) for name, tensors in shards.items()}
    weight_map = {tensor: name for name, tensors in shards.items() for tensor in tensors}
    index = {"metadata": {"total_size": sum(map(len, files.values()))}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files["config.json"] = json.dumps({"model_type": "qwen3_moe", "vocab_size": 128}).encode()
    files["tokenizer.json"] = train_tokenizer().to_str().encode()
    return files


# ---------------------------------------------------------------------------------------- fake Hub


class FakeHub:
    """Repos in memory: repo id -> {"sha", "files": {path: bytes}, "gated"}; counts requests per path."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.counts: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()
        self.stall: tuple[str, str] | None = None  # (repo, path) whose GET stops halfway
        self.stalled = threading.Event()  # set once the stalled GET has sent half of its body
        self.release = threading.Event()  # lets the stalled GET finish
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def add(self, repo: str, files: dict[str, bytes], gated: bool = False, sha: str | None = None) -> None:
        self.repos[repo] = {"sha": sha or _sha(repo), "files": dict(files), "gated": gated}

    def gets(self, repo: str, path: str) -> int:
        return self.counts["GET", f"/{repo}/resolve/{self.repos[repo]['sha']}/{path}"]

    def stall_on(self, repo: str, path: str) -> None:
        self.stalled.clear()
        self.release.clear()
        self.stall = (repo, path)

    def unstall(self) -> None:
        self.stall = None
        self.release.set()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message,
                                  "Content-Type": "application/json"})

    def _repo(self, org: str, name: str, rev: str):
        repo = self.hub.repos.get(f"{org}/{name}")
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif repo["gated"]:
            self._error(403, "GatedRepo", "Access to this model is restricted")
        elif rev not in ("main", repo["sha"]):
            self._error(404, "RevisionNotFound", "Invalid rev id")
        else:
            return repo
        return None

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub.lock:
            self.hub.counts[self.command, path] += 1
        parts = path.strip("/").split("/")
        try:
            if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
                return self._model_info(*parts[2:4], parts[5])
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                return self._tree(*parts[2:4], parts[5])
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(parts[0], parts[1], parts[3], "/".join(parts[4:]))
            self._error(404, "NotFound", "no such endpoint")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed mid-response

    def _model_info(self, org: str, name: str, rev: str) -> None:
        repo = self._repo(org, name, rev)
        if repo is not None:
            self._json({"id": f"{org}/{name}", "modelId": f"{org}/{name}", "sha": repo["sha"], "private": False,
                        "gated": False, "siblings": [{"rfilename": p} for p in repo["files"]]})

    def _tree(self, org: str, name: str, rev: str) -> None:
        repo = self._repo(org, name, rev)
        if repo is None:
            return
        entries = []
        for p, data in repo["files"].items():
            entry = {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": p}
            if p.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(entries)

    def _resolve(self, org: str, name: str, rev: str, file: str) -> None:
        repo = self._repo(org, name, rev)
        if repo is None:
            return
        if file not in repo["files"]:
            self._error(404, "EntryNotFound", "Entry not found")
            return
        data = repo["files"][file]
        etag = hashlib.sha256(data).hexdigest() if file.endswith(LFS_SUFFIXES) else _git_blob_id(data)
        headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start = 0
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and self.command == "GET":
            start = int(range_header[6:].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        status = 206 if start else 200
        hub = self.hub
        if self.command == "GET" and hub.stall == (f"{org}/{name}", file):
            body = data[start:]
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            hub.stalled.set()
            hub.release.wait(timeout=60)
            self.wfile.write(body[len(body) // 2 :])
            return
        self._send(status, data[start:], headers)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source_build(request, tmp_path_factory):
    """Start building the tiny model in a thread: importing transformers takes ~10 s, and the tests that
    need no model (the first two in this file) run their subprocesses meanwhile."""
    folder = tmp_path_factory.mktemp("src")
    box: dict = {}
    if not any("source" in item.fixturenames for item in request.session.items):
        return None, box  # no selected test needs the model

    def build() -> None:
        try:
            box["folder"] = make_tiny_model(folder, family="qwen3_moe", shards=SHARDED_TO)
        except BaseException as err:  # re-raised by the `source` fixture
            box["error"] = err

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    return thread, box


@pytest.fixture(scope="module")
def hub(source_build):
    """The loopback Hub, with the repos that need no model; `source` adds org/tiny."""
    hub = FakeHub()
    tokenizer = b'{"version": "1.0"}'
    config = json.dumps({"model_type": "qwen3_moe", "hidden_size": 32}).encode()
    hub.add("org/llama", {"config.json": json.dumps({"model_type": "llama"}).encode(),
                          "tokenizer.json": tokenizer, "model.safetensors": b"\0" * 4096})
    hub.add("org/binonly", {"config.json": config, "tokenizer.json": tokenizer,
                            "pytorch_model.bin": DECOYS["pytorch_model.bin"]})
    hub.add("org/gated", {"config.json": config, "tokenizer.json": tokenizer}, gated=True)
    hub.add(SYNTH, {**_synthetic_repo(), **DECOYS})
    hub.thread.start()
    yield hub
    hub.unstall()
    hub.server.shutdown()
    hub.server.server_close()


@pytest.fixture(scope="module")
def source(source_build, hub) -> dict[str, bytes]:
    """The tiny model's files (qwen3_moe, sharded, ChatML tokenizer), served as org/tiny with decoys."""
    thread, box = source_build
    thread.join()
    if "error" in box:
        raise box["error"]
    files = {p.name: p.read_bytes() for p in sorted(box["folder"].iterdir()) if p.is_file()}
    hub.add(REPO, {**files, **DECOYS})
    return files


def _fate_argv() -> list[str]:
    script = Path(sys.executable).with_name("fate")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fate_cli"]


def _env(home: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=endpoint,
        FATE_HOME=str(home),
        HF_HOME=str(home / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_ETAG_TIMEOUT="3",
        HF_HUB_DOWNLOAD_TIMEOUT="20",
        NO_PROXY="127.0.0.1,localhost",
        COLUMNS="200",
    )
    return env


def _start(home: Path, endpoint: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*_fate_argv(), *args], env=_env(home, endpoint), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def fate(home: Path, endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return _finish(_start(home, endpoint, *args))


def _model_dir(home: Path, repo: str = REPO) -> Path:
    return home / "models" / repo.replace("/", "--")


def _expected_files(files: dict[str, bytes]) -> dict[str, int]:
    """What a pull must fetch of a sharded repo: the small files it has, the index and its shards."""
    index = json.loads(files["model.safetensors.index.json"])
    small = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja", "special_tokens_map.json", "model.safetensors.index.json"}
    wanted = (small & set(files)) | set(index["weight_map"].values())
    return {name: len(files[name]) for name in sorted(wanted)}


def _biggest_shard(source: dict[str, bytes]) -> str:
    return max((n for n in source if n.endswith(".safetensors")), key=lambda n: len(source[n]))



def _rm_sequence(home: Path, endpoint: str) -> dict:
    """rm without --yes (refused), rm --yes, then list, rm again and rm of a bundled model."""
    steps = {"refused": fate(home, endpoint, "rm", REPO), "kept": _model_dir(home).is_dir()}
    steps["rm"] = fate(home, endpoint, "rm", REPO, "--yes")
    steps["gone"] = not _model_dir(home).exists()
    steps["trash"] = [p.name for p in (home / "models").iterdir() if p.name.startswith(".trash")]
    procs = {k: _start(home, endpoint, *args) for k, args in
             {"list": ["list"], "again": ["rm", REPO, "--yes"], "bundled": ["rm", "tiny", "--yes"]}.items()}
    return steps | {k: _finish(p) for k, p in procs.items()}


@pytest.fixture(scope="module")
def pulled(hub, source, tmp_path_factory) -> dict:
    """A fresh `fate pull org/tiny` into its own FATE_HOME; then, side by side (they do not touch each
    other's files): `fate list`, `fate run` on it, a second pull, and an rm sequence on a copy."""
    home = tmp_path_factory.mktemp("home")
    results: dict = {"home": home, "pull": fate(home, hub.url, "pull", REPO)}
    if results["pull"].returncode != 0:
        return results
    before = Counter(hub.counts)
    copy = tmp_path_factory.mktemp("copy")
    shutil.copytree(home / "models", copy / "models")
    rm_thread = threading.Thread(target=lambda: results.update(rm=_rm_sequence(copy, hub.url)))
    procs = {
        "list": _start(home, hub.url, "list"),
        "run": _start(home, hub.url, "run", REPO, "hello", "-n", "5", "--raw", "--json"),
        "again": _start(home, hub.url, "pull", REPO),
    }
    rm_thread.start()
    results |= {name: _finish(proc) for name, proc in procs.items()}
    rm_thread.join()
    results["again_requests"] = {k: v - before[k] for k, v in hub.counts.items() if v != before[k]}
    return results


# ------------------------------------------------------------------------------------------------- tests


def test_errors_are_one_line_with_their_exit_status(hub, tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cases = {  # name: (FATE_HOME, endpoint, args, exit status, words of the message)
        "alias": (tmp_path / "a", hub.url, ["pull", "mixtrl"], 3, ["did you mean", "mixtral"]),
        "unreachable": (tmp_path / "b", dead, ["pull", REPO], 5,
                        [f"cannot reach the Hugging Face Hub at {dead}", "HF_ENDPOINT"]),
        "family": (tmp_path / "c", hub.url, ["pull", "org/llama"], 4,
                   ["'llama'", "supported families: gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_5_moe, "
                    "qwen3_5_moe_text, qwen3_moe"]),
        "no-safetensors": (tmp_path / "d", hub.url, ["pull", "org/binonly"], 4, ["no safetensors weights"]),
        "gated": (tmp_path / "e", hub.url, ["pull", "org/gated"], 5, ["org/gated is gated", "HF_TOKEN"]),
        "no-repo": (tmp_path / "f", hub.url, ["pull", "org/missing"], 3, ["repo org/missing not found on the Hub"]),
        "no-revision": (tmp_path / "g", hub.url, ["pull", "org/llama", "--revision", "v9"], 3,
                        ["revision v9 not found"]),
        "unwritable": (not_a_dir / "home", hub.url, ["pull", REPO], 6, [str(not_a_dir), "set FATE_HOME"]),
        "bundled": (tmp_path / "h", hub.url, ["pull", "tiny"], 2, ["bundled"]),
    }
    procs = {name: _start(home, url, *args) for name, (home, url, args, _, _) in cases.items()}
    for name, proc in procs.items():
        _, _, _, code, needles = cases[name]
        assert_one_line_error(_finish(proc), code, *needles)
    assert hub.gets("org/llama", "model.safetensors") == 0  # rejected before the weights
    assert hub.gets("org/llama", "config.json") == 1
    assert not (tmp_path / "c" / "models" / "org--llama" / "model.safetensors").exists()


def test_killed_pull_is_not_taken_for_complete_and_a_new_pull_holds_the_lock(hub, tmp_path):
    """(a) SIGKILL a pull while a shard is half sent; (b) a new pull, stalled on the same shard, holds the
    lock: a concurrent pull and rm get Busy, `fate run` refuses the half-pulled model; (c) released, it
    completes with every file identical to the source. (A synthetic repo: no model is run here.)"""
    source = hub.repos[SYNTH]["files"]
    sha = hub.repos[SYNTH]["sha"]
    shard = _biggest_shard(source)
    folder = _model_dir(tmp_path, SYNTH)
    config_gets = hub.gets(SYNTH, "config.json")
    hub.stall_on(SYNTH, shard)
    try:
        killed = _start(tmp_path, hub.url, "pull", SYNTH, "--no-quantize")
        assert hub.stalled.wait(timeout=30), "the pull never reached the weights"
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=30)
        assert not (folder / ".fate-pull.json").exists()
        partial = folder / shard
        assert not partial.exists() or partial.stat().st_size != len(source[shard])
        orphans = list((folder / ".cache" / "huggingface" / "download").rglob("*.incomplete"))
        assert orphans, "huggingface_hub should stream into a temporary .incomplete file"

        hub.stall_on(SYNTH, shard)  # the next pull stops at the same place, so no marker can appear yet
        first = _start(tmp_path, hub.url, "pull", SYNTH, "--no-quantize")
        refused = _start(tmp_path, hub.url, "run", SYNTH, "hello", "-n", "2", "--raw")
        assert hub.stalled.wait(timeout=30), "the new pull never reached the weights"
        second = _start(tmp_path, hub.url, "pull", SYNTH, "--no-quantize")
        remove = _start(tmp_path, hub.url, "rm", SYNTH, "--yes")
        listing = _start(tmp_path, hub.url, "list")
        assert_one_line_error(_finish(second), 7, f"another fate process is pulling {SYNTH} (pid {first.pid})")
        assert_one_line_error(_finish(remove), 7, f"(pid {first.pid})")
        assert_one_line_error(_finish(refused), 3, "did not finish")
        row = next(line for line in _finish(listing).stdout.splitlines() if SYNTH in line)
        assert f"incomplete (pulling, pid {first.pid})" in row
        assert not any(o.exists() for o in orphans)  # the killed pull's orphans are cleaned up
    finally:
        hub.unstall()
    done = _finish(first)
    assert done.returncode == 0, done.stderr
    assert (folder / ".fate-pull.json").is_file()
    for name in _expected_files(source):
        assert (folder / name).read_bytes() == source[name], name
    assert not list(folder.rglob("*.incomplete"))
    assert hub.gets(SYNTH, "config.json") == config_gets + 1  # complete files are not fetched again
    assert hub.counts["GET", f"/{SYNTH}/resolve/{sha}/{shard}"] >= 2


def test_fresh_pull_downloads_the_needed_files_and_the_model_runs(pulled, hub, source):
    home, result = pulled["home"], pulled["pull"]
    assert result.returncode == 0, result.stderr
    sha = hub.repos[REPO]["sha"]
    expected = _expected_files(source)
    assert len([n for n in expected if n.endswith(".safetensors")]) >= SHARDED_TO
    assert f"Pulling {REPO} @ {sha[:12]}: {len(expected)} files" in result.stdout

    folder = _model_dir(home)
    record = json.loads((folder / ".fate-pull.json").read_text())
    assert record["repo"] == REPO and record["revision"] == sha and record["requested_revision"] == "main"
    assert record["files"] == expected and record["total_bytes"] == sum(expected.values())
    for name in expected:
        assert (folder / name).read_bytes() == source[name], name
    manifest = json.loads((folder / "fate-tiers" / "manifest.json").read_text())  # pull ran `fate quantize`
    assert manifest["complete"] is True and set(manifest["tiers"]) >= {"hot", "cold"}
    assert "tier store built" in result.stdout
    for decoy in DECOYS:  # never fetched, not even a HEAD
        assert not (folder / decoy).exists()
        assert hub.counts["GET", f"/{REPO}/resolve/{sha}/{decoy}"] == 0
        assert hub.counts["HEAD", f"/{REPO}/resolve/{sha}/{decoy}"] == 0

    listing = pulled["list"]
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if REPO in line)
    assert "qwen3_moe" in row and "complete" in row
    assert "bundled" in listing.stdout  # the models shipped with fate are listed too
    run = pulled["run"]
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert 1 <= len(answer["token_ids"]) <= 5 and answer["prompt_token_ids"]


def test_second_pull_is_up_to_date_and_fetches_no_file(pulled):
    assert pulled["pull"].returncode == 0
    again = pulled["again"]
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
    files = {path: n for (_, path), n in pulled["again_requests"].items() if "/resolve/" in path}
    assert not files, files  # no file body, not even a HEAD; only the revision and tree look-ups
    assert set(pulled["again_requests"]) == {
        ("GET", f"/api/models/{REPO}/revision/main"),
        ("GET", f"/api/models/{REPO}/tree/{hub_sha(REPO)}"),
    }


def test_rm_removes_the_model_and_list_forgets_it(pulled):
    assert pulled["pull"].returncode == 0
    steps = pulled["rm"]
    assert_one_line_error(steps["refused"], 2, "--yes")  # stdin is not a terminal
    assert steps["kept"]
    assert steps["rm"].returncode == 0, steps["rm"].stderr
    assert f"removed {REPO}" in steps["rm"].stdout
    assert steps["gone"] and not steps["trash"]
    assert steps["list"].returncode == 0 and REPO not in steps["list"].stdout
    assert "no models pulled yet" in steps["list"].stdout
    assert_one_line_error(steps["again"], 3, "not pulled")
    assert_one_line_error(steps["bundled"], 2, "bundled")


@pytest.mark.filterwarnings("ignore:Not enough free disk space")
def test_pull_refuses_when_the_disk_is_too_small(hub, source, tmp_path, monkeypatch):
    """In-process (pull_command passes HF_ENDPOINT on): nothing large lands on a disk that is too full."""
    from fate_cli import hub as fate_hub

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("FATE_HOME", str(tmp_path))
    real = shutil.disk_usage
    monkeypatch.setattr(fate_hub.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(ResourceError, match="not enough disk space"):
        fate_hub.pull_command(REPO, None)
    folder = _model_dir(tmp_path)
    assert not (folder / ".fate-pull.json").exists()
    assert not list(folder.glob("*.safetensors"))


def test_update_to_a_new_revision_keeps_the_old_model_until_it_is_replaced(hub, source, tmp_path, monkeypatch):
    """A new commit: an unsupported one leaves the old model usable; a good one is pulled over it,
    fetching only the files whose content changed."""
    from fate_cli import hub as fate_hub
    from fate_cli.registry import is_complete, pull_record

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("FATE_HOME", str(tmp_path))
    hub.add("org/moving", source, sha=_sha("v1"))
    fate_hub.pull_command("org/moving", None)
    folder = _model_dir(tmp_path, "org/moving")
    assert pull_record(folder)["revision"] == _sha("v1")

    bad = json.loads(source["config.json"]) | {"model_type": "gpt2"}
    hub.add("org/moving", {**source, "config.json": json.dumps(bad).encode()}, sha=_sha("v2"))
    with pytest.raises(fate_hub.BadModel, match="supported families"):
        fate_hub.pull_command("org/moving", None)
    assert is_complete(folder) and pull_record(folder)["revision"] == _sha("v1")  # still usable
    assert not (tmp_path / "models" / ".staging" / "org--moving").exists()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3_moe"

    good = json.loads(source["config.json"]) | {"rms_norm_eps": 1e-5}
    hub.add("org/moving", {**source, "config.json": json.dumps(good).encode()}, sha=_sha("v3"))
    fate_hub.pull_command("org/moving", None)
    assert pull_record(folder)["revision"] == _sha("v3")
    assert json.loads((folder / "config.json").read_text())["rms_norm_eps"] == 1e-5
    shard = _biggest_shard(source)
    assert hub.counts["GET", f"/org/moving/resolve/{_sha('v3')}/{shard}"] == 0  # same etag: kept
    assert (folder / shard).read_bytes() == source[shard]
