"""No import circles inside lowrank_pt: every shared piece sits where both sides import it
downward. Function-level imports count too: a circle deferred into a function is still one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "lowrank_pt"


def module_files() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_circles():
    files = module_files()
    graph = {name: imports_of(name, path, files) for name, path in files.items()}
    assert graph["lowrank_pt.trainer.trainer"], "the graph sees the trainer's imports"

    def path_back(start):
        """A chain of imports from ``start`` back to itself, or None."""
        stack, seen = [(start, [start])], set()
        while stack:
            node, chain = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return chain + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, chain + [nxt]))
        return None

    circles = [c for c in map(path_back, sorted(graph)) if c]
    assert not circles, " | ".join(" -> ".join(c) for c in circles)


def package_of(module: str) -> str:
    """``lowrank_pt.zero`` for ``lowrank_pt.zero.state``; a module at the package root is its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_circles_between_packages():
    # A package is one layer: if zero imports model and model imports zero, the layers are
    # tangled even when no two files import each other.
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        source = package_of(name)
        graph.setdefault(source, set()).update(package_of(t) for t in imports_of(name, path, files)
                                               if package_of(t) != source and t != "lowrank_pt")
    assert {"lowrank_pt.zero", "lowrank_pt.core", "lowrank_pt.trainer"} <= set(graph)
    assert "lowrank_pt.core" in graph["lowrank_pt.zero"], "the graph sees zero's imports of core"
    loops = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, chain = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    loops.append(" -> ".join(chain + [start]))
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, chain + [nxt]))
    assert not loops, "\n".join(loops)
