"""The import graph, read with ast: layers only point down, and no module imports itself round a cycle.

Layers, lowest first (README, "Layout"): errors; kernels and formats (quant); the model, its KV cache and what
reads a checkpoint's files; the expert cache, predictors and policies; the engine (opening a model,
generation, the captured decode step); the commands. A module may import its own layer and those below.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fate_cli", "quant", "cache", "predictors")
LAYERS = [  # (name, module prefixes); the commands layer takes every fate_cli module not listed
    ("errors", ("fate_cli.errors",)),
    ("kernels and formats", ("quant",)),
    ("model", ("fate_cli.model", "fate_cli.registry", "fate_cli.tokenizer", "fate_cli.synthetic")),
    ("cache, predictors, policies", ("cache", "predictors")),
    ("engine", ("fate_cli.engine",)),
    ("commands", ("fate_cli",)),
]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports (also inside functions and TYPE_CHECKING blocks)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, f, set(mods)) for m, f in mods.items()}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in g.items() for d in deps if layer_of(d) > layer_of(m)
    )


def cycles(g: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                found.append(" -> ".join(path[path.index(d):] + [m, d]) if d in path else f"{m} -> {d}")
            elif d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    return found


def test_every_import_points_down():
    assert not (found := upward_imports(graph())), "\n".join(found)


def test_no_import_cycle():
    assert not (found := cycles(graph())), "\n".join(found)


def test_the_checks_find_an_upward_import_and_a_cycle(tmp_path):
    """On a made-up tree: a quant module importing the engine, and two quant modules importing each other."""
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant" / "a.py").write_text("from fate_cli.engine import runtime\nimport quant.b\n")
    (tmp_path / "quant" / "b.py").write_text("from . import a\n")
    known = {"quant.a", "quant.b", "fate_cli.engine.runtime", "fate_cli.engine"}
    g = {m: imports_of(m, tmp_path / "quant" / f"{m[-1]}.py", known) for m in ("quant.a", "quant.b")}
    assert g == {"quant.a": {"fate_cli.engine", "fate_cli.engine.runtime", "quant.b"}, "quant.b": {"quant.a"}}
    assert upward_imports(g) == [
        "quant.a (kernels and formats) imports fate_cli.engine (engine)",
        "quant.a (kernels and formats) imports fate_cli.engine.runtime (engine)",
    ]
    assert cycles(g) == ["quant.a -> quant.b -> quant.a"]
