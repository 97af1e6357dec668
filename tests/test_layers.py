"""The import graph runs downward: no module imports one from a higher layer (checked on the source,
function-local imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "volumefusion"

# Lowest first; a module may import from its own layer or any layer below.
LAYERS = [
    {"volumefusion", "deprecated", "log", "files", "geometry", "io", "processes", "typed_config", "nnunet_plans",
     "config", "checkpoint", "device", "preprocess", "metrics", "augment", "viz"},
    {"data", "fusion", "nets"},
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
