"""The import graph, read from the source: no module imports itself back through others, and nothing that
only runs a trained model reaches the training package (so serving and chatting start without it)."""
from __future__ import annotations

import ast
from pathlib import Path

import scratchlm

ROOT = Path(scratchlm.__file__).parent
# What runs a trained model: none of it may need `scratchlm.train`, directly or through another module.
# (convert may: writing a run folder is writing a checkpoint the way training does.)
INFERENCE = ["scratchlm.infer", "scratchlm.serve", "scratchlm.chat", "scratchlm.loading", "scratchlm.viz",
             "scratchlm.eval", "scratchlm.runtime", "scratchlm.rundir"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the scratchlm modules it imports, at the top or inside functions alike."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_graph_walker_sees_lazy_imports():
    # an import inside a function counts: it is a dependency all the same
    graph = import_graph()
    assert "scratchlm.train.pretrain" in graph["scratchlm.cli"]


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ re-exporting its own modules is not a cycle between modules
    cycles = sorted(m for m in graph if m in reachable({k: {v for v in vs if not k.startswith(v + ".")}
                                                           for k, vs in graph.items()}, m))
    assert cycles == []


def test_inference_does_not_import_training():
    graph = import_graph()
    starts = [m for m in graph for prefix in INFERENCE if m == prefix or m.startswith(prefix + ".")]
    offenders = {m: sorted(r for r in reachable(graph, m) if r.startswith("scratchlm.train"))
                 for m in starts}
    assert {m: r for m, r in offenders.items() if r} == {}
