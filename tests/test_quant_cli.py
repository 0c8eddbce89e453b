"""`fate quantize`, `fate verify`, `fate perplexity` as a user runs them (subprocesses, own FATE_HOME).

A real kill: `fate quantize` is SIGKILLed as soon as its first shard is in place; nothing may look
complete, `fate verify` says so, and a re-run keeps the finished shards and completes the store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fate_cli.engine.stores import default_store_dir, quantize_model
from quant.cpu_experts import KERNEL_MAX_TOKENS
from quant.store import QuantParams
from tests.helpers import assert_one_line_error, one_thread  # noqa: F401 - autouse fixture
from tests.tiny_models import make_tiny_model

SHARD_MB = 0.02


def _argv() -> list[str]:
    script = Path(sys.executable).with_name("fate")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fate_cli"]


def cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """`fate ARGS` in this process, through the same entry point (main) as the installed command."""
    from fate_cli.app import main

    argv, sys.argv = sys.argv, ["fate", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)




@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-cli")
    small = make_tiny_model(root / "small", "qwen3_moe", seed=7)
    larger = make_tiny_model(root / "larger", "qwen3_moe", seed=8, hidden_size=128, moe_intermediate_size=128,
                             num_experts=8, num_hidden_layers=4)
    return root, small, larger


def test_kill_quantize_halfway_then_rerun_completes(models, monkeypatch, capsys):
    root, _, model = models
    home = root / "home-kill"
    monkeypatch.setenv("FATE_HOME", str(home))
    store = default_store_dir(model, str(model))
    env = {**os.environ, "FATE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*_argv(), "quantize", str(model), "--shard-mb", str(SHARD_MB), "--device", "cpu"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    finished: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # kill once a finished shard is on record
            finished = list(json.loads((store / "progress.json").read_text())["shards"])
        except (OSError, ValueError, KeyError):
            finished = []
        if finished:
            break
        time.sleep(0.005)
    assert proc.poll() is None, ("quantize ended before it could be killed", proc.communicate())
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert not (store / "manifest.json").exists()
    assert (store / "progress.json").is_file()
    on_record = json.loads((store / "progress.json").read_text())["shards"]
    kept = {name: ((store / name).stat().st_ino, (store / name).stat().st_mtime_ns) for name in on_record}
    assert kept
    assert_one_line_error(cli(capsys, "verify", str(model)), 4, "incomplete", f"fate quantize {model}")

    params = QuantParams(max_shard_bytes=int(SHARD_MB * (1 << 20)))  # what the CLI asked for
    result = quantize_model(model, store, params)
    assert result.reused_shards >= len(kept) and result.written_shards > 0
    for name, (inode, mtime) in kept.items():
        st = (store / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == (inode, mtime), f"{name} was rewritten"
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] is True and not list(store.glob("*.tmp"))
    ok = cli(capsys, "verify", str(model))
    assert ok.returncode == 0 and ok.stdout.startswith("store OK: "), (ok.stdout, ok.stderr)


def test_quantize_verify_perplexity_and_a_corrupt_byte(models, monkeypatch, capsys):
    root, model, _ = models
    monkeypatch.setenv("FATE_HOME", str(root / "home-cli"))
    q = cli(capsys, "quantize", str(model), "--shard-mb", "0.004", "--device", "cpu")
    assert q.returncode == 0, q.stderr
    assert "hot INT4 g64 (layers 0-1), cold INT2 g32 (layers 0-1), dense bfloat16 (layer 0)" in q.stdout
    again = cli(capsys, "quantize", str(model), "--shard-mb", "0.004", "--device", "cpu")
    assert again.returncode == 0 and "up to date" in again.stdout
    ok = cli(capsys, "verify", str(model))
    assert ok.returncode == 0 and ok.stdout.startswith("store OK: "), ok.stderr
    assert_one_line_error(cli(capsys, "quantize", str(model), "--hot-bits", "5"), 2, "--hot-bits 5")

    ppl = cli(capsys, "perplexity", str(model), "--max-windows", "2", "--window", "64")
    assert ppl.returncode == 0, ppl.stderr
    rows = [line for line in ppl.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # the checkpoint's experts ("bf16" on the command line) are labelled with the dtype they ran at
    assert [row.split("|")[1].strip() for row in rows] == ["checkpoint (fp32)", "hot", "cold", "mixed"]
    values = {row.split("|")[1].strip(): float(row.split("|")[2]) for row in rows}
    assert abs(values["hot"] / values["checkpoint (fp32)"] - 1) < 0.05
    assert "2 of " in ppl.stdout and "--full for all" in ppl.stdout and "<!--" not in ppl.stdout
    backend = f"backend cpu fused dequant (numba) up to {KERNEL_MAX_TOKENS} tokens a call, cpu dequant+matmul above"
    assert backend in ppl.stderr

    store = default_store_dir(model, str(model))
    manifest = json.loads((store / "manifest.json").read_text())
    victim = store / manifest["tiers"]["hot"]["files"][-1]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01
    victim.write_bytes(bytes(data))
    verify = cli(capsys, "verify", str(model))
    assert_one_line_error(verify, 4, "damaged", victim.name, "sha256", f"fate quantize {model}")
    bad = cli(capsys, "perplexity", str(model), "--tiers", "hot", "--max-windows", "1")
    assert_one_line_error(bad, 4, "damaged", "sha256")
