"""Architecture rules the linters do not check: functions short enough to read top to bottom."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ddgm", "pipeline")
MAX_FUNCTION_LINES = 60


def long_functions(source: str, limit: int) -> list[tuple[str, int, int]]:
    """(qualified name, def line, length) of every function or method in ``source`` whose span from its
    ``def`` line to its last line is longer than ``limit`` lines; nested functions count on their own."""
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                if length > limit:
                    found.append((name, child.lineno, length))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_long_functions_counts_from_the_def_line_and_finds_methods_and_nested_functions() -> None:
    source = textwrap.dedent(
        """
        class A:
            def m(self):
                a = 1
                b = 2
                return a + b

        def f():
            def inner():
                return 1
            x = inner()
            return x
        """
    )
    assert long_functions(source, 3) == [("A.m", 3, 4), ("f", 8, 5)]
    assert long_functions(source, 4) == [("f", 8, 5)]
    assert long_functions(source, 1) == [("A.m", 3, 4), ("f", 8, 5), ("f.inner", 9, 2)]
    assert long_functions(source, 5) == []


def test_no_function_in_the_packages_is_longer_than_60_lines() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} {name} ({length} lines)"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for name, line, length in long_functions(path.read_text(encoding="utf-8"), MAX_FUNCTION_LINES)
    ]
    assert not offenders, f"functions longer than {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(offenders)
