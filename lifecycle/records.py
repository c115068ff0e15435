"""Plain immutable values the engine hands to its callers: instances, tasks, hosts.

They are read from the store and never write back; every change goes through
an operation. Field names are the ones the CLI prints with ``--json``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lifecycle._plain import fields_of, plain
from lifecycle.errors import InvalidFlavor
from lifecycle.states import MigrationStatus, PowerState, TaskState, VmState, status_of
from lifecycle.validation import unsafe_character

__all__ = [
    "Cause",
    "Flavor",
    "Host",
    "Image",
    "Instance",
    "Migration",
    "Outcome",
    "Recorded",
    "Task",
    "TaskStep",
    "to_plain",
]


class Outcome(enum.StrEnum):
    """Where a task stands."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PREEMPTED = "preempted"


class Cause(enum.StrEnum):
    """Why a change happened, as recorded in the audit log."""

    API = "api"
    SYNC = "sync"
    EVENT = "event"
    RECOVERY = "recovery"
    TIMER = "timer"
    ADMIN = "admin"


_FLAVOR_KEYS = {"vcpus": "vcpus", "ram": "memory_mb", "memory_mb": "memory_mb", "disk": "root_gb", "root_gb": "root_gb"}
_FLAVOR_LIMITS = {"vcpus": (1, 1024), "memory_mb": (16, 16 * 1024 * 1024), "root_gb": (0, 65536)}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SPEC_KEY = re.compile(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)+", re.ASCII)
_SPEC_LIMIT = 255


