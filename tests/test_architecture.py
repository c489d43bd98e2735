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


# the networks' compute methods: only models/ (a flow calls its decoder) and streaming/compute.py call them
MODEL_CALLS = {"inference", "stream_start", "stream_step", "stream_step_rows", "solve_rows", "vocode_stream",
               "vocode_stream_rows"}


def _private_definitions(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, and attributes it assigns (``self._x = ...``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return {n for n in out if n.startswith("_") and not n.startswith("__")}


def _cross_module_private_uses(root: Path) -> list[tuple[str, str]]:
    """(module, name) for each ``obj._name`` used in a module that does not define ``_name``, where another module
    of the package does: reaching into another module's internals. ``self`` / ``cls`` uses are the module's own."""
    trees = {name: ast.parse(f.read_text(encoding="utf-8")) for name, f in _modules(root).items()}
    defined = {name: _private_definitions(tree) for name, tree in trees.items()}
    everywhere = set().union(*defined.values())
    found = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr in everywhere and node.attr not in defined[name]:
                found.append((name, node.attr))
    return sorted(set(found))


def _model_calls(root: Path) -> list[tuple[str, str]]:
    found = []
    for name, f in _modules(root).items():
        if ".models" in name or name.endswith("streaming.compute"):
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                fn = node.func
                called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
                if called in MODEL_CALLS:
                    found.append((name, called))
    return sorted(set(found))


def test_one_module_calls_the_networks_and_no_module_reaches_into_another() -> None:
    root = SRC / "token2wav"
    assert _model_calls(root) == []
    assert _cross_module_private_uses(root) == []
    text = "\n".join(f.read_text(encoding="utf-8") for f in root.rglob("*.py"))
    assert "ThreadedSession" not in text and "BatchedSession" not in text  # one session type, one compute path


def test_the_call_and_private_use_checks_find_offenders(tmp_path: Path) -> None:
    pkg = tmp_path / "fakepkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "flow.py").write_text("class F:\n    def _step(self):\n        return self.inference()\n")
    (pkg / "engine.py").write_text("def run(flow):\n    flow._step()\n    return flow.stream_step(None)\n")
    assert _model_calls(pkg) == [("fakepkg.engine", "stream_step")]
    assert _cross_module_private_uses(pkg) == [("fakepkg.engine", "_step")]
