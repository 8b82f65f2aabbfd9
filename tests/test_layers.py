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
