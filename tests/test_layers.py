"""The package's layers: each part of clipret imports only from parts below it.

Read from the source with ``ast`` (function-level imports count too, since a lazy import is still
a dependency). A new import that points up a layer fails here, naming the file and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "clipret"

# Lowest first. A part may import from its own layer's other parts only where listed in SIDEWAYS.
LAYERS = [
    {"errors", "metrics"},
    {"runtime", "config", "progress", "_fault"},
    {"artifacts", "parallel"},
    {"data", "model"},
    {"retrieval"},
    {"embedding", "evaluation"},
    {"training"},
    {"api"},
    {"demo", "prepare", "report", "serve"},
    {"cli"},
    {"__main__"},
]
SIDEWAYS = {("embedding", "evaluation"): False, ("evaluation", "embedding"): False}
ROOT_NAMES = {"__version__"}  # ``from clipret import __version__`` is the package's own metadata


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    return rel[0]


def _targets(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, part of clipret) for every import of clipret in a module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "clipret":
            parts = node.module.split(".")
            if len(parts) > 1:
                out.append((node.lineno, parts[1]))
            else:
                out += [(node.lineno, a.name) for a in node.names if a.name not in ROOT_NAMES]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("clipret.")]
    return out


def test_every_part_is_in_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    placed = set().union(*LAYERS)
    assert parts - {"__init__"} == placed, "place new parts of clipret in LAYERS"


def test_no_part_imports_from_a_layer_above_it():
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == ROOT:
            continue  # the package root re-exports the API lazily
        src = _part(path)
        for line, dst in _targets(ast.parse(path.read_text(), str(path))):
            if dst == src or dst not in rank:
                continue
            if rank[dst] > rank[src] or (rank[dst] == rank[src] and not SIDEWAYS.get((src, dst), False)):
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} ({src}) imports clipret.{dst}")
    assert not wrong, "imports that point up (or sideways) a layer:\n" + "\n".join(wrong)


def test_the_check_sees_lazy_and_package_level_imports():
    tree = ast.parse("def f():\n    from clipret.model._open_clip import x\nfrom clipret import runtime, __version__\n"
                     "import clipret.serve.app\n")
    assert sorted(_targets(tree)) == [(2, "model"), (3, "runtime"), (4, "serve")]


def _runtime_imports(tree: ast.AST) -> list[ast.AST]:
    """Import nodes that can run: everything but the bodies of ``if TYPE_CHECKING:``."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        todo += ast.iter_child_nodes(node)
    return out


def _module_graph() -> dict[str, set[str]]:
    """clipret module -> the clipret modules it imports at run time (lazy imports too); the
    package root, which re-exports the API lazily, is left out."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("clipret"):
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else owner(node.module)
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {owner(a.name) for a in node.names if a.name.startswith("clipret.")}
        graph[name] = found - {None, name, "clipret"}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_between_modules():
    assert _circles(_module_graph()) == []


def test_the_circle_check_finds_a_circle_and_skips_type_only_imports():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from clipret.x import T\n"
                     "def f():\n    from clipret.y import g\n")
    assert sorted(n.module for n in _runtime_imports(tree) if isinstance(n, ast.ImportFrom)) == ["clipret.y", "typing"]
