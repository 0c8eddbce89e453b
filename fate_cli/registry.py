"""Where models live: aliases from models.toml, pulled models under $FATE_HOME, local folders."""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fate_cli.errors import FateError, ModelNotFound, UsageError
from fate_cli.model.values import check_repo_id
from quant.files import UnreadableJSON, read_json_object

PULL_MARKER = ".fate-pull.json"  # written last by `fate pull`: its presence means the download is complete
BUNDLED_ROOT = Path(__file__).parent / "models"


def is_bundled_default(path: Path) -> bool:
    """The bundled trained model (whose held-out text gives offline statistics such as co-activation)."""
    return Path(path).resolve() == (BUNDLED_ROOT / "tiny").resolve()


@dataclass(frozen=True)
class Alias:
    name: str
    family: str
    description: str = ""
    repo: str | None = None
    bundled: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for, or the default alias
    path: Path
    repo: str | None = None
    family: str | None = None


def fate_home() -> Path:
    return Path(os.environ.get("FATE_HOME") or Path.home() / ".cache" / "fate").expanduser()


def models_dir() -> Path:
    return fate_home() / "models"


def repo_dir(repo: str) -> Path:
    """Hub repo id -> its folder under $FATE_HOME/models (org/name -> org--name)."""
    return models_dir() / repo.replace("/", "--")


def _registry() -> dict[str, Any]:
    text = resources.files("fate_cli").joinpath("models.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def aliases() -> dict[str, Alias]:
    return {
        name: Alias(
            name=name,
            family=entry["family"],
            description=entry.get("description", ""),
            repo=entry.get("repo"),
            bundled=entry.get("bundled"),
        )
        for name, entry in _registry()["models"].items()
    }


def default_alias() -> str:
    return _registry()["default"]


def looks_like_repo(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def is_complete(path: Path) -> bool:
    return (path / PULL_MARKER).is_file()


def pull_record(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path / PULL_MARKER)
    except UnreadableJSON:
        return {}


def unknown_alias(name: str) -> FateError:
    known = list(aliases())
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known aliases: {', '.join(known)}"
    return ModelNotFound(
        f"unknown model '{name}': not an alias, a Hub repo id (org/name) or a model folder; {hint}"
    )


def resolve(name: str | None) -> ResolvedModel:
    """A model name as the user gives it -> a folder holding a loadable checkpoint."""
    name = name or default_alias()
    local = Path(name).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        return ResolvedModel(name=name, path=local)
    table = aliases()
    if name in table:
        alias = table[name]
        if alias.bundled:
            return ResolvedModel(name=name, path=BUNDLED_ROOT / alias.bundled, family=alias.family)
        return _pulled(name, alias.repo or "", alias.family)
    if looks_like_repo(name):
        return _pulled(name, name, None)
    if local.exists() or os.sep in name:
        raise ModelNotFound(f"{local} is not a Hugging Face model folder (no config.json); "
                            f"give a folder holding config.json, "
                            "tokenizer.json and safetensors weights")
    raise unknown_alias(name)


def _pulled(name: str, repo: str, family: str | None) -> ResolvedModel:
    path = repo_dir(repo)
    if not path.is_dir():
        raise ModelNotFound(f"model '{name}' ({repo}) is not pulled yet; run `fate pull {name}`")
    if not is_complete(path):
        raise ModelNotFound(f"the pull of '{name}' ({repo}) did not finish; run `fate pull {name}` again")
    return ResolvedModel(name=name, path=path, repo=repo, family=family)


def alias_for_pull(name: str) -> tuple[str, str | None]:
    """`fate pull NAME` -> (repo id, family or None)."""
    table = aliases()
    if name in table:
        alias = table[name]
        if not alias.repo:
            raise UsageError(f"'{name}' is bundled with fate and needs no pull; run it directly, "
                             f"e.g. `fate run {name} hello`")
        return alias.repo, alias.family
    if "/" in name and not name.startswith((".", "/", "~")):
        return check_repo_id(name), None  # refused before any request to the Hub
    raise unknown_alias(name)
