"""The package's layering, read from the source: frontdoor -> serving -> engine -> parallel -> model,
each importing only downward; harmony, config, metrics, logs, memory, procfs, protogen and sockets are leaves any layer may
use; bench, simulate, tiny (gpt-oss-tiny's curriculum, training and eval) and cli are tools on top
that no layer imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cluster"
LAYERS = ("model", "parallel", "engine", "serving", "frontdoor")  # bottom to top
LEAVES = {"harmony", "config", "metrics", "logs", "memory", "procfs", "protogen", "sockets"}
TOOLS = {"bench", "simulate", "tiny", "cli", "__main__", "__init__"}


def unit_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def cluster_imports(path: Path) -> set[str]:
    """The top-level cluster units `path` imports (absolute imports; relative ones stay inside)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[1] for name in names if name.startswith("cluster."))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_unit_is_classified():
    units = {unit_of(p) for p in SOURCES}
    assert units <= set(LAYERS) | LEAVES | TOOLS, units - (set(LAYERS) | LEAVES | TOOLS)


@pytest.mark.parametrize("path", [p for p in SOURCES if unit_of(p) not in TOOLS],  # tools may use any layer
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_only_downward(path: Path):
    unit = unit_of(path)
    for target in cluster_imports(path) - {unit}:
        assert target not in TOOLS, f"{path.relative_to(PACKAGE)} imports the tool package cluster.{target}"
        if unit in LEAVES:
            assert target in LEAVES, f"leaf cluster.{unit} imports cluster.{target} ({path.relative_to(PACKAGE)})"
        elif target in LAYERS:
            assert LAYERS.index(target) < LAYERS.index(unit), \
                f"{path.relative_to(PACKAGE)} imports upward: cluster.{unit} -> cluster.{target}"


def test_the_checker_reads_absolute_imports(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("from cluster.frontdoor.server import serve\nimport cluster.engine.core\n")
    assert cluster_imports(bad) == {"frontdoor", "engine"}


# ---- Ray Serve's private API lives in one module ---------------------------------------------------

SERVE_INTERNALS = PACKAGE / "serving" / "serve_internals.py"


def _serve_private_names() -> set[str]:
    """Underscore names Ray Serve defines (attributes set on self, methods, dataclass fields,
    keyword parameters), read from its installed source."""
    import ray.serve

    names = set()
    for path in Path(ray.serve.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
                names.update(a.arg for a in node.args.args + node.args.kwonlyargs)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__") and len(n) > 2}


def _own_names() -> set[str]:
    """Underscore names our own package defines (so `self._lock` of ours is not taken for Serve's)."""
    names = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
    return names


def serve_internals_used(path: Path, serve_private: set[str]) -> list[str]:
    """`ray.serve._private` imports, and in a module that imports Ray (the ones holding Serve
    objects; torch has underscore names of its own), Serve-private names: attributes, keywords,
    string keys."""
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    holds_serve_objects = any(name == "ray" or name.startswith("ray.") for name in imported)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("ray.serve._private")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ray.serve._private"):
            found.append(node.module)
        elif not holds_serve_objects:
            continue
        elif isinstance(node, ast.Attribute) and node.attr in serve_private:
            found.append(f".{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg in serve_private:
            found.append(f"{node.arg}=")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in serve_private:
            found.append(repr(node.value))
    return found


@pytest.fixture(scope="module")
def serve_private() -> set[str]:
    return _serve_private_names() - _own_names()


@pytest.mark.parametrize("path", [p for p in SOURCES if p != SERVE_INTERNALS], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_serve_internals_touches_serve_private_api(path: Path, serve_private: set[str]):
    used = serve_internals_used(path, serve_private)
    assert not used, f"{path.relative_to(PACKAGE)} uses Ray Serve internals {used}: go through serving/serve_internals.py"


def test_the_serve_internals_checker_sees_each_kind_of_touch(tmp_path: Path, serve_private: set[str]):
    assert serve_internals_used(SERVE_INTERNALS, serve_private)  # the one module that may
    bad = tmp_path / "bad.py"
    bad.write_text("from ray.serve._private.constants import X\nimport ray\nh._router\nh._init(_run_router_in_separate_loop=False)\n"
                   "opts = {'_by_reference': False}\n")
    assert serve_internals_used(bad, serve_private) == [
        "ray.serve._private.constants", "._router", "._init", "_run_router_in_separate_loop=", "'_by_reference'"]


def test_model_imports_nothing_from_the_layers_above():
    for path in (PACKAGE / "model").rglob("*.py"):
        assert not cluster_imports(path) & {"parallel", "engine", "serving", "frontdoor"}, path
