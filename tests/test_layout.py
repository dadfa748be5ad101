"""The package's shape: no import cycle anywhere, no module over the size limit, and the top-level
``recipes/`` and ``calibration/`` folders import nothing of the package but ``binarize.errors``."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where each installed package's source lives (pyproject's package-dir)
PACKAGES = {"binarize": ROOT / "binarize", "binarize.calibration": ROOT / "calibration",
            "binarize.recipes": ROOT / "recipes"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if name.startswith("binarize.calibration") and pkg == "binarize" or \
               name.startswith("binarize.recipes") and pkg == "binarize":
                continue  # a symlink or stray copy: the package-dir mapping decides
            mods[name] = f
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports, at any depth of the file (function-level imports count)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            # the longest known module the import names (``from .x import y``: y may be a module)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_sees_the_package():
    graph = _graph()
    assert {"binarize.cli", "binarize.train.run", "binarize.formats.registry", "binarize.calibration.streams"} <= set(graph)
    assert "binarize.train.loop" in graph["binarize.train.run"]  # relative imports resolve
    assert "binarize.formats.latent" in graph["binarize.loading"]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_top_level_folders_import_only_errors_from_the_package():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith(("binarize.calibration", "binarize.recipes")):
            outside = {d for d in deps if not d.startswith(("binarize.calibration", "binarize.recipes"))}
            assert outside <= {"binarize.errors"}, (name, outside)
