"""Argument types and the shared parent parsers: how the command line's text becomes checked values.

Every type here raises :class:`argparse.ArgumentTypeError` naming the flag,
what it got and what it takes; the parser turns that into one line and exit
status 2 (:class:`Parser`). Values read like this are then checked again by
the engine, which trusts no caller.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from lifecycle import validation
from lifecycle.errors import InvalidInput

if TYPE_CHECKING:
    from datetime import datetime
    from typing import TypeAlias

    from lifecycle.feed import Position

    Commands: TypeAlias = argparse._SubParsersAction["Parser"]
    """What ``add_subparsers`` returns: where a command group adds its commands."""

__all__ = [
    "Parser",
    "actor",
    "count",
    "listen",
    "number",
    "one_to",
    "pairs",
    "parents",
    "position",
    "text",
    "when",
]


class Parser(argparse.ArgumentParser):
    """An argument parser whose refusals are :class:`InvalidInput`: one line, exit 2, and the --json error."""

    def error(self, message: str) -> NoReturn:
        """Raise :class:`InvalidInput` with argparse's message, instead of printing usage and exiting."""
        raise InvalidInput(f"{self.prog}: {message}")


def parents() -> tuple[Parser, Parser]:
    """Return the parents every command shares: ``--json``; and, for operations, the task options besides."""
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    task = Parser(add_help=False, parents=[common])
    task.add_argument(
        "--request-id", type=text("--request-id", 64), help="request id recorded on the task and audit rows"
    )
    task.add_argument(
        "--idempotency-key", type=text("--idempotency-key"), help="a repeat with the same key returns the first task"
    )
    task.add_argument("--no-wait", action="store_true", help="return the started task at once")
    task.add_argument(
        "--force", action="store_true", help="override the instance's lock (an admin's override, audited)"
    )
    return common, task


def actor(recorded: str) -> dict[str, Any]:
    """Return the keywords of an ``--actor`` option: who does it, ``$USER`` by default, said to be ``recorded``."""
    return {"type": text("--actor"), "default": os.environ.get("USER") or "cli", "help": f"who does it ({recorded})"}


def number(label: str, check: Callable[[str, float], float]) -> Callable[[str], float]:
    """Return an argparse type for seconds: ASCII text ``float()`` reads, then ``check`` (finite, in range)."""

    def convert(given: str) -> float:
        try:
            if not given.isascii() or "_" in given:
                raise ValueError(given)
            return check(label, float(given))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{label} must be a number of seconds, got {given!r}") from None
        except InvalidInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def count(label: str, low: int = 0) -> Callable[[str], int]:
    """Return an argparse type for an integer in ASCII digits that every database column holds (32-bit)."""

    def convert(given: str) -> int:
        digits = given.removeprefix("-")
        if not (digits.isascii() and digits.isdigit()):
            raise argparse.ArgumentTypeError(f"{label} must be a whole number in digits 0-9, got {given[:40]!r}")
        if len(digits) > 12:  # past 32 bits; int() of thousands of digits is slow, past 4300 refused
            raise argparse.ArgumentTypeError(
                f"{label} must be an integer from {low} to {validation.MAX_INT}, got {len(digits)} digits"
            )
        try:
            return validation.count(label, int(given), low=low)
        except InvalidInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def text(label: str, limit: int = 255) -> Callable[[str], str]:
    """Return an argparse type for a free-text identifier: 1 to ``limit`` printable characters."""

    def convert(given: str) -> str:
        bad = validation.unsafe_character(given)
        if not 1 <= len(given) <= limit or bad is not None:
            raise argparse.ArgumentTypeError(
                f"{label} must be 1 to {limit} printable characters, got {given[:60]!r}"
                + ("" if bad is None else f" (U+{ord(bad):04X} is a control or format character)")
            )
        return given

    return convert


def one_to(label: str, high: int) -> Callable[[str], int]:
    """Return an argparse type for a count from 1 to ``high`` in ASCII digits."""

    def convert(given: str) -> int:
        if not (given.isascii() and given.isdigit() and len(given) <= 12 and 1 <= int(given) <= high):
            raise argparse.ArgumentTypeError(f"{label} must be an integer from 1 to {high}, got {given[:40]!r}")
        return int(given)

    return convert


_AGE = re.compile(r"([0-9]{1,9})([smhd])", re.ASCII)
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def when(label: str) -> Callable[[str], datetime]:
    """Return an argparse type for a time: ISO 8601 (UTC unless it names a zone), or an age (90m, 12h, 7d)."""

    def convert(given: str) -> datetime:
        from datetime import UTC, datetime, timedelta  # here: a command without a time option never loads it

        try:
            if age := _AGE.fullmatch(given):
                return datetime.now(UTC) - timedelta(seconds=int(age[1]) * _AGE_UNITS[age[2]])
            value = datetime.fromisoformat(given) if given.isascii() else None
        except (ValueError, OverflowError):  # not a time; an age before year 1
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(
                f"{label} must be an ISO 8601 time (2026-11-27T22:00, UTC unless it names a zone)"
                f" or an age such as 90m, 12h or 7d, got {given[:60]!r}"
            )
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    return convert


def listen(given: str) -> tuple[str, int]:
    """Parse ``ADDR:PORT`` (``[v6addr]:PORT`` for IPv6) for --metrics-listen and --listen."""
    host, sep, port = given.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port) if port.isascii() and port.isdigit() else -1
    except ValueError:
        number = -1
    if not sep or not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be ADDR:PORT with an IP address, got {given[:60]!r}")
    return host, number


def position(given: str) -> Position | str:
    """Parse a change feed position ``TX:ID`` as printed, or ``end``."""
    from lifecycle.feed import Position

    if given == "end":
        return given
    try:
        return Position.parse(given)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pairs(items: list[str], flag: str) -> dict[str, str]:
    """Return repeated ``KEY=VALUE`` options as a dict; a malformed or repeated key is :class:`InvalidInput`."""
    found: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{flag} takes KEY=VALUE, got {item!r}")
        if key in found:
            raise InvalidInput(f"{flag} {key!r} given twice")
        found[key] = value
    return found
