"""Audit records: one per change of vm_state, task_state or power_state.

Each record is written in the same transaction as the change it explains, and
says who (actor), why (cause, operation, rule), under which task and request,
on which host, and the from/to of all three states. ``history`` in the engine
reads one instance's back, ``audit`` queries them across instances, and the
change feed (:mod:`lifecycle.feed`) delivers each as a :class:`Change` at its
:class:`Position`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from lifecycle import validation
from lifecycle._plain import fields_of
from lifecycle.errors import InvalidInput
from lifecycle.records import Cause
from lifecycle.states import VmState

__all__ = [
    "START",
    "Activity",
    "AuditEntry",
    "AuditQuery",
    "Change",
    "Consumer",
    "Position",
    "Why",
    "audit_query",
    "format_history",
]


class Activity(enum.StrEnum):
    """The audit log's ``operation`` values that name no operation of the table (those are :class:`lifecycle.graph.Op`).

    What else changes a state or notes something done to an instance. Stored
    values are frozen: add members, never rename.
    """

    SYNC = "sync"
    """A sync pass or a hypervisor event recorded the power state (or a missing domain)."""
    REAP = "reap"
    """A sync pass acted on a domain still on a host for a deleted instance."""
    DESTROY_EVACUATED = "destroy_evacuated"
    """A returning host's copy of an instance evacuated away from it was destroyed."""
    BUILD_TIMEOUT = "build_timeout"
    """A build running past ``instance_build_timeout`` was ended."""
    RESET_STATE = "reset_state"
    """An operator reset a stuck instance."""
    LOCK = "lock"
    UNLOCK = "unlock"
    REMOVE_HOST = "remove_host"
    """A host was removed by force under the instance."""


@dataclass(frozen=True, slots=True)
class Why:
    """The reason attached to a state write: who, what for, and under which task."""

    actor: str
    cause: Cause
    operation: str | None = None
    """An operation's name (:class:`lifecycle.graph.Op`, or one registered at run time) or an :class:`Activity`."""
    task_id: str | None = None
    request_id: str | None = None
    rule: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.operation is not None and type(self.operation) is not str:  # stored, logged and compared as text
            object.__setattr__(self, "operation", str(self.operation))


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of an instance's audit log."""

    id: int
    instance_uuid: str
    task_id: str | None
    request_id: str | None
    actor: str
    cause: str
    operation: str | None
    rule: str | None
    from_vm_state: str | None
    to_vm_state: str
    from_task_state: str | None
    to_task_state: str | None
    from_power_state: int | None
    to_power_state: int
    message: str | None
    created_at: datetime
    host: str | None = None
    """The instance's host at the change (the one it left, for a change taking it off a host); None on
    rows written before the change feed (migration 0012)."""
    tx: int = 0
    """With ``id``, the row's place in the change feed (see :class:`Position`)."""
    project_id: str | None = None
    """The instance's project at the change (None: none named, or a row written before migration 0017)."""
    user_id: str | None = None

    @property
    def position(self) -> Position:
        """The entry's position in the change feed."""
        return Position(self.tx, self.id)

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as JSON-ready data, its feed ``position`` as ``tx:id`` text."""
        return {**fields_of(self), "position": str(self.position)}


_POSITION = re.compile(r"(0|[1-9][0-9]{0,18}):(0|[1-9][0-9]{0,18})", re.ASCII)
_MAX_BIGINT = 2**63 - 1


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in the change feed: every change has one, and a later one compares greater.

    ``id`` is the audit row's id; ``tx`` orders the rows of concurrent
    PostgreSQL transactions (see :mod:`lifecycle.store.feed`) and is 0 on
    SQLite, whose writers commit one at a time. Written ``tx:id``.
    """

    tx: int
    id: int

    def __str__(self) -> str:
        return f"{self.tx}:{self.id}"

    @classmethod
    def parse(cls, value: object) -> Position:
        """Return the position ``value`` names: a :class:`Position`, or its text ``tx:id``."""
        if isinstance(value, Position):
            return value
        if not isinstance(value, str) or not _POSITION.fullmatch(value):
            shown = repr(value)[:60] if isinstance(value, str) else type(value).__name__
            raise InvalidInput(
                f"invalid change position {shown}: expected TX:ID as the feed prints it (e.g. 0:17), 0:0 for the start"
            )
        tx, row = (int(part) for part in value.split(":"))
        if max(tx, row) > _MAX_BIGINT:
            raise InvalidInput(f"invalid change position {value!r}: each part is at most {_MAX_BIGINT}")
        return cls(tx, row)


START = Position(0, 0)
"""Before the first change."""


