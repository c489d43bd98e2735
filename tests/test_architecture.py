"""The package's import graph: no import cycles (function-level imports count: they are dependencies too) and no
module importing another module's private (``_name``) names."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _graph(root: Path) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> modules it imports, (module, source, name) for each private name imported from elsewhere)."""
    mods = _modules(root)
    top = root.name
    edges: dict[str, set[str]] = {}
    private = []
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not source.split(".")[0] == top:
                    continue
                for alias in node.names:
                    target = f"{source}.{alias.name}" if f"{source}.{alias.name}" in mods else source
                    deps.add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target != name:
                        private.append((name, source, alias.name))
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == top}
        edges[name] = {d for d in deps if d in mods and d != name}
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_and_no_private_imports() -> None:
    edges, private = _graph(SRC / "token2wav")
    assert len(edges) > 50  # the whole package was read
    assert _cycles(edges) == []
    assert private == []


def test_the_checks_find_a_cycle_and_a_private_import(tmp_path: Path) -> None:
    pkg = tmp_path / "fakepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")  # a lazy import is still a dependency
    (pkg / "sub" / "b.py").write_text("from ..a import _hidden\n")
    edges, private = _graph(pkg)
    assert _cycles(edges) == [["fakepkg.a", "fakepkg.sub.b"]]
    assert private == [("fakepkg.sub.b", "fakepkg.a", "_hidden")]
