"""Logging for the command line: the only place in the package that configures structlog."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["configure_logging"]


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog: readable on a terminal, JSON lines otherwise, to stderr."""
    import logging

    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    if use_json and "structlog" not in sys.modules and "rich" not in sys.modules:
        _import_structlog_without_rich()
    import structlog

    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _import_structlog_without_rich() -> None:
    """Import structlog with rich hidden: for JSON lines, which never use it.

    structlog imports its console renderer whenever it is imported, and that
    imports rich when installed (for pretty tracebacks): ~30 ms of a read
    command's start. Hidden while structlog loads, rich stays importable
    afterwards; only the console renderer of this process then formats
    tracebacks without it.
    """
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` raises ImportError, as if absent
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


def _stderr_logger(*_args: Any) -> Any:
    # Looked up per logger, not captured once: whoever swaps sys.stderr later
    # (a test runner, a daemon manager) still gets the log lines.
    import structlog

    return structlog.PrintLogger(sys.stderr)
