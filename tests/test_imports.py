"""No import cycles among the sidecar's modules: no module imports, directly or through others, one that imports it.

Imports are read with ast, so those inside functions (the lazy ones) and under TYPE_CHECKING count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sidecar"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        # A module's import also runs its packages' __init__, but a package importing its own
        # submodules is not a cycle through them, so only the named modules count.
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for target in sorted(graph[node]):
            if target == path[0]:
                found.append([*path, target])
            elif target not in path and target > path[0]:  # each cycle once, from its smallest module
                visit(target, [*path, target])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_the_graph_is_read() -> None:
    graph = imports()
    assert "sidecar.store" in graph["sidecar.hook"] and "sidecar.process" in graph["sidecar.cli"]


def test_no_module_imports_one_that_imports_it() -> None:
    assert cycles(imports()) == []


def test_the_hook_and_grpc_know_no_provider_in_particular() -> None:
    graph = imports()
    for name in ("sidecar.hook", "sidecar.grpc_api.server"):
        assert not any(m.startswith("sidecar.providers.aliyun") for m in graph[name]), name
