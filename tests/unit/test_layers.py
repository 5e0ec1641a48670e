"""Layers: a module imports only modules of its own layer or of layers below it, and the
import graph has no circle (imports under TYPE_CHECKING and inside functions count too).

    0  errors, payloads, settings, checks, forksafe, embedded
    1  storage/
    2  definitions, flow, runtime/
    3  coordinator/, controls, signals, tasks, runs, receipt, integration
    4  app (Durable, the façade users see) and the package's __init__
    5  cli, testing, demo
"""

from __future__ import annotations

import ast
from pathlib import Path

import durable_celery

PACKAGE = Path(durable_celery.__file__).resolve().parent

LAYERS: dict[str, int] = {
    "errors": 0, "payloads": 0, "settings": 0, "checks": 0, "forksafe": 0, "embedded": 0,
    "storage": 1,
    "definitions": 2, "runtime": 2, "flow": 2,
    "coordinator": 3, "controls": 3, "signals": 3, "tasks": 3, "runs": 3, "receipt": 3,
    "integration": 3,
    "app": 4, "": 4,
    "cli": 5, "testing": 5, "demo": 5, "demo_worker": 5,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int:
    """The layer of a module inside the package (``""`` is the package itself)."""
    return LAYERS[name.split(".")[0]]


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, source: str) -> set[str]:
    """Package modules that ``source`` (the module ``name``) imports, anywhere in it."""
    is_package = name == "" or MODULES[name].name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
                module = f"durable_celery.{module}" if module else "durable_celery"
            else:
                module = node.module or ""
            targets = [(module, a.name) for a in node.names]
        else:
            continue
        for module, attr in targets:
            if module != "durable_celery" and not module.startswith("durable_celery."):
                continue
            inner = module.removeprefix("durable_celery").removeprefix(".")
            if attr is not None and (f"{inner}.{attr}" if inner else attr) in MODULES:
                inner = f"{inner}.{attr}" if inner else attr
            while inner not in MODULES:  # a name imported from a module's parent
                inner = inner.rpartition(".")[0]
            if inner != name:
                found.add(inner)
    return found


GRAPH = {name: imports_of(name, path.read_text()) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    unknown = sorted(n for n in MODULES if n.split(".")[0] not in LAYERS)
    assert unknown == [], f"add these modules to LAYERS: {unknown}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = sorted(f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
                    for name, deps in GRAPH.items() for dep in deps
                    if layer_of(dep) > layer_of(name))
    assert upward == []


def test_no_module_below_the_facade_imports_it() -> None:
    assert sorted(n for n, deps in GRAPH.items() if "app" in deps) == ["", "cli", "testing"]


def test_the_import_graph_has_no_circle() -> None:
    assert cycles(GRAPH) == []


def test_the_detector_sees_what_it_must(tmp_path: Path) -> None:
    """Guards for the guard: type-only, function-local and relative imports all count,
    and the cycle finder finds a circle."""
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from durable_celery.app import Durable\n"
              "def f():\n    from durable_celery import signals\n"
              "from ..storage import store\n")
    assert imports_of("runtime.executor", source) == {"app", "signals", "storage.store"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert "storage.store" in GRAPH["runtime.executor"]
