"""The values the driver contract speaks in (:mod:`lifecycle.drivers.base` re-exports every one of them).

What a call acts for (:class:`Attempt`) and what a domain or a volume says of
the attempt that made it (:class:`Stamp`, :func:`volume_name`,
:func:`volume_tag`), what a host holds (:class:`HostObject`,
:class:`Listing`, :class:`Console`), what it tells (:class:`LifecycleEvent`),
and how a disk travels (:class:`DiskRead`). Plain values: no hypervisor here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime

from lifecycle.states import PowerState

__all__ = [
    "Attempt",
    "Console",
    "DiskRead",
    "DiskSegments",
    "DiskSource",
    "EventListener",
    "HostObject",
    "LifecycleEvent",
    "Listing",
    "Progress",
    "RebootType",
    "Stamp",
    "Transition",
    "volume_name",
    "volume_tag",
]

DiskSegments = Iterator[bytes | int]
"""A disk's content in order: ``bytes`` of data, or an ``int``, the length of a hole (zeros never sent)."""

Progress = Callable[[int, int], None]
"""Called as data moves with (bytes done, bytes total); what it raises stops the copy."""


@dataclass(frozen=True, slots=True)
class DiskRead:
    """A disk being read from its host for a move."""

    segments: DiskSegments
    total: int
    """The bytes of data the disk holds (what a sparse copy sends), for progress."""


DiskSource = Callable[[], AbstractContextManager[DiskRead]]
"""Opens the source disk of a move (on the source host's connection) when the destination needs it."""


def _always() -> None:
    """Hold always: the check of a call made outside any task (tests, tools), which nothing can fence."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """The attempt of a task a driver call acts for: stamped on what it makes, checked before what it destroys.

    One task may run in several attempts: each takeover by recovery bumps the
    task's ``epoch``. Objects an attempt makes on a hypervisor name it (a
    domain in its metadata, a volume in its name), so no worker ever deletes,
    overwrites, adopts or starts what another attempt made.
    """

    task_id: str
    epoch: int
    migration_id: str | None = None
    holds: Callable[[], None] = field(default=_always, compare=False, repr=False)
    """Raises (``Fenced``, ``Preempted``) once this attempt's epoch no longer holds; drivers call it right before
    each destructive step (delete, undefine, overwrite, start) of a long call."""

    @property
    def task_tag(self) -> str:
        """The short form of the task id that volume names carry (its first 12 hex digits)."""
        return self.task_id.replace("-", "")[:12]

    @property
    def tag(self) -> str:
        """What a volume made by this attempt carries in its name: ``<task tag>-<epoch>``."""
        return f"{self.task_tag}-{self.epoch}"


@dataclass(frozen=True, slots=True)
class Stamp:
    """What a domain's metadata says of the attempt that made it (or last took it over)."""

    task_id: str | None
    """None for a domain from before stamps (or made outside the engine): it belongs to no attempt."""
    epoch: int = 0
    migration_id: str | None = None

    def of_task(self, attempt: Attempt | None) -> bool:
        """Whether this stamp names ``attempt``'s task (any of its epochs)."""
        return attempt is not None and self.task_id == attempt.task_id

    def newer_than(self, attempt: Attempt | None) -> bool:
        """Whether a later attempt of the same task took this object: the caller's epoch no longer holds."""
        return self.of_task(attempt) and attempt is not None and self.epoch > attempt.epoch


def volume_name(uuid: str, attempt: Attempt | None) -> str:
    """Return the name of the root volume ``attempt`` makes for ``uuid`` (the bare uuid without an attempt)."""
    return uuid if attempt is None else f"{uuid}.{attempt.tag}"


def volume_tag(uuid: str, name: str) -> str | None:
    """Return the attempt tag in a root volume's name of ``uuid`` (None: a bare-uuid volume, from before tags)."""
    prefix = uuid + "."
    if not name.startswith(prefix) or name.endswith(".rescue"):
        return None
    return name[len(prefix) :]


@dataclass(frozen=True, slots=True)
class HostObject:
    """A domain or a root volume of one instance on a host, with the attempt it names."""

    kind: str
    """``domain`` or ``volume``."""
    name: str
    task_tag: str | None
    """The short task id of the attempt that made (or last took) it; None when it names none (made before tags)."""
    epoch: int | None = None
    running: bool = False
    """For a domain: whether it is active now."""
    volumes: tuple[str, ...] = ()
    """For a domain: the names of the volumes it uses."""

    def of_task(self, attempt: Attempt | None) -> bool:
        """Whether ``attempt``'s task made this (any of its epochs)."""
        return attempt is not None and self.task_tag == attempt.task_tag


@dataclass(frozen=True, slots=True)
class Listing:
    """One host's domains, read in one call."""

    owned: Mapping[str, PowerState]
    """Instance uuid to power state, for every domain the engine defined."""
    foreign: tuple[str, ...] = field(default=())
    """Names of domains no instance owns: reported, never touched."""


@dataclass(frozen=True, slots=True)
class Console:
    """Where a domain's VNC server listens."""

    host: str
    port: int


class RebootType(enum.StrEnum):
    """Soft asks the guest (ACPI); hard resets the domain."""

    SOFT = "soft"
    HARD = "hard"


class Transition(enum.StrEnum):
    """Hypervisor lifecycle transitions, as Nova's virt events name them."""

    STARTED = "started"
    STOPPED = "stopped"
    PAUSED = "paused"
    RESUMED = "resumed"
    SUSPENDED = "suspended"


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """A domain changed power on the hypervisor."""

    uuid: str
    transition: Transition
    at: datetime


EventListener = Callable[[LifecycleEvent], None]
