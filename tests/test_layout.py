"""The package layout (README "Layout"): every import runs down the layers, none loops.

Reads the source with ``ast`` (no import is executed), so imports inside functions count
as much as those at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[tuple[str, ...]] = [
    ("rapa.errors", "rapa.progress", "rapa.heap"),
    ("rapa.ops", "rapa.schemes"),
    ("rapa.functional", "rapa.tiled_conv", "rapa.pooling", "rapa.lrn", "rapa.native"),
    ("rapa.models", "rapa.nets", "rapa.convert", "rapa.lsuv", "rapa.runtime", "rapa.summary", "rapa.theory",
     "rapa.tile_rates", "rapa.voting"),
    ("rapa.data",),
    ("rapa.analog",),
    ("rapa.config", "rapa.rundir", "rapa.checkpoint"),
    ("rapa.train", "rapa.modern"),
    ("rapa.analysis",),
    ("rapa.sweep",),
    ("rapa.bench",),
    ("rapa.cli",),
]
"""The layers, lowest first (README "Layout"): a module imports only from its own layer or lower."""

OPTIONAL = {"aihwkit": "rapa.analog", "ray": "rapa.sweep"}
"""Optional dependencies and the only package allowed to import each."""


def module_names() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    out = {}
    for path in sorted((SRC / "rapa").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = module_names()


def layer(name: str) -> int:
    """Index of the layer that owns module ``name``."""
    for i, owners in enumerate(LAYERS):
        if any(name == o or name.startswith(o + ".") for o in owners):
            return i
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS and the README's Layout")


def imports(name: str) -> list[tuple[str, int]]:
    """The package modules (and optional dependencies) ``name`` imports, with line numbers."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # ``from rapa import schemes`` imports the module rapa.schemes, not the package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
                       if (base, a.name) != ("rapa", "__version__")]  # the version string is no re-export
        else:
            continue
        for t in targets:
            root = t.split(".")[0]
            if root in OPTIONAL:
                found.append((root, node.lineno))
                continue
            while t and t not in MODULES:  # ``import rapa.data.base`` -> rapa.data.base
                t = t.rpartition(".")[0]
            if t and t != name:
                found.append((t, node.lineno))
    return found


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "rapa":
            layer(name)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "rapa"))
def test_imports_run_down_the_layers(name):
    mine = layer(name)
    bad = []
    for target, line in imports(name):
        if target in OPTIONAL:
            if not (name == OPTIONAL[target] or name.startswith(OPTIONAL[target] + ".")):
                bad.append(f"line {line}: {target} (only {OPTIONAL[target]} may import it)")
        elif target == "rapa":
            bad.append(f"line {line}: the package rapa (import the owning module instead)")
        elif layer(target) > mine:
            bad.append(f"line {line}: {target} (layer {layer(target)} above {mine})")
    assert not bad, f"{name} imports upward: " + "; ".join(bad)


def test_no_import_cycles():
    graph = {n: {t for t, _ in imports(n) if t in MODULES and t != "rapa"} for n in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_checker_catches_upward_imports(tmp_path):
    """The rules above fail on an upward import and on a cycle (guards the checker itself)."""
    pkg = tmp_path / "rapa"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from rapa.cli import x\n")
    (pkg / "schemes.py").write_text("from rapa import functional\n")
    (pkg / "functional.py").write_text("import rapa.schemes\n")
    (pkg / "cli" / "x.py").write_text("")
    global SRC, MODULES
    old = SRC, MODULES
    try:
        SRC = tmp_path
        MODULES = module_names()
        with pytest.raises(AssertionError, match="imports upward"):
            test_imports_run_down_the_layers("rapa.errors")
        with pytest.raises(AssertionError, match="imports upward"):
            test_imports_run_down_the_layers("rapa.schemes")
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_import_cycles()
    finally:
        SRC, MODULES = old
