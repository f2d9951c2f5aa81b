"""The package layout's rules, read from the source with ``ast`` (no project module is imported):

* no import cycle among the project's modules (``models``, ``tasks``, ``orchestrator``,
  ``tune_spaces``), counting function-local imports: they run too, only later;
* no module imports a private name (leading underscore) from another project module, neither
  ``from m import _x`` nor ``m._x`` on an imported module;
* ``models/`` and ``tasks/`` never import ``ray``, directly (statically, here, function-local
  imports included) or through what they import (at import time, in a fresh interpreter).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "tasks", "orchestrator", "tune_spaces")
RAY_FREE = ("models", "tasks")


@dataclass
class Import:
    """One import statement's effect: the project module it loads, and the names taken from it."""

    target: str  # a project module, or an outside top-level name ("ray", "torch", ...)
    names: list[str] = field(default_factory=list)  # ``from target import a, b``
    line: int = 0
    type_checking: bool = False  # under ``if TYPE_CHECKING:``: never runs


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str:
    """The deepest project module that ``import name`` loads (or ``name``'s top level outside the project)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in MODULES:
            return candidate
    return parts[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> list[Import]:
    """Every import in ``module``'s source, at any depth (functions, methods, ``try`` blocks)."""
    path = MODULES[module]
    return _parse_imports(path.read_text(), module, path.name == "__init__.py")


def _parse_imports(source: str, module: str, is_package: bool = False) -> list[Import]:
    tree = ast.parse(source, module)
    package = module if is_package else module.rpartition(".")[0]
    guarded: set[int] = set()  # ids of statements under ``if TYPE_CHECKING:``
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out = []
    for node in ast.walk(tree):
        tc = id(node) in guarded
        if isinstance(node, ast.Import):
            out += [Import(_resolve(a.name), [], node.lineno, tc) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: ``from ..x import y`` in package a.b.c -> a.b.x
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:  # ``from pkg import sub`` loads the submodule pkg.sub
                sub = f"{source}.{a.name}"
                if sub in MODULES:
                    out.append(Import(sub, [], node.lineno, tc))
                else:
                    out.append(Import(_resolve(source), [a.name], node.lineno, tc))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):  # importlib.import_module("literal")
            out.append(Import(_resolve(node.args[0].value), [], node.lineno, tc))
    return out


def _private_attribute_uses(module: str) -> list[str]:
    """``alias._x`` where ``alias`` is a project module bound by ``import`` / ``from pkg import mod``."""
    tree = ast.parse(MODULES[module].read_text())
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and _resolve(a.name) == a.name and a.name in MODULES:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    bad = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and aliases[node.value.id] != module
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            bad.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return bad


def _graph() -> dict[str, set[str]]:
    """Module -> project modules it imports (statements under ``if TYPE_CHECKING:`` left out: they never run)."""
    return {
        m: {i.target for i in _imports(m) if i.target in MODULES and i.target != m and not i.type_checking}
        for m in MODULES
    }


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns every component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"  {m} -> {t}" for m in component for t in sorted(graph[m] & members)]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(edges)


# ----------------------------------------------------------------------------- the checker itself


def test_the_scan_sees_every_package_and_resolves_imports():
    assert {m.split(".")[0] for m in MODULES} == set(PACKAGES)
    assert "models.quant.lq" in MODULES and "orchestrator.cli" in MODULES  # subpackages, __init__ as the package
    graph = _graph()
    assert "models.lora" in graph["models.quant.linear"] or "models.lora" in graph["models.quant.model"]
    # function-local imports count: tasks.build imports tasks.sources inside its functions only
    assert "tasks.sources" in graph["tasks.build"]


def test_relative_imports_resolve_to_project_modules():
    src = "from . import linear\nfrom ..lora import inject\ndef f():\n    from .. import prior\n"
    got = [(i.target, i.names) for i in _parse_imports(src, "models.quant.lq")]
    assert got == [("models.quant.linear", []), ("models.lora", ["inject"]), ("models.prior", [])]
    guarded = _parse_imports("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\n", "models.x")
    assert [(i.target, i.type_checking) for i in guarded] == [("typing", False), ("ray", True)]


def test_cycle_finder_finds_a_cycle_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _strongly_connected(graph) == [["a", "b", "c"]]
    assert _strongly_connected({"a": {"b"}, "b": set()}) == []


# ----------------------------------------------------------------------------- the rules


def test_no_import_cycles():
    graph = _graph()
    cycles = _strongly_connected(graph)
    assert not cycles, "\n".join(_describe(c, graph) for c in cycles)


def test_no_private_names_imported_from_other_modules():
    bad = []
    for m in MODULES:
        for imp in _imports(m):
            if imp.target in MODULES and imp.target != m:
                bad += [f"{m}:{imp.line} imports {n} from {imp.target}" for n in imp.names
                        if n.startswith("_") and not n.startswith("__")]
        bad += _private_attribute_uses(m)
    assert not bad, "make the name public (and document it) or move it:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", RAY_FREE)
def test_models_and_tasks_never_import_ray_in_their_source(package):
    bad = [
        f"{m}:{imp.line}" for m in MODULES if m.split(".")[0] == package for imp in _imports(m) if imp.target == "ray"
    ]
    assert not bad, f"only orchestrator/ imports ray: {bad}"


def test_models_and_tasks_never_import_ray_at_import_time():
    """Importing every module of models/ and tasks/ (subpackages included) leaves ray out of sys.modules."""
    names = sorted(m for m in MODULES if m.split(".")[0] in RAY_FREE)
    code = "import importlib, sys\n" \
           f"for name in {names!r}:\n" \
           "    importlib.import_module(name)\n" \
           "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n" \
           "assert not bad, bad\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
