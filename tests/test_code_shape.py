"""The shape a newcomer can hold in their head: short modules, small classes, the store and facade as groups."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lifecycle
from lifecycle.engine import Engine
from lifecycle.store import Store

ROOT = Path(__file__).resolve().parent.parent
# lifecycle/drivers links to drivers/ (pathlib's rglob does not follow it): each file once, by its source path
SOURCES = sorted([*(ROOT / "lifecycle").rglob("*.py"), *(ROOT / "drivers").rglob("*.py")])


def _module(path: Path) -> str:
    """The module a source file is imported as: drivers/ installs as lifecycle.drivers."""
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    return f"lifecycle.{name}" if name.startswith("drivers") else name


MAX_LINES = 400
MAX_PUBLIC_METHODS = 40


def _public_methods(cls: type) -> set[str]:
    """The public callables and properties a class offers, inherited ones included (what a reader must learn)."""
    return {
        name
        for klass in cls.__mro__
        if klass.__module__.split(".")[0] == "lifecycle"  # not str's, Enum's or tuple's
        for name, value in vars(klass).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, (property, staticmethod, classmethod)))
    }


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_400_lines(path: Path) -> None:
    """Every module of lifecycle/ and drivers/ is at most 400 lines: past that, it holds more than one concern."""
    lines = path.read_text().count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by concern"


def test_no_class_has_more_than_40_public_methods() -> None:
    """No class defined in lifecycle/ or drivers/ offers more than 40 public methods, inherited ones included."""
    too_big = {}
    for path in SOURCES:
        module = _module(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                mod = __import__(module, fromlist=["_"])
                cls = getattr(mod, node.name, None)
                if isinstance(cls, type):
                    count = len(_public_methods(cls))
                    if count > MAX_PUBLIC_METHODS:
                        too_big[f"{module}.{node.name}"] = count
    assert too_big == {}


def test_the_facade_keeps_instance_operations_and_groups_the_rest_by_noun() -> None:
    """Engine offers the instance operations and reads; hosts, images, feed, duties and consoles are groups on it."""
    methods = _public_methods(Engine)
    assert {"create", "start", "delete", "run", "get", "list", "history", "recover"} <= methods
    assert not {"add_host", "add_image", "changes", "audit", "heartbeat", "sync", "driver"} & methods
    engine_groups = {"hosts", "images", "feed", "duties", "consoles"}
    source = (ROOT / "lifecycle" / "engine.py").read_text()
    for group in engine_groups:
        assert f"self.{group} = " in source, group
    assert lifecycle.Engine is Engine


def test_the_store_is_a_composition_of_repositories() -> None:
    """Store has no mixins and offers only close: every read and write is on a per-noun repository."""
    assert Store.__bases__ == (object,)
    assert _public_methods(Store) == {"close", "engine", "url", "lease", "clock"}
