"""No module of the package spells an operation's name as a string, outside the operation's own record (issue 26).

An operation's record is its row (:mod:`lifecycle.graph` and the modules it
is split into) and its module under ``lifecycle/operations/``. Everywhere
else an operation is named through :class:`lifecycle.graph.Op` or read from
the table, so that adding, renaming or removing one touches its record only.
Docstrings are prose and are skipped, and so is another program's command
line (``["qemu-img", "create", ...]``: qemu-img's vocabulary); every other
string constant counts, f-string parts included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lifecycle
from lifecycle.graph import Op

_PACKAGE = Path(lifecycle.__file__).parent
_RECORD = frozenset({"graph.py", "graph_rows.py", "graph_types.py"})
"""The table's modules, relative to the package: they spell every operation's name once."""
_PROGRAMS = frozenset({"qemu-img"})
"""Programs whose argument lists the package writes out: their subcommands are theirs, not operations."""


def _allowed(relative: Path) -> bool:
    """Return whether ``relative`` (a path inside the package) is part of an operation's record."""
    parts = relative.parts
    if len(parts) == 1:
        return parts[0] in _RECORD
    return len(parts) == 2 and parts[0] == "operations" and parts[1] != "__init__.py"


def _skipped(tree: ast.AST) -> set[int]:
    """Return the ids of the string constants that are a docstring or part of another program's command line."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
        if isinstance(node, ast.List | ast.Tuple) and node.elts:
            program = node.elts[0]
            if isinstance(program, ast.Constant) and program.value in _PROGRAMS:
                found.update(id(e) for e in node.elts)
    return found


def literals(source: str, names: frozenset[str]) -> list[tuple[int, str]]:
    """Return (line, value) for each string constant of ``source`` that is one of ``names``, as skipped above."""
    tree = ast.parse(source)
    skip = _skipped(tree)
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
        if id(node) not in skip
    )


def test_no_operation_name_is_spelled_outside_its_record() -> None:
    """Every string constant under lifecycle/ equal to an operation's name is in graph*.py or operations/<name>.py."""
    names = frozenset(op.value for op in Op)
    found = [
        f"{path.relative_to(_PACKAGE.parent)}:{line}: {value!r}"
        for path in sorted(_PACKAGE.rglob("*.py"))
        if not _allowed(path.relative_to(_PACKAGE))
        for line, value in literals(path.read_text(encoding="utf-8"), names)
    ]
    assert found == [], "operation names spelled outside their record (use graph.Op):\n" + "\n".join(found)


def test_the_scan_sees_strings_and_skips_only_docstrings_and_command_lines() -> None:
    """Plain strings, dict keys, f-string parts and list items naming an operation count; docstrings, qemu-img argv not."""
    source = '''"""stop"""
def f():
    """stop"""
    return {"stop": 1}
class C:
    """stop"""
    x = "stop"
y = f"{C}" "stop"
z = "stopping"
run(["qemu-img", "stop"])
run(["lifecycle", "stop"])
'''
    assert literals(source, frozenset({"stop"})) == [(4, "stop"), (7, "stop"), (8, "stop"), (11, "stop")]


def test_the_record_is_the_table_and_each_operation_module() -> None:
    """graph*.py and operations/<name>.py may spell names; operations/__init__.py and every other module may not."""
    assert _allowed(Path("graph_rows.py"))
    assert _allowed(Path("operations/power.py"))
    assert not _allowed(Path("operations/__init__.py"))
    assert not _allowed(Path("cli/operations.py"))
    assert not _allowed(Path("runner.py"))
