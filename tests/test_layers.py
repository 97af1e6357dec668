"""The import graph runs downward and has no circle: no module imports one from a higher layer, and no
chain of imports leads back to where it started (checked on the source, function-local imports included).

Two kinds of lazy re-export name their module as a string, resolved on first use, and so stand outside
the graph: the package's API (``volumefusion.__getattr__`` -> :mod:`volumefusion.api`) and the
deprecated aliases of moved names (:func:`volumefusion.deprecated.moved`). The tests at the end keep
lazy imports to those two (and the CLI loading its command modules by name), and import every module
first into a fresh package, where a circle the source does not show would break it."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "volumefusion"

# Lowest first; a module may import from its own layer or any layer below.
LAYERS = [
    {"volumefusion", "deprecated", "log", "files", "geometry", "io", "processes", "typed_config", "nnunet_plans",
     "pctnet_shape", "stats", "config", "device", "preprocess", "metrics", "augment", "viz"},
    {"data", "fusion", "nets"},
    {"checkpoint"},
    {"weights"},
    {"train", "infer", "evaluate"},
    {"api", "demo", "integrations"},
    {"commands", "cli", "__main__"},
]

# Known arrows against the grain, each with the reason it stays for now (none at present).
EXCEPTIONS: set[tuple[str, str]] = set()


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else parts[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module}: not assigned to a layer in tests/test_layers.py; add it to LAYERS")


def _module_name(path: Path) -> str:
    parts = ["volumefusion", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every volumefusion module ``path`` imports (``from volumefusion import nets`` -> ``volumefusion.nets``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "volumefusion"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "volumefusion":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file() or (
                    PACKAGE.parent / candidate.replace(".", "/")).is_dir()
                found.add(candidate if is_module else node.module)
    return found


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        _layer(_module_name(path))


def test_no_import_points_up_a_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for target in sorted(_imports(path)):
            if _layer(target) > _layer(module) and (module, target) not in EXCEPTIONS:
                upward.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_checker_sees_upward_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from volumefusion.train.engine import Trainer\nfrom volumefusion import nets\n")
    assert _imports(source) == {"volumefusion.train.engine", "volumefusion.nets"}
    assert _layer("volumefusion.train.engine") > _layer("volumefusion.data.store")


def _graph() -> dict[str, set[str]]:
    """Module -> the modules its imports execute: each named module and its packages, except the
    packages the importer itself lies in (they are initialising already when it runs)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        edges = graph.setdefault(module, set())
        for target in _imports(path):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name != module and not module.startswith(name + "."):
                    edges.add(name)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (or a module importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_import_graph_has_no_circle():
    circles = _circles(_graph())
    assert not circles, "modules importing each other:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_checker_sees_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"a"}}) == [["a"]] and _circles({"a": {"b"}, "b": set()}) == []


def test_modules_are_named_lazily_only_by_the_api_and_the_deprecated_aliases():
    lazy = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "import_module":
                lazy.setdefault(_module_name(path), 0)
                lazy[_module_name(path)] += 1
    # the package's API, the deprecated aliases, the CLI loading its command modules by name, and the
    # nnU-Net export probing whether timm (an optional library of nnU-Net's) imports
    assert set(lazy) == {"volumefusion", "volumefusion.deprecated", "volumefusion.cli",
                         "volumefusion.integrations.nnunet.export"}


ALIASED = ["volumefusion.io", "volumefusion.nets.weights"]


def test_the_deprecated_aliases_are_exactly_those_of_the_modules_that_lost_names():
    users = {_module_name(p) for p in PACKAGE.rglob("*.py")
             if re.search(r"^__getattr__ = moved\(__name__", p.read_text(encoding="utf-8"), re.M)}
    assert users == set(ALIASED)


@pytest.mark.parametrize("module", ALIASED)
def test_every_deprecated_alias_finds_its_name_in_its_new_home_below_or_beside_the_old(module):
    aliases = importlib.import_module(module).__getattr__.moved
    for name, home in aliases.items():
        assert hasattr(importlib.import_module(home), name), f"{module}.{name}: not in {home}"
        assert name not in vars(importlib.import_module(module)), f"{module}.{name} is defined there too"


def test_every_module_imports_on_its_own_without_pulling_in_the_api():
    """A circle hidden from the source (e.g. behind the package's lazy ``__getattr__``) shows when a
    module is imported first: each is imported into a fresh ``volumefusion`` (dependencies stay loaded)."""
    below_api = [m for m in sorted(map(_module_name, PACKAGE.rglob("*.py"))) if _layer(m) < _layer("volumefusion.api")
                 and m != "volumefusion.__main__"]
    above = [m for m in sorted(map(_module_name, PACKAGE.rglob("*.py"))) if m not in below_api
             and m != "volumefusion.__main__"]
    script = textwrap.dedent(f"""
        import importlib, sys
        problems = []
        for module in {below_api + above!r}:
            for loaded in [m for m in sys.modules if m == "volumefusion" or m.startswith("volumefusion.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(module)
            except Exception as exc:
                problems.append(f"{{module}}: {{type(exc).__name__}}: {{exc}}")
                continue
            if module in {below_api!r} and "volumefusion.api" in sys.modules:
                problems.append(f"{{module}}: importing it imports volumefusion.api")
        print("\\n".join(problems))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parents[1])
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
