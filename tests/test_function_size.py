"""No function in cluster/ is longer than 60 lines or nested deeper than 4 blocks (bench/ and cli/,
the tools on top, excepted), but for the allow-list below, each entry with its reason.

Nesting counts the blocks around a statement (if, for, while, with, try, match); an `elif` is a
branch of its `if`, not a level deeper. A nested function or class is measured on its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cluster"
EXEMPT_DIRS = ("bench", "cli")
MAX_LINES, MAX_DEPTH = 60, 4
BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.TryStar, ast.Match)

# "path::qualified.name" -> why it stays as it is
ALLOWED: dict[str, str] = {}


def _depth(node: ast.AST, depth: int = 0) -> int:
    """The deepest block nesting under `node`, which sits `depth` blocks deep."""
    if isinstance(node, ast.If) and len(node.orelse) == 1 and isinstance(node.orelse[0], ast.If):
        deepest = _depth(node.orelse[0], depth)  # elif: a sibling branch
        children = [node.test, *node.body]
    else:
        deepest = depth
        children = list(ast.iter_child_nodes(node))
    for child in children:
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        deepest = max(deepest, _depth(child, depth + isinstance(child, BLOCKS)))
    return deepest


def _functions(node: ast.AST, prefix: str = ""):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")


def measure() -> dict[str, tuple[int, int]]:
    """Every function over a limit: "path::name" -> (lines, nesting)."""
    over = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.split("/")[0] in EXEMPT_DIRS:
            continue
        for name, fn in _functions(ast.parse(path.read_text(), rel)):
            lines, depth = fn.end_lineno - fn.lineno + 1, _depth(fn)
            if lines > MAX_LINES or depth > MAX_DEPTH:
                over[f"{rel}::{name}"] = (lines, depth)
    return over


def test_no_function_is_too_long_or_too_deep_outside_the_allow_list():
    over = measure()
    new = {k: v for k, v in over.items() if k not in ALLOWED}
    assert not new, "over 60 lines or 4 levels deep (lines, nesting): " + ", ".join(
        f"{k} {v}" for k, v in sorted(new.items()))


def test_the_allow_list_names_only_functions_still_over_a_limit():
    stale = sorted(set(ALLOWED) - set(measure()))
    assert not stale, f"no longer over a limit, remove from ALLOWED: {stale}"


def test_the_measure_sees_length_and_nesting():
    deep = "def f(x):\n" + "".join("    " * (i + 1) + f"if x > {i}:\n" for i in range(5)) + "    " * 6 + "pass\n"
    elifs = "def g(x):\n    if x:\n        pass\n" + "".join(f"    elif x == {i}:\n        pass\n" for i in range(9))
    long = "def h():\n" + "    x = 1\n" * 61
    (f,), (g,), (h,) = (ast.parse(src).body for src in (deep, elifs, long))
    assert _depth(f) == 5 and _depth(g) == 1
    assert h.end_lineno - h.lineno + 1 == 62
