"""The package's import graph: no cycles, and the layering the design promises (the masking core imports no method;
methods import neither the trainer, the data, post-training nor the CLI). Every import counts, the ones inside
functions too: a deferred import hides a cycle, it does not remove it."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "regrow"

# (importer prefix, imported prefix): edges that must not exist.
FORBIDDEN = [
    ("regrow.masking", "regrow.methods"),
    ("regrow.methods", "regrow.training"),
    ("regrow.methods", "regrow.cli"),
    ("regrow.methods", "regrow.posttraining"),
    ("regrow.methods", "regrow.data"),
    ("regrow.structures", "regrow.methods"),
    ("regrow.criteria", "regrow.methods"),
    ("regrow.allocation", "regrow.methods"),
    ("regrow.schedules", "regrow.methods"),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            edges |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from . import masking`: the submodule
                    edges.add(sub)
                elif not (target == PACKAGE and alias.name == "__version__"):
                    # the facade's version string is set before the facade imports anything
                    edges.add(target)
    edges.discard(name)
    return {e for e in edges if e in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
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
                result.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    return result


def test_the_graph_is_read_at_all():
    g = graph()
    assert "regrow.masking" in g["regrow.methods.base"] and "regrow.methods.base" in g["regrow.methods.iee"]
    assert len(g) > 20


def test_no_import_cycles():
    # The facade (regrow/__init__) imports the public names; nothing inside may import it back except __version__.
    g = graph()
    inner = {k: v - {PACKAGE} for k, v in g.items() if k != PACKAGE}
    assert cycles(inner) == []
    assert [k for k, v in g.items() if PACKAGE in v and k != PACKAGE] == []


def test_forbidden_edges():
    g = graph()
    bad = [(a, b) for a, targets in g.items() for b in targets for src, dst in FORBIDDEN
           if (a == src or a.startswith(src + ".")) and (b == dst or b.startswith(dst + "."))]
    assert bad == []


def test_the_checks_would_see_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
