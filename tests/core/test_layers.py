"""The layers hold: nothing imports upward or sideways, and no modules import each other through any chain.

The layers (README, "How the code is laid out"): core (``ats_deploy/``: math, model, checkpoints, artifact,
data reading, ``backends/`` = the runtimes) < ``profiles/`` < ``exporters/`` < ``bench/`` and
``ats_deploy/serving/`` side by side < ``cli`` on top. Every import counts, function-level ones too; only
``if TYPE_CHECKING:`` blocks are left out, since they never run. The package folders are read from
pyproject.toml's package-dir mapping, so the test follows the layout the wheel installs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO as ROOT
from setuptools.config.pyprojecttoml import read_configuration

PACKAGE = "ats_deploy"
# Rank of each layer; two layers of one rank (bench, serving) may not import each other.
RANKS = {"core": 0, "profiles": 1, "exporters": 2, "bench": 3, "serving": 3, "cli": 4}


def package_dirs() -> dict[str, Path]:
    """pyproject's package-dir mapping: import name -> folder."""
    config = read_configuration(ROOT / "pyproject.toml", expand=False)  # setuptools' reader: tomllib is 3.11+
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name, each file under the most specific mapped folder."""
    dirs = package_dirs()
    found: dict[str, Path] = {}
    for name, folder in sorted(dirs.items(), key=lambda item: -len(item[0])):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            dotted = ".".join([name, *parts])
            if any(other.startswith(dotted + ".") or other == dotted for other in dirs if other != name) and parts:
                continue  # a folder mapped to a package of its own (exporters/ under ats_deploy/ in a checkout)
            found.setdefault(dotted, path)
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def imported(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The package's modules that module ``name`` imports (``from x import y``: x.y when it is a module, else x)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from . import ats`` depends on the module ats, not on the package's own namespace
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        yield from (target for target in targets if target in known and target != name)


def layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in RANKS:
        return parts[1]
    return "core"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: set(imported(name, path, set(found))) for name, path in found.items()}


def test_the_mapping_finds_every_layer(graph: dict[str, set[str]]) -> None:
    """A test over no modules would pass vacuously: every layer has modules, and the known edges are seen."""
    assert {layer(name) for name in graph} == set(RANKS)
    assert "ats_deploy.keep" in graph["ats_deploy.runtime"]


def test_nothing_imports_upward_or_sideways(graph: dict[str, set[str]]) -> None:
    wrong = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target == PACKAGE:
                continue  # the package's own __init__ is core (re-exports of core modules)
            here, there = layer(name), layer(target)
            if RANKS[there] > RANKS[here] or (RANKS[there] == RANKS[here] and here != there):
                wrong.append(f"{name} ({here}) imports {target} ({there})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
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
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    assert not found, "modules importing each other through a chain:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
