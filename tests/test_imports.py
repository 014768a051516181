"""The ``nanoseek`` package has no import cycles, counting imports inside functions and package ``__init__`` files."""

import ast
from pathlib import Path

import nanoseek

PACKAGE = Path(nanoseek.__file__).parent


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (module level, in functions, in classes).
    ``from a import b`` imports ``a.b`` when that is a module, else ``a``; importing ``a.b`` also runs ``a``'s
    ``__init__``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 parents
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    found = {m for m in found if m in known}
    # importing a.b.c first runs the __init__ of a and a.b: an edge unless it is a package this module is in
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    return (found | (parents & known) - own) - {name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def subpackage_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same imports between the package's top-level units, a subpackage counting as one: ``train.rl ->
    evaluate -> train.rollout`` is a cycle through ``train``."""

    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    out: dict[str, set[str]] = {}
    for v, ws in edges.items():
        out.setdefault(unit(v), set()).update(unit(w) for w in ws if unit(w) != unit(v))
    return out


def components(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(set(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each component, as a path ``[a, b, ..., a]``."""
    return [_cycle_in(edges, component) for component in components(edges)]


def _cycle_in(edges: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first within the component)."""
    start = min(component)
    parent = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(edges[v] & component):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle in component {component}")


def test_resolves_submodules_relative_and_function_level_imports(tmp_path):
    """The walker sees what the package test relies on: a function-level import, ``from pkg import submodule``,
    a relative import and a package ``__init__``'s imports are edges; a name imported from a module is not."""
    (tmp_path / "__init__.py").write_text("from pkg.a import thing\n")
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text("from . import a\nfrom pkg.a import f\n")
    known = {"pkg", "pkg.a", "pkg.b"}
    assert imports("pkg", tmp_path / "__init__.py", known) == {"pkg.a"}
    assert imports("pkg.a", tmp_path / "a.py", known) == {"pkg.b"}
    assert imports("pkg.b", tmp_path / "b.py", known) == {"pkg.a"}
    assert cycles({"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}) == [["pkg.a", "pkg.b", "pkg.a"]]
    (tmp_path / "c.py").write_text("from pkg.sub.x import y\n")
    assert imports("pkg.c", tmp_path / "c.py", known | {"pkg.sub", "pkg.sub.x"}) == {"pkg.sub", "pkg.sub.x"}
    layers = subpackage_graph({"p.s.a": {"p.b"}, "p.b": {"p.s.c"}, "p.s.c": set()})
    assert cycles(layers) == [["p.b", "p.s", "p.b"]]


def test_graph_covers_the_whole_package():
    g = graph()
    assert {"nanoseek", "nanoseek.config", "nanoseek.model.transformer", "nanoseek.serve.app"} <= set(g)


def _report(edges: dict[str, set[str]]) -> str:
    lines = []
    for component in components(edges):
        cycle = _cycle_in(edges, component)
        rest = sorted(component - set(cycle))
        lines.append(" -> ".join(cycle) + (f"  (in the same cycle: {', '.join(rest)})" if rest else ""))
    return "\n".join(lines)


def test_no_import_cycles():
    report = _report(graph())
    assert not report, "import cycles between modules:\n" + report


def test_no_import_cycles_between_subpackages():
    report = _report(subpackage_graph(graph()))
    assert not report, "import cycles between subpackages and modules:\n" + report


def test_model_layers():
    """hf.py does not import the model; block / mtp / moe / attention do not import transformer (no hf <->
    transformer <-> mtp cycle)."""
    g = graph()
    assert not {m for m in g["nanoseek.hf"] if m.startswith("nanoseek.model")}
    for module in ("nanoseek.model.block", "nanoseek.model.mtp", "nanoseek.model.moe", "nanoseek.model.attention"):
        assert "nanoseek.model.transformer" not in g[module], module
    assert "nanoseek.model.block" in g["nanoseek.model.mtp"]
