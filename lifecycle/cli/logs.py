"""Logging for the command line: the only place in the package that attaches a handler.

The library logs through stdlib :mod:`logging` under the ``lifecycle`` logger
(:mod:`lifecycle.logs`); the command line gives that logger one handler, on
stderr, whose :class:`structlog.stdlib.ProcessorFormatter` renders each event
as structlog did before: readable on a terminal, JSON lines otherwise.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["configure_logging"]

_HANDLER_NAME = "lifecycle.cli"
"""The name of the handler :func:`configure_logging` attaches, and replaces when called again."""

_WIRE_LOGGER = "lifecycle.console_proxy.websockets"
"""The websockets library's lines in the console proxy: warnings and errors only, as before the handler."""


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Log the library's lines at ``level`` and above to stderr: readable on a terminal, JSON lines otherwise."""
    import logging

    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    if use_json and "structlog" not in sys.modules and "rich" not in sys.modules:
        _import_structlog_without_rich()
    import structlog

    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    handler = logging.StreamHandler(_Stderr())
    handler.name = _HANDLER_NAME
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                renderer,
            ]
        )
    )
    logger = logging.getLogger("lifecycle")
    for old in [h for h in logger.handlers if h.name == _HANDLER_NAME]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logging.getLogger(_WIRE_LOGGER).setLevel(logging.WARNING)


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


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written, as the handler's stream.

    Looked up per line, not captured once: whoever swaps sys.stderr later
    (a test runner, a daemon manager) still gets the log lines.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