class Change(NamedTuple):
    """One committed change of an instance's states, as the change feed delivers it.

    The same facts as its :class:`AuditEntry`, under the names a consumer of
    a feed expects (``old_*`` and ``new_*``); states are their stored values.
    A named tuple, not a dataclass: a feed builds many, straight from the
    rows, and this is what keeps a follower at the speed of a plain select
    (``bench/changes.py``).
    """

    tx: int
    """With ``id``, the change's :attr:`position`."""
    id: int
    """The audit row's id."""
    instance_uuid: str
    host: str | None
    old_vm_state: str | None
    new_vm_state: str
    old_task_state: str | None
    new_task_state: str | None
    old_power_state: int | None
    new_power_state: int
    task_id: str | None
    operation: str | None
    actor: str
    cause: str
    rule: str | None
    request_id: str | None
    message: str | None
    timestamp: datetime
    project_id: str | None = None
    """Whom the instance is for: its project and user (see :attr:`lifecycle.records.Instance.project_id`)."""
    user_id: str | None = None

    @property
    def position(self) -> Position:
        """The change's place in the feed."""
        return Position(self.tx, self.id)

    def to_dict(self) -> dict[str, Any]:
        """Return the change as JSON-ready data, as the feed's JSON lines and webhooks carry it."""
        data = self._asdict()
        stamp = self.timestamp.astimezone(UTC).isoformat(timespec="microseconds")
        facts = {k: v for k, v in data.items() if k not in ("tx", "id", "timestamp", "project_id", "user_id")}
        return {
            "position": str(self.position),
            **facts,
            "timestamp": stamp,
            "project_id": self.project_id,
            "user_id": self.user_id,
        }


@dataclass(frozen=True, slots=True)
class Consumer:
    """A named follower of the change feed and the position it has been delivered up to."""

    name: str
    position: Position
    created_at: datetime
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """Return the consumer as JSON-ready data (its position as ``tx:id`` text, datetimes as ISO 8601)."""
        return {**fields_of(self, ("position",)), "position": str(self.position)}


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which audit rows ``Engine.feed.audit`` returns: those every given filter admits, oldest first.

    Values are checked by the engine before a query is made of them.
    """

    since: datetime | None = None
    """Rows written at or after this time."""
    until: datetime | None = None
    """Rows written before this time."""
    request_id: str | None = None
    host: str | None = None
    """Rows of changes on this host (see :attr:`AuditEntry.host`)."""
    operation: str | None = None
    cause: Cause | None = None
    vm_state: VmState | None = None
    """Rows of changes *into* this vm_state (it was another before): "which instances went to error"."""
    limit: int = 1000


def _when(label: str, value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        shown = f"{value!r}"[:80]
        raise InvalidInput(f"{label} must be a timezone-aware datetime (e.g. datetime.now(UTC)), got {shown}")
    return value


def _short(label: str, value: object, longest: int) -> str | None:
    if value is None:
        return None
    text = validation.name(label, value)
    if len(text) > longest:
        raise InvalidInput(f"{label} {text[:40]!r}... is {len(text)} characters: at most {longest}")
    return text


def _choice(label: str, kind: type[Cause] | type[VmState], value: object) -> Any:
    if value is None or isinstance(value, kind):
        return value
    if isinstance(value, str) and value in {member.value for member in kind}:
        return kind(value)
    allowed = ", ".join(member.value for member in kind)
    raise InvalidInput(f"unknown {label} {f'{value!r}'[:80]}: expected one of {allowed}")


def audit_query(
    *,
    since: object = None,
    until: object = None,
    request_id: object = None,
    host: object = None,
    operation: object = None,
    cause: object = None,
    vm_state: object = None,
    limit: object = 1000,
) -> AuditQuery:
    """Return the :class:`AuditQuery` of these filters; :class:`InvalidInput` names the first one that is wrong.

    ``cause`` and ``vm_state`` take the enum or its value; ``limit`` is 1 to 100000.
    """
    start, end = _when("since", since), _when("until", until)
    if start is not None and end is not None and start >= end:
        raise InvalidInput(f"since ({start.isoformat()}) must be before until ({end.isoformat()})")
    return AuditQuery(
        since=start,
        until=end,
        request_id=_short("request id", request_id, 64),
        host=None if host is None else validation.name("host", host),
        operation=_short("operation", operation, 64),
        cause=_choice("cause", Cause, cause),
        vm_state=_choice("vm_state", VmState, vm_state),
        limit=validation.count("limit", limit, low=1, high=100_000),
    )


def _arrow(before: object, after: object) -> str:
    left = "none" if before is None else str(before)
    right = "none" if after is None else str(after)
    return right if left == right else f"{left}->{right}"


def format_history(entries: Iterable[AuditEntry]) -> str:
    """Render entries as aligned lines a person can read top to bottom."""
    lines = []
    for e in entries:
        states = (
            f"vm {_arrow(e.from_vm_state, e.to_vm_state)}"
            f"  task {_arrow(e.from_task_state, e.to_task_state)}"
            f"  power {_arrow(e.from_power_state, e.to_power_state)}"
        )
        why = " ".join(
            part
            for part in (
                f"{e.cause}:{e.actor}",
                e.operation and f"op={e.operation}",
                e.task_id and f"task={e.task_id[:8]}",
                e.rule and f"rule={e.rule}",
                e.message and f"message={e.message!r}",
            )
            if part
        )
        lines.append(f"{e.created_at.isoformat(timespec='milliseconds')}  {states}  [{why}]")
    return "\n".join(lines)
