"""The import graph of mmemb/ and the default plugins: no cycles; the kernel imports no plugin.

Every module of ``mmemb/`` and ``plugins/mmemb_*/`` is parsed with `ast` (nothing is imported), and
every import in it becomes an edge: module-level and function-level ones alike, since a lazy import
that closes a cycle still ties the two modules together. Imports under ``if TYPE_CHECKING:`` are
left out of the cycle check (they never run). ``from pkg import submodule`` is an edge to the
submodule, not to the package; an edge to one's own ancestor package is not a cycle (a package's
``__init__`` runs before its submodules whatever they import).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"


@dataclass(frozen=True)
class Import:
    target: str  # the dotted name as written (resolved when relative)
    type_only: bool  # under `if TYPE_CHECKING:`
    line: int


@cache
def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for the kernel and the default plugin packages."""
    roots = [(ROOT, ROOT / "mmemb")] + [
        (PLUGINS, p) for p in sorted(PLUGINS.glob("mmemb_*")) if (p / "__init__.py").is_file()
    ]
    out: dict[str, Path] = {}
    for base, pkg in roots:
        for f in sorted(pkg.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> Iterator[Import]:
    """Every import statement of `module`, with relative ones resolved to absolute names."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, type_only: bool) -> Iterator[Import]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, type_only, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            mods = _modules()
            for alias in node.names:  # `from pkg import sub` is an edge to the submodule
                sub = f"{prefix}.{alias.name}"
                yield Import(sub if sub in mods else prefix, type_only, node.lineno)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, type_only)

    yield from visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)


def _resolve(name: str) -> str | None:
    """The module `name` lands in: itself, or the nearest enclosing known module (an attribute
    imported from a module); None outside the scanned packages."""
    mods = _modules()
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, runtime imports only."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for module, path in mods.items():
        for imp in _imports(module, path):
            if imp.type_only:
                continue
            target = _resolve(imp.target)
            if target is None or target == module or module.startswith(target + "."):
                continue  # outside the tree, itself, or its own ancestor package
            graph[module].setdefault(target, imp.line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one cycle
    through its first module, so the message names a concrete path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return [_cycle_path(graph, set(c), c[0]) for c in comps]


def _cycle_path(graph: dict[str, dict[str, int]], comp: set[str], start: str) -> list[str]:
    """A shortest cycle start -> ... -> start inside one component (breadth-first)."""
    prev: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:  # closed: walk back from v to start
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w in comp and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)  # pragma: no cover - a component always has a cycle


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    mods = _modules()
    steps = [
        f"{a} ({mods[a].relative_to(ROOT)}:{graph[a][b]}) -> {b}"
        for a, b in zip(cycle, cycle[1:], strict=False)
    ]
    return "\n    ".join(steps)


def test_the_scan_sees_the_tree() -> None:
    mods = _modules()
    assert {"mmemb", "mmemb.loss", "mmemb_hf", "mmemb_tiled", "mmemb.testing.tiny",
            "mmemb_hf.tiny"} <= set(mods)
    graph = _graph()
    assert "mmemb.errors" in graph["mmemb.data.shards.codec"]


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles (move the shared part into a module both can import):\n  " + (
        "\n  ".join(_describe(graph, c) for c in cycles)
    )


def test_kernel_imports_no_plugin_package() -> None:
    """mmemb/ finds plugins through entry points only: no import of a plugin package anywhere in
    the kernel, not even a lazy or type-only one."""
    plugin_packages = {p.name for p in PLUGINS.iterdir() if (p / "__init__.py").is_file()}
    plugin_packages |= {"plugins", "mmemb_hello"}
    assert {"mmemb_ega", "mmemb_hf"} <= plugin_packages
    offenders = {
        f"{path.relative_to(ROOT)}:{imp.line}": imp.target
        for module, path in _modules().items()
        if module.split(".")[0] == "mmemb"
        for imp in _imports(module, path)
        if imp.target.split(".")[0] in plugin_packages
    }
    assert offenders == {}


ARCHITECTURE_LIBRARIES = {"torch", "transformers", "tokenizers"}


def test_tiny_model_cli_knows_no_architecture() -> None:
    """``python -m mmemb.testing.tiny`` reaches the tiny model builders through the registry: no
    module it runs, its kernel imports followed transitively, imports an architecture library
    (the builders live in the plugin that owns the architecture, ``mmemb_hf.tiny``)."""
    mods, graph = _modules(), _graph()
    seen: set[str] = set()
    todo = ["mmemb.testing.tiny"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    assert "mmemb.testing.tiny_model" in seen and "mmemb.plugins" in seen
    offenders = {
        f"{mods[m].relative_to(ROOT)}:{imp.line}": imp.target
        for m in sorted(seen)
        for imp in _imports(m, mods[m])
        if not imp.type_only and imp.target.split(".")[0] in ARCHITECTURE_LIBRARIES
    }
    assert offenders == {}


# --- the scanner itself, on small trees ---------------------------------------------------------


def test_scanner_rules(tmp_path: Path) -> None:
    source = tmp_path / "fake.py"
    source.write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import mmemb.errors\n"
        "from mmemb.data import shards, __doc__\n"  # a submodule, and a name of the package
        "from . import schema\n"  # relative, inside mmemb.data
        "if TYPE_CHECKING:\n"
        "    from mmemb.eval import results\n"
        "def f():\n"
        "    from mmemb.eval.report import Reference\n"  # function level counts
    )
    found = {(_resolve(i.target), i.type_only) for i in _imports("mmemb.data.fake", source)}
    assert found - {(None, False)} == {
        ("mmemb.errors", False),
        ("mmemb.data.shards", False),
        ("mmemb.data", False),
        ("mmemb.data.schema", False),
        ("mmemb.eval.results", True),
        ("mmemb.eval.report", False),
    }


def test_cycle_finder_names_the_path() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
