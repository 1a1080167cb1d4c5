"""The package layout tells the story and keeps it: each folder imports only the layers
below it (util/config <- data <- models <- methods/core <- methods <- evaluation <- runs <-
analysis <- api <- cli), and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kedit"
LAYERS = ["util", "config", "data", "models", "methods.core", "methods", "evaluation", "runs", "analysis",
          "api", "cli", "__main__", "kedit"]


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "kedit"
    if parts[1] == "methods" and len(parts) > 2 and parts[2] == "core":
        return "methods.core"
    return parts[1]


def imports(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the kedit modules it imports (at module level only, or anywhere)."""
    out: dict[str, set[str]] = {}
    for f in ROOT.rglob("*.py"):
        mod = ".".join(f.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(f.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        found = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kedit":
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "kedit"}
        out[mod] = found
    return out


def test_every_import_points_down_the_layers():
    wrong = []
    for mod, targets in imports(top_level_only=False).items():
        for t in targets:
            a, b = layer(mod), layer(t)
            assert a in LAYERS and b in LAYERS, (mod, t)
            if a != b and LAYERS.index(b) > LAYERS.index(a):
                wrong.append(f"{mod} -> {t}")
    assert not wrong, wrong


def test_no_import_circle_between_modules():
    graph = imports(top_level_only=True)

    def resolve(name: str) -> str:   # "from kedit.methods.base import X" may name a package
        return name if name in graph else name.rsplit(".", 1)[0]

    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        state[m] = 1
        for t in sorted(resolve(x) for x in graph.get(m, ())):
            if t == m or t not in graph:
                continue
            if state.get(t) == 1:
                cycle.extend(path[path.index(t):] + [t] if t in path else [m, t])
                return True
            if t not in state and visit(t, path + [t]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if m not in state and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)