@dataclass(frozen=True, slots=True)
class Flavor:
    """The size of an instance: vcpus, memory in MiB, root disk in GiB."""

    vcpus: int
    memory_mb: int
    root_gb: int
    name: str = "custom"
    extra_specs: tuple[tuple[str, str], ...] | Mapping[str, str] = ()
    """Nova's flavor extra specs ("capabilities:ssd": "true"): a mapping or (key, value) pairs, kept as sorted pairs."""
    """Scheduler hints in ``namespace:key`` form, matched against host capabilities."""

    def __post_init__(self) -> None:
        for key, (low, high) in _FLAVOR_LIMITS.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidFlavor(str(self), f"{key} must be an integer from {low} to {high}, got {value!r}")
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InvalidFlavor(str(self), f"name {self.name!r} must be 1-255 letters, digits, '.', '_' or '-'")
        if isinstance(self.extra_specs, Mapping):  # as Nova's API gives them: kept as sorted pairs
            object.__setattr__(self, "extra_specs", tuple(sorted(self.extra_specs.items())))
        reason = _extra_specs_problem(self.extra_specs)
        if reason is not None:
            raise InvalidFlavor(str(self), reason)

    def __str__(self) -> str:
        return f"vcpus={self.vcpus},ram={self.memory_mb},disk={self.root_gb}"

    def as_dict(self) -> dict[str, Any]:
        """Return the flavor as JSON-ready data, extra specs included: the one encoding (task params, rows)."""
        return {
            "name": self.name,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "root_gb": self.root_gb,
            "extra_specs": dict(self.extra_specs),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Flavor:
        """Return the flavor :meth:`as_dict` encoded (data written before extra specs were kept has none)."""
        specs = data.get("extra_specs") or {}
        return cls(
            vcpus=data["vcpus"],
            memory_mb=data["memory_mb"],
            root_gb=data["root_gb"],
            name=data.get("name", "custom"),
            extra_specs=tuple(specs.items()),
        )

    @classmethod
    def parse(cls, text: str, name: str = "custom") -> Flavor:
        """Parse ``vcpus=N,ram=MiB,disk=GiB`` (all three required, nothing else; numbers in ASCII digits)."""
        if not isinstance(text, str):
            raise InvalidFlavor(repr(text)[:80], "a flavor is text: vcpus=N,ram=MiB,disk=GiB")
        values: dict[str, int] = {}
        shown = text if len(text) <= 80 else f"{text[:77]}..."  # the error message quotes it
        for part in filter(None, (p.strip(" ") for p in text.split(","))):
            key, sep, raw = part.partition("=")
            key, raw = key.strip(" "), raw.strip(" ")
            field_name = _FLAVOR_KEYS.get(key)
            if not sep or field_name is None:
                raise InvalidFlavor(shown, f"expected vcpus=N,ram=MiB,disk=GiB, got {_quoted(part)}")
            if field_name in values:
                raise InvalidFlavor(shown, f"{key} given twice")
            values[field_name] = _flavor_number(shown, key, raw)
        missing = sorted(set(_FLAVOR_LIMITS) - set(values))
        if missing:
            raise InvalidFlavor(shown, f"missing {', '.join(missing)} (expected vcpus=N,ram=MiB,disk=GiB)")
        return cls(name=name, vcpus=values["vcpus"], memory_mb=values["memory_mb"], root_gb=values["root_gb"])


def _flavor_number(shown: str, key: str, raw: str) -> int:
    # ASCII digits only: int() would also take '١٢' (Arabic-Indic digits), '1_000' and ' +3'.
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidFlavor(shown, f"{key} must be a whole number in digits 0-9, got {_quoted(raw)}")
    if len(raw) > 18:  # beyond every limit; int() of a huge string is slow, or refused past 4300 digits
        low, high = _FLAVOR_LIMITS[_FLAVOR_KEYS[key]]
        raise InvalidFlavor(shown, f"{key} must be an integer from {low} to {high}, got {raw[:18]}...")
    return int(raw)


def _quoted(text: str) -> str:
    return repr(text if len(text) <= 40 else f"{text[:37]}...")


def _extra_specs_problem(specs: object) -> str | None:
    """Say what is wrong with a flavor's extra specs, or None when they are a tuple of unique str pairs."""
    if not isinstance(specs, tuple):
        return f"extra_specs must be a mapping or a tuple of (key, value) pairs, got {type(specs).__name__}"
    seen: set[str] = set()
    for pair in specs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            return f"extra spec {pair!r} must be a (key, value) pair of strings"
        key, value = pair
        if len(key) > _SPEC_LIMIT or not _SPEC_KEY.fullmatch(key):
            return (
                f"extra spec key {key!r} must be namespace:key (letters, digits, '.', '_', '-';"
                f" at most {_SPEC_LIMIT} characters), e.g. capabilities:ssd"
            )
        if key in seen:
            return f"extra spec {key!r} given twice"
        seen.add(key)
        if len(value) > _SPEC_LIMIT or unsafe_character(value) is not None:
            return f"extra spec {key} value {value!r} must be at most {_SPEC_LIMIT} printable characters"
    return None


@dataclass(frozen=True, slots=True)
class Host:
    """A hypervisor host: the driver URI that reaches it, its resources and what it offers."""

    name: str
    driver_uri: str
    instances_path: str
    enabled: bool
    created_at: datetime
    availability_zone: str = "nova"
    vcpus: int | None = None
    """None: resources are not tracked on this host, so nothing limits placement there."""
    memory_mb: int | None = None
    disk_gb: int | None = None
    vcpus_used: int = 0
    memory_mb_used: int = 0
    disk_gb_used: int = 0
    capabilities: dict[str, str] = field(default_factory=dict)
    hypervisor_type: str = "qemu"
    architecture: str = "x86_64"
    metrics: dict[str, float] = field(default_factory=dict)
    last_heartbeat: datetime | None = None
    console_address: str | None = None
    """Where the host's guests' VNC servers listen (a remote host's management address); None: ``vnc_listen``."""
    fenced_at: datetime | None = None
    """When an operator fenced the host (see :meth:`lifecycle.Engine.hosts.fence`); None: not fenced."""
    fenced_by: str | None = None
    fenced_reason: str | None = None

    @property
    def fenced(self) -> bool:
        """Whether an operator declared the host dead: never scheduled to, its instances evacuable when down."""
        return self.fenced_at is not None

    def to_dict(self) -> dict[str, Any]:
        """Return the host as JSON-ready data (datetimes as ISO 8601), ``fenced`` included."""
        return {**fields_of(self), "fenced": self.fenced}


@dataclass(frozen=True, slots=True)
class Image:
    """An image instances boot from."""

    name: str
    path: str
    disk_format: str
    min_disk_gb: int
    created_at: datetime
    properties: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the image as JSON-ready data (datetimes as ISO 8601)."""
        return fields_of(self)


@dataclass(frozen=True, slots=True)
class Instance:
    """An instance as last committed; ``version`` is what the next write must match."""

    uuid: str
    name: str
    host: str | None
    flavor: Flavor
    image: str
    vm_state: VmState
    task_state: TaskState | None
    power_state: PowerState
    task_id: str | None
    previous_vm_state: VmState | None
    version: int
    launched_at: datetime | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    missing_count: int = 0
    locked_by: str | None = None
    """Who locked the instance (an actor), or None: a locked instance refuses operations without an override."""
    locked_reason: str | None = None
    locked_at: datetime | None = None
    disk: str | None = None
    """The root volume the instance uses on its host, named after the attempt that made it (None: the bare uuid
    of a volume made before volumes named their attempt, or no disk)."""
    project_id: str | None = None
    """The project the instance is for, as the control plane names it (None: not named)."""
    user_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, hash=False)
    """The caller's own key/value pairs (Nova's server metadata), as given at create (left out of the hash)."""

    @property
    def status(self) -> str:
        """The user-facing status word derived from (vm_state, task_state) as Nova does."""
        return status_of(self.vm_state, self.task_state)

    def to_dict(self) -> dict[str, Any]:
        """Return the instance as JSON-ready data: states as their stored values, ``status`` included."""
        return {**fields_of(self, ("flavor",)), "flavor": self.flavor.as_dict(), "status": self.status}


@dataclass(frozen=True, slots=True)
class Task:
    """One run of one operation on one instance."""

    id: str
    instance_uuid: str
    operation: str
    request_id: str
    idempotency_key: str | None
    actor: str
    cause: Cause
    params: dict[str, Any]
    outcome: Outcome
    preempted_by: str | None
    owner: str
    lease_expires_at: datetime
    started_at: datetime
    finished_at: datetime | None
    error: str | None
    traceback: str | None
    epoch: int = 0
    """Grows at each takeover by recovery: a worker holding an older epoch is fenced out."""

    def to_dict(self, *, internal: bool = False) -> dict[str, Any]:
        """Return the task as JSON-ready data, without the engine's own bookkeeping unless ``internal``.

        Left out by default: ``owner`` and ``lease_expires_at`` (which engine process runs the task, and
        until when), ``epoch`` (its takeover fence) and ``traceback`` (the engine's code paths); ``error``
        says what went wrong. An operator's tool passes ``internal=True`` (``recover --owner`` needs it).
        """
        return fields_of(self, () if internal else _TASK_INTERNALS)


_TASK_INTERNALS = ("owner", "lease_expires_at", "epoch", "traceback")


@dataclass(frozen=True, slots=True)
class Migration:
    """A cold migration or resize: where from, where to, which flavors, and how far it got."""

    id: str
    instance_uuid: str
    task_id: str
    kind: str
    source_host: str
    dest_host: str | None
    old_flavor: Flavor
    new_flavor: Flavor
    status: MigrationStatus
    previous_vm_state: VmState
    source_disk: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    bytes_done: int | None = None
    """How much of the disk's data the copy to the destination moved (None before the copy began)."""
    bytes_total: int | None = None
    """How much data the copy moves in all."""

    def to_dict(self) -> dict[str, Any]:
        """Return the migration as JSON-ready data, its flavors as :meth:`Flavor.as_dict` encodes them."""
        flavors = {"old_flavor": self.old_flavor.as_dict(), "new_flavor": self.new_flavor.as_dict()}
        return {**fields_of(self, flavors), **flavors}


@dataclass(frozen=True, slots=True)
class Recorded:
    """What the database says about an instance: the input of a sync decision (:func:`lifecycle.sync.decide`)."""

    vm_state: VmState
    task_state: TaskState | None
    power_state: PowerState
    changed_at: datetime
    """When the row last changed; older observations are ignored."""
    missing_count: int = 0
    """Consecutive observations so far in which the domain was missing."""


@dataclass(frozen=True, slots=True)
class TaskStep:
    """One entry of a task's step log."""

    task_id: str
    seq: int
    name: str
    started_at: datetime
    finished_at: datetime | None
    result: str | None
    detail: str | None = field(default=None)
    bytes_done: int | None = field(default=None)
    """How far the step's disk copy got (a move's resize_finish), while it runs and after."""
    bytes_total: int | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """Return the step as JSON-ready data (datetimes as ISO 8601)."""
        return fields_of(self)


def to_plain(value: Any) -> Any:
    """Return records (or a list of them) as JSON-ready data: each by its ``to_dict()``, the CLI's ``--json``."""
    return plain(value)
