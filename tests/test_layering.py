"""The import layering of the installed namespace (docs/architecture.md): runtime <- methods <-
models <- top; a module never imports from a layer above its own, not at module level, not inside
a function, not through ``importlib.import_module("...")``."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = ("runtime", "methods", "models", "top")
# Package prefixes of each layer above runtime; any other longseq module is runtime.
PREFIXES = {
    "methods": ("longseq.dsp", "longseq.zeco", "longseq.sp", "longseq.methods"),
    "models": ("longseq.models", "longseq.adapters"),
    "top": ("longseq.train", "longseq.benchmarks", "longseq.plot"),
}


def layer(module: str) -> str:
    for name in ("top", "models", "methods"):
        if any(module == p or module.startswith(p + ".") for p in PREFIXES[name]):
            return name
    return "runtime"


def modules() -> dict[str, Path]:
    """Every module of the namespace -> its file (every module lives where its name says)."""
    out = {}
    for f in (ROOT / "longseq").rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(module: str, path: Path, known: set) -> list[tuple[int, str]]:
    """(line, imported longseq module) for every import in the file, wherever it is."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def add(line, name):
        if name == "longseq" or name.startswith("longseq."):
            found.append((line, name))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(node.lineno, a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                add(node.lineno, sub if sub in known else base)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                add(node.lineno, str(node.args[0].value))
    return found


def violations(mods: dict[str, Path]) -> list[str]:
    known = set(mods)
    bad = []
    for mod, path in sorted(mods.items()):
        mine = LAYERS.index(layer(mod))
        for line, target in imports(mod, path, known):
            if LAYERS.index(layer(target)) > mine:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mod} ({layer(mod)}) imports {target} ({layer(target)})")
    return bad


def test_the_modules_are_found():
    mods = modules()
    for name in ("longseq.comm", "longseq.sp.plans", "longseq.dsp.plan", "longseq.zeco.sp_gla", "longseq.methods",
                 "longseq.models.registry", "longseq.adapters.latte", "longseq.train.loop",
                 "longseq.benchmarks.costmodel.ledger", "longseq.plot"):
        assert name in mods, name
    assert "longseq.models.adapters.latte" not in mods
    assert {layer(m) for m in mods} == set(LAYERS)


def test_no_module_imports_from_a_layer_above():
    assert violations(modules()) == []


def test_the_root_package_imports_only_the_runtime():
    mods = modules()
    got = imports("longseq", mods["longseq"], set(mods))
    assert got and all(layer(t) == "runtime" for _, t in got), got


@pytest.mark.parametrize("src", [
    "from longseq import train\n",
    "def f():\n    from longseq.models import stdit\n",
    "import importlib\n\ndef f():\n    return importlib.import_module('longseq.benchmarks.simulate')\n",
    "from ..models import stdit\n",
    "from longseq import comm, dsp\n",
])
def test_the_checker_sees_upward_imports(tmp_path, src):
    """A methods-layer module importing upward at module level, in a function, through importlib or
    relatively is caught; sideways and downward imports are not."""
    f = tmp_path / "fake.py"
    f.write_text(src)
    mods = modules()
    bad = [b for b in _violations_of("longseq.sp.fake", f, set(mods))]
    assert bool(bad) == ("dsp" not in src), bad


def _violations_of(mod, path, known):
    return [t for _, t in imports(mod, path, known) if LAYERS.index(layer(t)) > LAYERS.index(layer(mod))]
