"""The package's import graph, read from the source: no cycle, and the user commands never reach the PyTorch
references or the test fixtures.

Every ``import`` counts, also those inside functions (the lazy imports a command makes on one of its paths), so
the rule holds on every path a command can take, not only on the one a run happens to exercise.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "zsp_jax"
# each command, and a module it reaches only through a lazy import (so the walk is seen to follow them)
COMMANDS = {"zsp_jax.main": "zsp_jax.train.loop", "zsp_jax.label.__main__": "zsp_jax.label.job",
            "zsp_jax.evaluate": "zsp_jax.train.checkpoint_eval"}
FORBIDDEN = ("zsp_jax.references", "tests")


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: pathlib.Path) -> set[str]:
    """Dotted names ``module`` imports anywhere in its source (``from a import b`` gives ``a.b``: a submodule or a
    name of ``a``, resolved by the caller)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(kept + ([node.module] if node.module else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:  # the innermost module of the package the name lies in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = {resolve(name) for name in _imported_names(module, path)}
        # a module reaching into tests/ is kept as "tests" (not a package module)
        targets |= {"tests" for name in _imported_names(module, path) if name.split(".")[0] == "tests"}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if not state.get(target):
                found = visit(target, path)
                if found:
                    return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if not state.get(module):
            found = visit(module, [])
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 100 and graph["zsp_jax.train.state"]  # the reading found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_would_be_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def _reached(graph: dict[str, set[str]], start: str) -> set[str]:
    reached, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph.get(module, ()))
    return reached


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_user_commands_reach_neither_references_nor_test_fixtures(command):
    graph = _graph()
    reached = _reached(graph, command)
    assert COMMANDS[command] in reached
    assert not sorted(m for m in reached if m.startswith(FORBIDDEN)), command


def test_the_walk_finds_the_references_where_they_are_imported():
    """The parity command runs the PyTorch originals: the same walk reaches them from it."""
    assert any(m.startswith("zsp_jax.references") for m in _reached(_graph(), "zsp_jax.parity.__main__"))
