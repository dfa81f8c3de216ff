"""No import cycles inside the peftbooth package, function-level imports included.

A cycle that only works because one side imports inside a function is still a cycle: neither module can be read,
tested or moved without the other. The walk reads every module's source (no import is executed), collects every
Import / ImportFrom node wherever it sits, resolves relative imports, and looks for cycles among peftbooth modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import peftbooth

PACKAGE = "peftbooth"
ROOT = Path(peftbooth.__file__).parent



def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module an ImportFrom names: 'from ..config.sections import X' inside
    peftbooth.runs.formats.common -> 'peftbooth.runs.config.sections'."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The peftbooth modules `name` imports anywhere in its source: `from . import x` counts as importing
    peftbooth.x when that is a module, else the package itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node, name, path.name == "__init__.py")
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # 'peftbooth.formats.common.read_run' -> 'peftbooth.formats.common'
                t = t.rpartition(".")[0]
            if t and t.startswith(PACKAGE) and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def one_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest path start -> ... -> start inside a component, for the error message."""
    members, start = set(comp), comp[0]
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & members):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return comp


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "peftbooth" / "sub" / "mod.py"
    src.parent.mkdir(parents=True)
    src.write_text("def f():\n    from ..config import UsageError\n    from . import other\n")
    known = {"peftbooth", "peftbooth.config", "peftbooth.sub", "peftbooth.sub.mod", "peftbooth.sub.other"}
    assert imports_of("peftbooth.sub.mod", src, known) == {"peftbooth.config", "peftbooth.sub.other"}


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    message = "\n".join(" -> ".join(one_cycle(graph, c)) + f"   (component: {', '.join(c)})" for c in found)
    assert not found, f"import cycles in peftbooth:\n{message}"

