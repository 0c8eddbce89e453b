"""`fate chat` in a real pseudo-terminal (pexpect) on CPU with the bundled model, and its KV reuse."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest
import torch

from fate_cli.chat import ChatSession
from fate_cli.engine.generate import SamplingParams
from fate_cli.engine.runtime import open_model
from tests.helpers import fate_in_process


@pytest.fixture(scope="module")
def home(private_fate_home):  # noqa: ANN001, ANN201 - the run's home (tests/conftest.py): tiny's store built once
    return private_fate_home


def spawn(home, *args: str) -> pexpect.spawn:
    env = dict(os.environ, FATE_HOME=str(home), TERM="xterm-256color", COLUMNS="120", LINES="40")
    child = pexpect.spawn(sys.executable, ["-m", "fate_cli", "chat", *args], env=env, encoding="utf-8",
                          dimensions=(40, 120), timeout=240)
    return child


def test_interactive_session(home):
    child = spawn(home, "--vram", "16MB", "-n", "24")
    child.expect("policy fate")
    child.expect(">>> ")
    child.sendline("What does hack mean?")
    for field in ("speed", "prefill", "decode", "experts", "hit", "this answer", "session", "prediction recall",
                  "memory", "host tier", "layers"):
        child.expect(field)
    child.expect(">>> ")
    child.sendline("/set max_tokens 2000")
    child.expect("max_tokens = 2000")
    child.expect(">>> ")
    child.sendline("Tell me a long story about hackers.")
    child.expect("decode")  # the panel is up: the answer is streaming
    child.sendcontrol("c")
    child.expect("stopped")
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendline("/set temperature 0")
    child.expect("temperature = 0.0")
    child.sendline("/set temperature warm")
    child.expect("needs a number")
    child.sendline("/set max_tokens 16")
    child.expect(">>> ")
    child.sendline("And what is a computer?")
    child.expect("decode")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"hit rate [\d.]+% \(\d+ hits, \d+ misses\)")
    child.sendline("/help")
    child.expect("/system TEXT")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_d_leaves(home):
    child = spawn(home, "--no-panel", "-n", "8")
    child.expect(">>> ")
    child.sendline("hello")
    child.expect(">>> ")
    assert "speed" not in child.before  # --no-panel: plain streamed text
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_stdin_prints_the_answer_without_escape_codes(home):
    result = fate_in_process("chat", "-n", "12", "--vram", "16MB", "--temperature", "0", home=home,
                             stdin="What does hack mean?\n\nIn one line.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "\x1b" not in result.stdout
    assert "policy fate" in result.stderr
    turns = fate_in_process("chat", "-n", "12", "--vram", "16MB", "--temperature", "0", "--lines", home=home,
                            stdin="What does hack mean?\n\nIn one line.\n")
    assert turns.returncode == 0, turns.stderr
    first = fate_in_process("chat", "-n", "12", "--vram", "16MB", "--temperature", "0", home=home,
                            stdin="What does hack mean?")
    assert turns.stdout.startswith(first.stdout)  # the first line is a turn of its own
    assert len(turns.stdout) > len(first.stdout)  # and the next line another, answered after it


def test_kv_cache_reuse_gives_the_same_answer_as_a_fresh_prefill(home, monkeypatch):
    monkeypatch.setenv("FATE_HOME", str(home))
    torch.set_num_threads(1)
    runtime = open_model("tiny", "cpu", None, "fate", "16MB", transfer_bits=4)
    greedy = SamplingParams(temperature=0.0)
    session = ChatSession(runtime, "You are terse.", greedy, 12)
    session.ask("What does hack mean?", lambda t: None)
    second, stats = session.ask("And a computer?", lambda t: None)
    whole = len(runtime.tokenizer.encode_chat(session.messages()[:-1]))
    assert stats.prompt_tokens < whole / 2  # only the new turn was prefilled

    fresh = ChatSession(runtime, "You are terse.", greedy, 12)
    fresh.history = session.history[:2]
    again, fresh_stats = fresh.ask("And a computer?", lambda t: None)
    assert fresh_stats.prompt_tokens == whole and again == second


def test_context_overflow_drops_the_oldest_turns(home, monkeypatch):
    monkeypatch.setenv("FATE_HOME", str(home))
    runtime = open_model("tiny", "cpu", None)
    session = ChatSession(runtime, None, SamplingParams(temperature=0.0), 8)
    session.context = 160
    for i in range(6):
        session.ask(f"Question number {i} about hacking and computers and networks?", lambda t: None)
    assert any("dropped the oldest turn" in n for n in session.notes)
    assert len(runtime.tokenizer.encode_chat(session.messages())) < 160
    assert session.history[0].role == "user" and "number 0" not in session.history[0].content
