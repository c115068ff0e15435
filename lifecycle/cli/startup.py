"""How a command starts: the collector paused while it does, and the engine opened for the commands that use one.

Every command's parser names its handler (``set_defaults(handler=...)``), a
function of the parsed arguments made by :func:`command` or
:func:`engine_command`; the dispatch calls it once. Both end the start
(:func:`resume_gc`) just before the command's own work, after the engine
opened for those that use one.
"""

from __future__ import annotations

import argparse
import functools
import gc
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from typing import TypeAlias

    from lifecycle.engine import Engine

    Handler: TypeAlias = Callable[[argparse.Namespace], int | None]
    """What ``args.handler`` holds: run the command; return its exit status (None: 0)."""

__all__ = ["command", "engine_command", "pause_gc", "resume_gc", "with_translations_cached"]

_T = TypeVar("_T")

_gc_paused = False
"""Whether :func:`pause_gc` paused the collector and :func:`resume_gc` has yet to resume it."""


def pause_gc() -> None:
    """Pause the cyclic garbage collector while the command starts: imports, settings, the engine.

    They create a few hundred thousand objects that live as long as the
    process (modules, classes, SQLAlchemy's tables and compiled caches), and
    the collector walked them again and again as they piled up: about a
    sixth of ``lifecycle show``. Only a process of its own does this.
    """
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """Freeze what the start created (the collector never walks it again) and resume collecting."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


def with_translations_cached(build: Callable[[], _T]) -> _T:
    """Return ``build()``, with argparse's own messages translated once each rather than once per use.

    argparse passes its messages ("show this help message and exit", ...)
    through gettext for every parser and argument it makes, and gettext looks
    for catalog files anew on each call when it finds none: a few thousand
    stat() calls, two thirds of the time it takes to build the parser.
    """
    translate = argparse._  # type: ignore[attr-defined]
    argparse._ = functools.cache(translate)  # type: ignore[attr-defined]
    try:
        return build()
    finally:
        argparse._ = translate  # type: ignore[attr-defined]


def command(run: Callable[[argparse.Namespace], int | None]) -> Handler:
    """Return the handler of a command that opens no engine (or its own): the start ends, then ``run``."""

    def handler(args: argparse.Namespace) -> int | None:
        resume_gc()
        return run(args)

    return handler


def engine_command(
    run: Callable[[Engine, argparse.Namespace], int | None],
    *,
    before: Callable[[argparse.Namespace], None] | None = None,
) -> Handler:
    """Return the handler of a command on an engine: ``before`` (if any), open the engine, end the start, ``run``."""

    def handler(args: argparse.Namespace) -> int | None:
        from lifecycle.engine import Engine  # here: --help, graph and config show never import the engine

        if before is not None:
            before(args)
        with Engine(args.db, settings=args.settings) as engine:
            resume_gc()
            return run(engine, args)

    return handler
