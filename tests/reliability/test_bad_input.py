"""Bad input and a hostile file system end in one line and a documented exit status, and lose nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fate_cli.registry import BUNDLED_ROOT
from tests.helpers import assert_error_after_progress, assert_one_line_error
from tests.test_cli_run import fate


@pytest.fixture()
def broken_template(tmp_path) -> Path:
    model = tmp_path / "badtpl"
    shutil.copytree(BUNDLED_ROOT / "tiny", model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{{ raise_exception('only user and assistant roles are supported') }}"
    cfg_path.write_text(json.dumps(cfg))
    return model


def test_chat_template_that_fails_to_render(broken_template, tmp_path):
    assert_error_after_progress(fate("run", str(broken_template), "hi", "-n", "2", home=tmp_path), 4,
                          "chat template failed to render", "only user and assistant")
    assert_error_after_progress(fate("chat", str(broken_template), "--prompt", "hi", "-n", "2", home=tmp_path), 4,
                          "chat template failed to render")


def test_prompt_longer_than_the_context(tmp_path):
    long = "word " * 3000
    assert_error_after_progress(fate("run", "tiny", long, "-n", "2", home=tmp_path), 6, "context", "shorten")
    assert_error_after_progress(fate("chat", "tiny", "--prompt", long, "-n", "2", home=tmp_path), 6, "context")


def test_unwritable_fate_home(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    home = blocker / "home"
    # the tier store is built on first use under FATE_HOME
    assert_one_line_error(fate("run", "tiny", "hi", "--vram", "16MB", "-n", "2", home=home), 6,
                          "cannot write", "set FATE_HOME to a writable folder")
    assert_one_line_error(fate("pull", "mixtral", home=home), 6, "set FATE_HOME to a writable folder")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to fill the disk")
def test_full_disk_while_quantizing_leaves_no_store(tmp_path):
    store = tmp_path / "tiers" / "tiny"
    store.mkdir(parents=True)
    for tier in ("hot", "cold", "dense"):  # every shard write lands on a device that is always full
        (store / f"{tier}-00001-of-00001.safetensors.tmp").symlink_to("/dev/full")
    assert_error_after_progress(fate("quantize", "tiny", "--method", "minmax", home=tmp_path), 6, "disk is full")
    assert not (store / "manifest.json").exists()  # never taken as a complete store
    assert not list(store.glob("*.safetensors"))
    for link in store.glob("*.tmp"):
        link.unlink()
    done = fate("quantize", "tiny", "--method", "minmax", home=tmp_path)  # with space again it completes
    assert done.returncode == 0, done.stderr
    assert (store / "manifest.json").exists()
