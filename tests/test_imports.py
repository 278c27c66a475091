"""No import circles inside lowrank_pt: every shared piece sits where both sides import it
downward. Function-level imports count too: a circle deferred into a function is still one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "lowrank_pt"


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
    assert graph["lowrank_pt.trainer"], "the graph sees the trainer's imports"

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
