"""The package's shape (issue: one room per op): no import cycle among eman_fused's modules, and
`import eman_fused` loads no benchmark or command-line code."""
import ast
import subprocess
import sys
from pathlib import Path

import eman_fused

PACKAGE = Path(eman_fused.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(tree: ast.Module):
    """Import statements run at import time: the module body and its if/try blocks, not the
    bodies of functions or classes (imported lazily, when called)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)


def import_graph() -> dict[str, set[str]]:
    """module -> the eman_fused modules it imports at import time. `from pkg import name` is an
    edge to pkg.name where that is a module (a sibling), else to pkg."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # Compiled submodules (eman_fused._C) are modules too, and import nothing of ours.
    compiled = {f"eman_fused.{p.name.split('.')[0]}" for p in PACKAGE.glob("*.so")}
    graph = {name: set() for name in compiled}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in _module_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = node.module if node.level == 0 else ".".join(p for p in (base, node.module) if p)
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in files.keys() | compiled else module
                           for a in node.names]
            edges |= {t for t in targets if t in graph.keys() | files.keys() and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_finds_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_eman_fused():
    graph = import_graph()
    assert "eman_fused.ops.ema" in graph and "eman_fused.bench.cli" in graph
    assert "eman_fused.ops" in graph["eman_fused"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_import_eman_fused_loads_no_benchmark_or_cli_code():
    code = ("import sys, eman_fused\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('eman_fused.bench', 'eman_fused.__main__')))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
