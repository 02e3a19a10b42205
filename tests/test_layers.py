"""The project's modules import each other only downwards, and never in a circle.

Every import counts, those inside functions too: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_FOLDERS = {"tests", ".venv", ".git", "build", "data", "outputs", "saved_models"}

# Lower layers never import higher ones. evaluation.maps and evaluation.metrics (maps at the
# evaluation size, detection metrics: pure maths) and evaluation.mvtec (the MVTec AD folder layout)
# are leaves that fitting may use as well.
LAYERS = [
    ("config", "output_files"),
    ("preprocessing", "synthetic", "evaluation.maps", "evaluation.metrics", "evaluation.mvtec"),
    ("models",),
    ("inspection",),
    ("evaluation", "runtime"),
    ("train", "inference", "serve", "verify_setup", "scripts", "benchmarks"),
]


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every Python file of the project outside tests and build output."""
    modules = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if SKIPPED_FOLDERS & set(relative.parts[:-1]):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it (module level or inside functions)."""

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {owner(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {owner(f"{node.module}.{alias.name}") or owner(node.module) for alias in node.names}
    return found - {None}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix (``evaluation.metrics`` before ``evaluation``)."""
    best, rank = -1, None
    for index, members in enumerate(LAYERS):
        for member in members:
            if (module == member or module.startswith(member + ".")) and len(member) > best:
                best, rank = len(member), index
    assert rank is not None, f"{module}: not in any layer of LAYERS; place it there"
    return rank


def test_the_graph_sees_imports_inside_functions(tmp_path):
    (tmp_path / "low.py").write_text("def f():\n    from high import g\n")
    (tmp_path / "high.py").write_text("import low\n")
    graph = import_graph(tmp_path)
    assert graph == {"low": {"high"}, "high": {"low"}}
    assert find_cycle(graph) in (["high", "low", "high"], ["low", "high", "low"])


def test_no_import_cycle_between_the_project_modules():
    graph = import_graph()
    assert "inspection.scoring" in graph and "models.patchcore" in graph  # the walk found the project
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_imports_point_down_the_layers():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)
