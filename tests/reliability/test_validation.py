"""The validation layer: user numbers, generation configs, configs against their weights, non-finite values,
text, repo ids and every one-line error's advice. Each case ended in a traceback, a wrong status or lost
work before; each now ends in one line with the documented status, before any work it would waste."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cache.planner import Footprint
from fate_cli.bench import parse_budgets
from fate_cli.chat import ChatSession, slash_command
from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.runtime import open_model
from fate_cli.errors import EXIT_USAGE, BadModel, FateError, UsageError
from fate_cli.model.generation_config import generation_defaults
from fate_cli.model.loader import Checkpoint, load_args, load_model
from fate_cli.model.values import SAMPLING
from fate_cli.registry import BUNDLED_ROOT
from fate_cli.tokenizer import Tokenizer
from quant.source import weight_files
from quant.store import QuantParams, build_store
from tests.helpers import assert_one_line_error, one_thread  # noqa: F401 - autouse fixture
from tests.test_cli_run import FATE, fate

ROOT = Path(__file__).resolve().parents[2]
FOOTPRINT = Footprint(moe_layers=(0,), num_experts=4, top_k=1, non_expert=1000, expert_hot=100, expert_full=200,
                      kv_cache=0, workspace=0)


def copy_tiny(tmp_path: Path, name: str = "m") -> Path:
    dest = tmp_path / name
    shutil.copytree(BUNDLED_ROOT / "tiny", dest)
    return dest


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_weights(model: Path, change) -> None:  # noqa: ANN001 - (dict of tensors) -> None
    tensors = load_file(model / "model.safetensors")
    change(tensors)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def fails_cleanly(action, exc=FateError) -> FateError:  # noqa: ANN001
    with pytest.raises(exc) as info:
        action()
    text = str(info.value)
    assert "\n" not in text and "; " in text, text
    return info.value


# ------------------------------------------------------------------------------------------ user numbers


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5])
def test_a_non_finite_or_negative_temperature_is_refused(value):
    fails_cleanly(lambda: SAMPLING["temperature"].check(value, "--temperature"), UsageError)


def test_a_seed_beyond_64_bits_is_refused_before_loading(tmp_path):
    assert_one_line_error(fate("run", "tiny", "hi", "--seed", str(2**64), home=tmp_path), EXIT_USAGE, "--seed")


def test_chat_set_refuses_what_would_end_the_session():
    rt = open_model("tiny", "cpu")
    session = ChatSession(rt, None, SamplingParams(temperature=0.5, seed=1), 4)
    from rich.console import Console

    out = Console(file=open(os.devnull, "w"), highlight=False)  # noqa: SIM115
    for line in ("/set temperature nan", "/set temperature inf", f"/set seed {2**64}", "/set top_p 0",
                 "/set top_p 1.5", "/set max_tokens 0", "/set top_k -1", "/set seed x"):
        slash_command(session, line, out)
    assert session.params == SamplingParams(temperature=0.5, seed=1) and session.max_tokens == 4
    answer, stats = session.ask("hi", lambda _t: None)  # the session still answers
    assert stats.generated_tokens >= 1


def test_a_tiny_temperature_samples_without_nan():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    for t in (1e-30, 1e-300, 5e-324):
        token = Sampler(SamplingParams(temperature=t, seed=0), torch.device("cpu"))(logits)
        assert token.tolist() == [1]


def test_budget_lists_are_bounded_and_shares_finite():
    for text in ("1KB-1TB+1KB", "nan%", "inf%", "-5%", "0%", ",".join(["1GB"] * 1001)):
        fails_cleanly(lambda text=text: parse_budgets(text, FOOTPRINT), UsageError)
    assert len(parse_budgets("1GB-1999MB+1MB", FOOTPRINT)) == 1000  # the most a sweep takes



def test_shard_size_beyond_any_store_is_refused(tmp_path):
    assert_one_line_error(fate("quantize", "tiny", "--method", "minmax", "--shard-mb", "1e308", home=tmp_path),
                          EXIT_USAGE, "--shard-mb")


def test_bench_checks_its_output_files_before_measuring(tmp_path):
    result = fate("bench", "tiny", "--plot", str(tmp_path / "no" / "such" / "plot.png"), "-r", "1", "-n", "2",
                  "-p", "4", "--policy", "resident", "-q", home=tmp_path)
    assert_one_line_error(result, EXIT_USAGE, "does not exist")
    result = fate("bench", "tiny", "--rows-to", str(tmp_path / "gone" / "rows.jsonl"), "-r", "1", "-n", "2",
                  "-p", "4", "--policy", "resident", "-q", home=tmp_path)
    assert_one_line_error(result, EXIT_USAGE, "--rows-to")


def test_transfer_bits_no_tier_has_is_refused_before_a_store_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("FATE_HOME", str(tmp_path))
    fails_cleanly(lambda: open_model("tiny", "cpu", None, "fate", "16MB", transfer_bits=3), UsageError)
    assert not (tmp_path / "tiers").exists()


# ------------------------------------------------------------------------------------------ text


def test_invalid_utf8_prompt_and_stdin_are_refused(tmp_path):
    env = dict(os.environ, FATE_HOME=str(tmp_path))
    run = subprocess.run([*FATE, "run", "tiny", b"caf\xe9"], capture_output=True, env=env, timeout=120)
    assert run.returncode == EXIT_USAGE and b"not valid UTF-8" in run.stderr and b"Traceback" not in run.stderr
    chat = subprocess.run([*FATE, "chat", "tiny", "-n", "2"], input=b"caf\xe9\n", capture_output=True, env=env,
                          timeout=120)
    assert chat.returncode == EXIT_USAGE and b"not valid UTF-8" in chat.stderr and b"Traceback" not in chat.stderr


@pytest.mark.parametrize("template", ["{{ 1/0 }}", "{% for i in range(10**9) %}x{% endfor %}",
                                      "{{ messages[5]['content'] }}", "{{ none.attr.other }}"])
def test_a_chat_template_that_raises_anything_is_a_bad_model(tmp_path, template):
    model = copy_tiny(tmp_path)
    edit_json(model / "tokenizer_config.json", chat_template=template)
    from fate_cli.tokenizer import Message

    err = fails_cleanly(lambda: Tokenizer(model).encode_chat([Message("user", "hi")]), BadModel)
    assert "chat template" in str(err)


# ------------------------------------------------------------------------------------------ model files


@pytest.mark.parametrize("value", ["hot", float("nan"), -1.0, [0.7], True])
def test_a_wrong_generation_config_value_is_refused_unless_the_command_line_replaces_it(value):
    gen = {"do_sample": True, "temperature": value}
    fails_cleanly(lambda: generation_defaults(gen, Path("generation_config.json")), BadModel)
    assert generation_defaults(gen, Path("g.json"), given={"temperature"}).do_sample is True


def test_non_finite_config_floats_are_refused(tmp_path):
    model = copy_tiny(tmp_path)
    text = (model / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e999')
    (model / "config.json").write_text(text)
    fails_cleanly(lambda: load_args(model), BadModel)


@pytest.mark.parametrize("weight_map", [{"a": 1}, {"a": None}, {"a": "../outside.safetensors"}, {"a": ["x"]}, []])
def test_a_malformed_index_is_a_bad_model(tmp_path, weight_map):
    model = copy_tiny(tmp_path)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    fails_cleanly(lambda: weight_files(model), BadModel)
    fails_cleanly(lambda: Checkpoint(model), BadModel)


@pytest.mark.parametrize("field,value", [("hidden_size", 2**31 - 1), ("vocab_size", 2**31 - 1),
                                         ("num_experts", 2**31 - 1), ("moe_intermediate_size", 2**31 - 1),
                                         ("head_dim", 2**31 - 1)])
def test_a_config_its_weights_contradict_is_refused_before_planning(tmp_path, monkeypatch, field, value):
    monkeypatch.setenv("FATE_HOME", str(tmp_path))
    model = copy_tiny(tmp_path)
    edit_json(model / "config.json", **{field: value})
    err = fails_cleanly(lambda: open_model(str(model), "cpu", None, "fate", "16MB"), BadModel)
    assert "do not match the config" in str(err)
    fails_cleanly(lambda: load_model(model), BadModel)


def test_expert_tensors_relabelled_as_integers_are_refused(tmp_path):
    model = copy_tiny(tmp_path)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    edit_weights(model, lambda t: t.__setitem__(name, t[name].view(torch.int16)))
    err = fails_cleanly(lambda: load_model(model), BadModel)
    assert name in str(err) and "not a float" in str(err)


def test_nan_weights_are_named_when_running_and_refused_when_quantizing(tmp_path):
    model = copy_tiny(tmp_path)
    expert = "model.layers.2.mlp.experts.5.down_proj.weight"

    def poison(t: dict) -> None:
        t["model.norm.weight"] = torch.full_like(t["model.norm.weight"], float("nan"))
        t[expert] = t[expert].clone()
        t[expert][0, 0] = float("inf")

    edit_weights(model, poison)
    loaded = load_model(model)
    for temperature in (0.0, 1.0):  # greedy gave an empty answer, sampling a traceback
        sampler = Sampler(SamplingParams(temperature=temperature), torch.device("cpu"))
        err = fails_cleanly(lambda s=sampler: generate(loaded.model, [1, 2, 3], 3, s), BadModel)
        assert "model.norm.weight" in str(err)
    err = fails_cleanly(lambda: build_store(model, tmp_path / "store", load_args(model).experts,
                                            QuantParams(method="minmax")), BadModel)
    assert expert in str(err)


# ------------------------------------------------------------------------------------------ status and advice


def test_a_bad_repo_id_is_a_usage_error_before_any_request(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # were a request made, it would fail as a network error (5)
    for repo in ("a/..", "org/na me", "x-/y", "a/b--c", "a/b/c"):
        result = subprocess.run([*FATE, "pull", repo], capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, FATE_HOME=str(tmp_path), **env))
        assert_one_line_error(result, EXIT_USAGE, "not a valid Hub repo id")


def test_a_folder_without_config_says_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(fate("run", str(tmp_path / "empty"), "hi", home=tmp_path), 3, "; give a folder")


def _messages() -> list[tuple[str, int, str]]:
    errors = {"FateError", "UsageError", "ModelNotFound", "BadModel", "NetworkError", "ResourceError", "Busy"}

    def literal(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        return None

    found = []
    for pkg in ("fate_cli", "quant", "cache", "predictors"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in errors and node.args:
                    text = literal(node.args[0])
                    if text is not None:
                        found.append((str(path.relative_to(ROOT)), node.lineno, text))
    return found


def test_every_one_line_error_says_what_to_do():
    messages = _messages()
    assert len(messages) > 100  # the scan sees the package's errors
    missing = [f"{f}:{n}: {t}" for f, n, t in messages if "; " not in t]
    assert not missing, "\n".join(missing)


CONSOLE_SCRIPT = """
import builtins, os, re, signal, sys, tomllib
entry = tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"]["fate"]
module, func = entry.split(":")
real_import = builtins.__import__

def ctrl_c_on_typer(name, *args, **kwargs):  # the user presses Ctrl-C while the CLI's libraries import
    if name == "typer":
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)

builtins.__import__ = ctrl_c_on_typer
sys.argv = ["fate", "run", "tiny", "hi"]
main = getattr(__import__(module, fromlist=[func]), func)  # what pip's console script does
sys.exit(main())
"""


def test_ctrl_c_while_the_console_script_imports_is_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, FATE_HOME=str(tmp_path), PYTHONPATH=str(ROOT)), timeout=120)
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert result.stderr.strip() == "interrupted", result.stderr
