"""Every test runs with FATE_HOME in a temporary folder, never the user's ~/.cache/fate.

Tests that need a home of their own still set it (monkeypatch or env=); the rest, and the subprocesses they
start, share this one, so the bundled model's tier store is built once per run."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_fate_home(tmp_path_factory):  # noqa: ANN001, ANN201 - pytest fixture
    home = tmp_path_factory.mktemp("fate-home")
    before = os.environ.get("FATE_HOME")
    os.environ["FATE_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("FATE_HOME", None)
    else:
        os.environ["FATE_HOME"] = before
