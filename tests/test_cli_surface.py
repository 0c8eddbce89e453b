"""What a newcomer meets first: --help that shows defaults, one-line usage errors, --version, -h, `fate show`,
a prompt from stdin, `fate rm --tiers`, `fate list`'s columns, CPU threads, and the suite's own home."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fate_cli.model.loader import load_model
from fate_cli.model.threads import SMALL_STEP_MACS, matrix_threads, physical_cores, step_macs, use_threads
from fate_cli.registry import BUNDLED_ROOT, fate_home
from tests.helpers import assert_one_line_error, fate_in_process
from tests.tiny_models import make_tiny_model

fate = fate_in_process


def test_the_suite_runs_in_a_private_fate_home(tmp_path_factory):
    assert fate_home().resolve().is_relative_to(tmp_path_factory.getbasetemp().resolve())


@pytest.mark.parametrize(
    "args,needles",
    [
        (["run", "tiny", "hi", "-n", "0"], ["--max-tokens", "fate run -h"]),
        (["rm"], ["missing argument", "MODEL", "fate rm -h"]),
        (["run", "tiny", "hi", "--bogus"], ["no such option", "--bogus"]),
        (["run", "tiny", "hi", "--vra", "1GB"], ["did you mean", "--vram"]),
        (["nope"], ["no such command", "nope"]),
        (["run", "tiny", "hi", "-n", "many"], ["--max-tokens", "integer"]),
    ],
)
def test_usage_errors_are_one_line(args, needles):
    assert_one_line_error(fate(*args), 2, *needles)


def test_help_shows_every_default_and_plain_metavars(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside the help's boxes
    run = fate("run", "-h")
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    for needle in ("[default: generation_config.json]", "[default: cuda when available]",
                   "[default: bfloat16 on cuda, float32 on cpu]", "[default: free memory less a margin]",
                   "[default: fate]", "[default: 256]", "--threads", "[default: OMP_NUM_THREADS, else the physical"):
        assert needle in text, needle
    assert "Usage: fate run [OPTIONS] MODEL [PROMPT]" in text
    assert "<bool>" not in text and "<str>" not in text and "{" not in text
    bench = " ".join(fate("bench", "--help").stdout.split())
    assert "[default: resident,fate,lru,eap,fmoe,klotski,ondemand]" in bench and "[default: the bundled model]" in bench
    top = fate()
    assert top.returncode == 0 and "show" in top.stdout and "--version" in top.stdout


def test_version():
    out = fate("--version")
    assert out.returncode == 0 and re.fullmatch(r"fate \S+\n", out.stdout), out.stdout


def test_show_names_what_the_model_is():
    out = fate("show", "tiny")
    assert out.returncode == 0, out.stderr
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.stdout.splitlines())
    assert fields["family"] == "qwen3_moe"
    assert fields["parameters"].startswith("9.2M (")  # the card's 9.2M parameters, read from the checkpoint
    assert fields["layers"] == "8 (8 MoE)" and fields["context"] == "1024 tokens"
    assert fields["experts"].startswith("32 per MoE layer, top-4")
    assert str(BUNDLED_ROOT / "tiny") in fields["checkpoint"]
    assert "tier store" in fields
    assert_one_line_error(fate("show", "mixtrall"), 3, "did you mean")


def test_list_has_parameters_context_and_quantization():
    out = fate("list")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["name", "repo", "family", "params", "context", "quantization", "size", "status"]
    tiny = next(r for r in rows if r.startswith("tiny"))
    assert "9.2M" in tiny and "1024" in tiny and "bf16" in tiny


def test_prompt_from_stdin_equals_the_argument():
    args = ["run", "tiny", "-n", "6", "--temperature", "0", "--json"]
    given = json.loads(fate(*args[:2], "What is a kludge?", *args[2:]).stdout)
    piped = fate(*args, stdin="What is a kludge?\n")
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["token_ids"] == given["token_ids"]
    dash = fate(*args[:2], "-", *args[2:], stdin="What is a kludge?")
    assert json.loads(dash.stdout)["token_ids"] == given["token_ids"]
    assert_one_line_error(fate("run", "tiny", stdin=""), 2, "no prompt")


def test_rm_tiers_deletes_only_the_tier_store(tmp_path):
    home = tmp_path / "home"
    store = home / "tiers" / "tiny"
    assert_one_line_error(fate("rm", "tiny", "--tiers", "-y", home=home), 3, "no tier store")
    assert_one_line_error(fate("rm", "tiny", home=home), 2, "--tiers")
    built = fate("quantize", "tiny", "--method", "minmax", home=home)
    assert built.returncode == 0 and (store / "manifest.json").is_file(), built.stderr
    assert_one_line_error(fate("rm", "tiny", "--tiers", home=home), 2, "--yes")  # stdin is no terminal
    assert store.is_dir()
    gone = fate("rm", "tiny", "--tiers", "--yes", home=home)
    assert gone.returncode == 0 and "removed the tier store of tiny" in gone.stdout
    assert not store.exists() and not list(store.parent.iterdir())
    assert (BUNDLED_ROOT / "tiny" / "model.safetensors").is_file()


def test_a_second_quantize_says_only_up_to_date(tmp_path):
    home = tmp_path / "home"
    assert fate("quantize", "tiny", "--method", "minmax", home=home).returncode == 0
    again = fate("quantize", "tiny", "--method", "minmax", home=home)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert "quantizing" not in again.stderr


def test_threads_follow_physical_cores(tmp_path):
    """One thread per (package, core) pair of the CPUs this process may use, read from sysfs."""
    import os

    cpus = sorted(os.sched_getaffinity(0))
    for cpu in cpus:  # a machine whose CPUs pair up as hyperthreads of one core each
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{cpu // 2}\n")
    assert physical_cores(tmp_path) == len({c // 2 for c in cpus})
    assert physical_cores(tmp_path / "absent") == len(cpus)
    before = torch.get_num_threads()
    try:
        assert use_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_small_step_runs_on_one_thread_and_a_large_one_on_all(tmp_path):
    """A decode step of the bundled model never fans out over threads; a step with large products does."""
    seen: list[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tiny = load_model(BUNDLED_ROOT / "tiny", torch.device("cpu"), torch.float32).model
        tiny.layers[0].mlp.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
        tiny(torch.tensor([[5]]), tiny.new_cache(1, 8), 0)  # one decode-sized step
        wide = load_model(make_tiny_model(tmp_path / "wide", hidden_size=512, num_attention_heads=8, head_dim=64,
                                          num_key_value_heads=4), torch.device("cpu"), torch.float32).model
        wide.layers[0].mlp.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
        tokens = SMALL_STEP_MACS // step_macs(wide.args, 1) + 1
        wide(torch.arange(tokens).view(1, -1) % 100 + 3, wide.new_cache(1, tokens), 0)
        assert torch.get_num_threads() == 2  # restored after each step
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]


def test_quantizing_small_experts_runs_on_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with matrix_threads(160 * 64, torch.device("cpu")):  # an expert matrix of the bundled model
            assert torch.get_num_threads() == 1
        with matrix_threads(4096 * 14336, torch.device("cpu")):  # one of Mixtral-8x7B's
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_dispatch_sums_as_index_add():
    """The CPU dispatch adds each expert's rows without index_add_ (which fans a few rows out over threads):
    the same sums, bit for bit."""
    loaded = load_model(BUNDLED_ROOT / "tiny", torch.device("cpu"), torch.float32)
    block = loaded.model.layers[1].mlp
    x = torch.randn(7, loaded.args.hidden_size, generator=torch.Generator().manual_seed(0))
    weights, ids = block.pick_experts(x)
    out = block.dispatch(x, weights, ids)
    ref = torch.zeros_like(x)
    flat = ids.flatten()
    for e, fn in block.provider.experts(block.layer, sorted(set(flat.tolist())), []):
        picks = (flat == e).nonzero().flatten()
        ref.index_add_(0, picks // block.top_k, fn(x[picks // block.top_k]).float() * weights.flatten()[picks, None])
    assert torch.equal(out, ref)


def test_footer_and_json_say_what_ran():
    one = fate("run", "tiny", "hi", "-n", "1", "--temperature", "0")
    assert one.returncode == 0, one.stderr
    footer = one.stderr.strip().splitlines()[-1]
    assert "generated 1 tok (no decode step)" in footer and not re.search(r"(?<![\d.])0\.0 tok/s", footer)
    # piped stderr keeps whole lines: the model line is one line however long
    assert any(line.startswith("tiny (qwen3_moe") and "decode: eager" in line for line in one.stderr.splitlines())
    offloaded = fate("run", "tiny", "hi", "-n", "4", "--temperature", "0", "--vram", "16MB")
    assert offloaded.returncode == 0, offloaded.stderr
    assert re.search(r"experts hit \d+\.\d% \(\d+ hits, \d+ misses\)", offloaded.stderr.splitlines()[-1])
    whole = json.loads(fate("run", "tiny", "hi", "-n", "2", "--vram", "1GB", "--json").stdout)
    assert whole["stats"]["policy"] is None and "nothing offloaded" in whole["stats"]["plan"]
    moved = json.loads(fate("run", "tiny", "hi", "-n", "2", "--vram", "16MB", "--json").stdout)
    assert moved["stats"]["policy"] == "fate"


def test_chat_panel_shows_memory_used_and_names_every_colour():
    from rich.console import Console

    from fate_cli.chat import SessionCounters
    from fate_cli.engine.runtime import open_model
    from fate_cli.panel import ChatPanel

    runtime = open_model("tiny", "cpu", None, "fate", "16MB")
    assert runtime.offload is not None
    console = Console(record=True, width=200)
    console.print(ChatPanel(runtime, SessionCounters()).render())
    text = console.export_text()
    assert "plan holds" in text and "of 16.00 MB budget" in text
    assert "lower red" in text
