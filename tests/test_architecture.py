"""The shape of the code: no import cycle between moelab's modules, counting the imports made
inside functions (a cycle hidden in a function is still a cycle) and the package `__init__`
that importing a submodule runs."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moelab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every moelab module that `path` imports anywhere in it (functions too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports the module a.b when there is one, else a's name b
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for target in imported_modules(path, modules):
            edges.add(target)
            # importing a.b.c runs a/__init__ and a/b/__init__ first, unless we are inside them
            parts = target.split(".")
            for i in range(1, len(parts)):
                ancestor = ".".join(parts[:i])
                if not (name == ancestor or name.startswith(ancestor + ".")):
                    edges.add(ancestor)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_between_moelab_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_a_cycle_hidden_in_a_function():
    graph = import_graph()
    assert "moelab.train.trainer" in graph["moelab.train"]  # the package runs its submodule
    # a function-level import back from a module the trainer uses closes a loop
    graph["moelab.clustering"] = graph["moelab.clustering"] | {"moelab.train.trainer"}
    assert find_cycle(graph) is not None


def evaluation_reached_from_training(graph: dict[str, set[str]]) -> list[str]:
    """'train module -> eval module' for every arrow from moelab.train into moelab.eval."""
    return [f"{name} -> {target}" for name, targets in sorted(graph.items())
            if name == "moelab.train" or name.startswith("moelab.train.")
            for target in sorted(targets)
            if target == "moelab.eval" or target.startswith("moelab.eval.")]


def test_training_imports_nothing_from_evaluation():
    """Training sits below evaluation: what both need (the posterior, its clustering and
    confidence) lives in moelab.clustering, the score cache in moelab.eval.cache."""
    arrows = evaluation_reached_from_training(import_graph())
    assert arrows == [], "moelab.train imports evaluation: " + "; ".join(arrows)


def test_the_layer_check_sees_an_arrow_into_evaluation():
    graph = import_graph()
    graph["moelab.train.validation"] = graph["moelab.train.validation"] | {"moelab.eval.lm"}
    assert evaluation_reached_from_training(graph) == [
        "moelab.train.validation -> moelab.eval.lm"]
