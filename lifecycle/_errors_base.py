"""The roots of the exception tree (see :mod:`lifecycle.errors`, where every error is imported from)."""

from __future__ import annotations

__all__ = ["InvalidInput", "LifecycleError", "text"]


def text(value: object) -> str:
    return "none" if value is None else str(value)


class LifecycleError(Exception):
    """Root of every error raised by lifecycle."""


class InvalidInput(LifecycleError):
    """An argument was rejected before anything changed."""


for _error in (LifecycleError, InvalidInput):
    _error.__module__ = "lifecycle.errors"  # where every error is imported from, and how tracebacks name it
