"""The package's layering, read from the source: frontdoor -> serving -> engine -> parallel -> model,
each importing only downward; harmony, config, metrics, logs and protogen are leaves any layer may
use; bench, simulate, tiny (gpt-oss-tiny's curriculum, training and eval) and cli are tools on top
that no layer imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cluster"
LAYERS = ("model", "parallel", "engine", "serving", "frontdoor")  # bottom to top
LEAVES = {"harmony", "config", "metrics", "logs", "protogen"}
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
