"""The product's import graph: no module imports, at the top or inside a function, a module that imports it back.

Every top-level `*.py` of the repository is a product module; its imports are read with `ast` (so function-level
imports, which hide a cycle from Python at load time, count as much as top-level ones), and the graph among the
project's own modules must have no cycle.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules that `path` imports anywhere in its body (top level, functions, `if` blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & modules - {path.stem}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {p.stem: p for p in sorted(root.glob("*.py"))}
    return {name: project_imports(path, set(files)) for name, path in files.items()}


def shortest_path(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """The shortest import chain start -> ... -> goal (breadth-first), or None."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        if path[-1] == goal:
            return path
        for w in sorted(graph[path[-1]] - seen):
            seen.add(w)
            paths.append(path + [w])
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import a -> b that b imports back, directly or through others, as its shortest cycle a -> b -> ... -> a
    (each cycle once, written from its first module in sorted order), so a failure names the imports to remove."""
    found = set()
    for a in graph:
        for b in graph[a]:
            back = shortest_path(graph, b, a)
            if back:
                cycle = [a] + back[:-1]
                i = cycle.index(min(cycle))
                found.add(tuple(cycle[i:] + cycle[:i]))
    return [list(c) + [c[0]] for c in sorted(found)]


def test_the_graph_holds_the_known_imports():
    graph = import_graph(REPO)
    assert {"pipeline", "photoverse"} <= graph["sample"] and "attention" in graph["unet"]  # not an empty graph
    assert "sample" not in graph["photoverse"] and "sample" not in graph["losses"]        # the library, not the CLI


def test_a_cycle_is_found_and_named(tmp_path):
    """The check can fail: a function-level import back into a module is a cycle."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")
    (tmp_path / "c.py").write_text("import os\n\ndef g():\n    import a\n")
    (tmp_path / "d.py").write_text("import a\n")
    assert cycles(import_graph(tmp_path)) == [["a", "b", "c", "a"]]


def test_no_import_cycle_among_the_product_modules():
    found = cycles(import_graph(REPO))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)
