"""The library's loggers: structlog at the call site, stdlib :mod:`logging` underneath, quiet unless configured.

Modules log with ``log = get_logger(__name__)`` and ``log.info("event_name", key=value)``,
as with structlog, but each line is a :class:`logging.LogRecord` of the stdlib
logger of the module's name (``lifecycle.tasks``, ``lifecycle.drivers.libvirt...``),
so an application's ``logging`` configuration decides what is shown and where:

- a :class:`logging.NullHandler` on the ``lifecycle`` logger: with nothing
  configured nothing is printed (not even through :data:`logging.lastResort`);
- levels are the stdlib's: a level the logger is not enabled for costs one
  :meth:`logging.Logger.isEnabledFor` (cached by :mod:`logging`) and no event dict;
- the library's own processor chain, whatever the application gave
  ``structlog.configure``: the ids bound with :mod:`structlog.contextvars`
  (instance, task, request) are merged into every record;
- each record carries the event twice: ``record.msg`` is the event dict,
  which prints as ``event key=value ...`` (so a plain ``logging.basicConfig``
  reads well), and each key is also an attribute of the record (``record.event``,
  ``record.instance_uuid``, ...; ``record.message_`` for a key ``message``, which the
  record has already) for JSON formatters. The record also carries
  what :class:`structlog.stdlib.ProcessorFormatter` looks for, so an
  application formatting with it sees the library's events as its own.

Only the command line (:mod:`lifecycle.cli.logs`) attaches a handler.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = ["LibraryLogger", "LogEvent", "get_logger", "quiet_transitions"]

logging.getLogger("lifecycle").addHandler(logging.NullHandler())

_RESERVED: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "exc_info", "stack_info"}
"""Names a record already has (or that ``logging`` refuses in ``extra``): such a key is the attribute ``key_``."""


class LogEvent(dict[str, Any]):
    """One event: ``event`` (its name) and its keys; prints as ``event key=value ...``.

    ``record.msg`` of the library's records, rendered only when a handler formats it.
    """

    def __str__(self) -> str:
        words = [str(self.get("event"))]
        words += [f"{key}={_value(value)}" for key, value in self.items() if key not in ("event", "exc_info")]
        return " ".join(words)


def _value(value: Any) -> str:
    text = str(value)
    if text and not any(c.isspace() or c in "\"='" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _to_record(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> tuple[Any, ...]:
    """Return the arguments of :meth:`logging.Logger.log` for ``event_dict`` (the last processor)."""
    exc_info = _exc_info(event_dict.pop("exc_info", None))
    event = LogEvent(event_dict)
    if exc_info is not None:
        event["exc_info"] = exc_info  # for ProcessorFormatter's format_exc_info; the record has it too
    extra = {key + "_" if key in _RESERVED else key: value for key, value in event_dict.items()}
    extra["_logger"], extra["_name"] = logger, method_name  # what ProcessorFormatter recognizes
    return (event,), {"extra": extra, "exc_info": exc_info}


def _exc_info(value: Any) -> Any:
    """Return ``exc_info=True`` (or an exception) as the tuple a record keeps: resolved now, not when formatted."""
    if not value:
        return None
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple):
        return value
    return sys.exc_info() if sys.exc_info()[0] is not None else None


_PROCESSORS: Final = (structlog.contextvars.merge_contextvars, _to_record)


class LibraryLogger(structlog.BoundLoggerBase):
    """A structlog bound logger writing stdlib records; a disabled level returns before any work."""

    _logger: logging.Logger

    def debug(self, event: str, **kw: Any) -> None:
        """Log ``event`` at DEBUG."""
        if self._logger.isEnabledFor(logging.DEBUG):
            self._emit(logging.DEBUG, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        """Log ``event`` at INFO."""
        if self._logger.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        """Log ``event`` at WARNING."""
        if self._logger.isEnabledFor(logging.WARNING):
            self._emit(logging.WARNING, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        """Log ``event`` at ERROR."""
        if self._logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, "error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        """Log ``event`` at ERROR with the exception being handled."""
        if self._logger.isEnabledFor(logging.ERROR):
            kw.setdefault("exc_info", True)
            self._emit(logging.ERROR, "error", event, kw)

    def _emit(self, level: int, method_name: str, event: str, kw: dict[str, Any]) -> None:
        args, kwargs = self._process_event(method_name, event, kw)
        # stacklevel 3: the record names the line that logged, not this module
        self._logger.log(level, *args, stacklevel=3, **kwargs)


def get_logger(name: str) -> LibraryLogger:
    """Return the logger of module ``name`` (which must be under ``lifecycle``): call it with ``__name__``."""
    return LibraryLogger(logging.getLogger(name), _PROCESSORS, {})


def quiet_transitions() -> None:
    """Keep the ``transitions`` logger at WARNING, unless the application set a level on it already.

    ``transitions`` logs each state change of the machines in :mod:`lifecycle.graph` at INFO and DEBUG
    (four lines per operation), which says nothing the library's own lines do not. Called when the
    machines are built: an application that wants those lines sets the ``transitions`` logger's level
    before the first operation, or at any time after.
    """
    transitions_log = logging.getLogger("transitions")
    if transitions_log.level == logging.NOTSET:
        transitions_log.setLevel(logging.WARNING)
