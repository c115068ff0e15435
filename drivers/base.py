"""The driver contract: what every hypervisor driver promises the engine.

Each method's docstring states what holds afterwards (postcondition), whether
calling it again is safe (idempotency), and which errors it raises. Drivers
raise only :class:`~lifecycle.errors.DriverError` and its subclasses;
:class:`~lifecycle.errors.DomainNotFound` means the domain does not exist, and
:class:`~lifecycle.errors.DriverUnavailable` means "try again later".

Drivers may import only the contract side of lifecycle (errors and states).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lifecycle.states import PowerState

__all__ = [
    "Console",
    "DiskRead",
    "DiskSegments",
    "DiskSource",
    "DomainSpec",
    "Driver",
    "EventListener",
    "LifecycleEvent",
    "Listing",
    "Progress",
    "RebootType",
    "Transition",
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


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """Everything a driver needs to define a domain for an instance."""

    uuid: str
    name: str
    vcpus: int
    memory_mb: int
    root_gb: int
    image_path: str
    image_format: str


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


class Driver(abc.ABC):
    """One host's hypervisor. Methods may be called from several threads at once."""

    allocates_console_ports: bool = True
    """False where the hypervisor never assigns VNC ports (libvirt's test driver)."""

    @abc.abstractmethod
    def spawn(self, spec: DomainSpec, *, power_on: bool = True) -> None:
        """Create the disk and define the domain, and start it if ``power_on``.

        After: the domain exists with ``spec``'s size, running when ``power_on``
        else shut down. Repeat: safe; an existing domain for the uuid is left
        as it is and started if ``power_on``. Errors: DriverError.
        """

    @abc.abstractmethod
    def destroy(self, uuid: str, *, destroy_disks: bool = True) -> None:
        """Stop the domain at once, undefine it and (by default) delete its disk.

        After: no domain for ``uuid``; no disk either when ``destroy_disks``.
        Repeat: safe; a missing or already-off domain is success.
        """

    @abc.abstractmethod
    def power_on(self, spec: DomainSpec) -> None:
        """Start the domain.

        After: running. Repeat: safe; a running domain is left alone.
        Errors: DomainNotFound if it is not defined.
        """

    @abc.abstractmethod
    def power_off(self, uuid: str, *, timeout: float, retry_interval: float) -> bool:
        """Shut the guest down cleanly, falling back to a hard stop.

        Sends ACPI shutdown every ``retry_interval`` seconds until the guest is
        off or ``timeout`` passes, then destroys it (disk kept). ``timeout`` 0
        means power off at once. Returns True when the guest stopped by itself.
        After: shut down. Repeat: safe. Errors: DomainNotFound.
        """

    @abc.abstractmethod
    def reboot(self, spec: DomainSpec, kind: RebootType) -> None:
        """Reboot the guest: soft through the guest (running guests only), hard by reset.

        After: running. Repeat: safe (it reboots again).
        Errors: DomainNotFound; DriverError when a soft reboot finds the guest off.
        """

    @abc.abstractmethod
    def pause(self, uuid: str) -> None:
        """Freeze the vCPUs, keeping memory.

        After: paused. Repeat: safe on a paused guest.
        Errors: DomainNotFound; DriverError if the guest is not running.
        """

    @abc.abstractmethod
    def unpause(self, uuid: str) -> None:
        """Thaw a paused guest.

        After: running. Repeat: safe on a running guest.
        Errors: DomainNotFound; DriverError if the guest is shut down.
        """

    @abc.abstractmethod
    def suspend(self, uuid: str) -> None:
        """Save the guest's memory to disk and stop it (libvirt managed save).

        After: shut down with a saved image (power SHUTDOWN, as Nova on libvirt).
        Repeat: safe on a suspended guest. Errors: DomainNotFound; DriverError
        if the guest is not running or paused.
        """

    @abc.abstractmethod
    def resume(self, spec: DomainSpec) -> None:
        """Restore a suspended guest from its saved memory.

        After: running. Repeat: safe on a running guest. Errors: DomainNotFound.
        """

    @abc.abstractmethod
    def rescue(self, spec: DomainSpec) -> None:
        """Boot the guest from a rescue image with its own disk attached second.

        After: running in rescue mode. Repeat: safe. Errors: DomainNotFound.
        """

    @abc.abstractmethod
    def unrescue(self, spec: DomainSpec) -> None:
        """Leave rescue mode and boot the guest from its own disk.

        After: running normally. Repeat: safe. Errors: DomainNotFound.
        """

    @abc.abstractmethod
    def migrate_disk_and_power_off(self, uuid: str, *, timeout: float, retry_interval: float) -> str:
        """Source side of a move: power off (clean, then hard), undefine, keep the disk.

        After: no domain for ``uuid`` here; its disk kept, unchanged, until
        confirm or revert. Returns a name of the kept disk (for the record and
        for operators). Repeat: safe (returns the same name).
        Errors: DomainNotFound when there is neither a domain nor a kept disk.
        """

    @abc.abstractmethod
    def read_disk(self, uuid: str) -> AbstractContextManager[DiskRead]:
        """Open the kept disk of a move for reading, as sparse segments; closing it ends the read.

        Repeat: safe, no side effect. Errors: DomainNotFound when no disk is kept.
        """

    @abc.abstractmethod
    def finish_migration(
        self, spec: DomainSpec, source: DiskSource, *, power_on: bool, progress: Progress | None = None
    ) -> None:
        """Destination side: copy the disk from ``source``, check it arrived intact, grow it, define, start.

        The image ``spec`` names is ensured in this host's cache first (the
        disk is backed by it). ``progress`` hears the bytes copied; an error
        it raises stops the copy. A copy that fails or arrives different from
        what was sent leaves nothing here. ``spec`` carries the new flavor;
        the disk grows to ``spec.root_gb`` when that is larger. After: the
        domain exists, running if ``power_on``. Repeat: safe (an existing
        domain is left as it is; a partial copy is started again).
        """

    @abc.abstractmethod
    def snapshot(self, spec: DomainSpec, target: Path) -> None:
        """Write the instance's root disk to ``target``, a file on the engine's machine, as an image of its own.

        The disk is read over this host's connection (the guest should be
        powered off: a running guest's disk is not consistent), made whole on
        the engine's side from ``spec``'s image (the disk's backing store), and
        inspected as any image is. ``target`` is written completely or not at
        all (a ``.part`` file beside it is renamed at the end). Repeat: safe
        (``target`` is written again). Errors: DomainNotFound when the
        instance has no disk here; DriverError.
        """

    @abc.abstractmethod
    def spawn_from_snapshot(
        self, spec: DomainSpec, snapshot: Path, *, power_on: bool = True, progress: Progress | None = None
    ) -> None:
        """Spawn with a root disk holding ``snapshot``'s content (a :meth:`snapshot`), backed by ``spec``'s image.

        The disk is made on the engine's side as the difference between the
        snapshot and ``spec``'s image, sent over this host's connection,
        checked to have arrived intact and grown to ``spec.root_gb``, so it is
        laid out as any spawned disk (later moves copy it the same way). After:
        the domain exists, running when ``power_on``. A copy that fails leaves
        nothing here. Repeat: safe (an existing domain is left as it is and
        started if ``power_on``). Errors: DriverError (CopyFailed for the copy).
        """

    @abc.abstractmethod
    def confirm_migration(self, uuid: str) -> None:
        """Source side of a confirm: delete the kept disk (never a disk a domain here uses). Repeat: safe."""

    @abc.abstractmethod
    def finish_revert_migration(self, spec: DomainSpec, *, power_on: bool) -> None:
        """Source side of a revert: put the kept disk back, define with ``spec`` (old flavor), start.

        After: the domain exists here again, running if ``power_on``.
        Repeat: safe. Errors: DomainNotFound when nothing was kept.
        """

    @abc.abstractmethod
    def get_info(self, uuid: str) -> PowerState:
        """Return the domain's power state, read fresh.

        Repeat: safe, no side effect. Errors: DomainNotFound.
        """

    @abc.abstractmethod
    def list_instances(self) -> Listing:
        """Return every domain of the host with its power state, in one call.

        Repeat: safe, no side effect.
        """

    @abc.abstractmethod
    def get_vnc_console(self, uuid: str) -> Console:
        """Return where the domain's VNC server listens.

        Errors: DomainNotFound; DriverError when the domain has no VNC console.
        """

    @abc.abstractmethod
    def register_event_listener(self, listener: EventListener | None) -> None:
        """Deliver lifecycle events to ``listener`` (None stops delivery).

        Events arrive on a driver thread, never on the caller's.
        """

    def ping(self) -> None:
        """Return when the hypervisor answers now; raise DriverUnavailable when it does not.

        The daemon heartbeats a host only while this succeeds. The default
        lists the domains; drivers with a cheaper round trip override it.
        Repeat: safe, no side effect.
        """
        self.list_instances()

    def cleanup_images(
        self, max_age_seconds: float, moving: frozenset[str] = frozenset(), keep: frozenset[str] | None = None
    ) -> list[str]:
        """Remove unused cached base images older than the age, and with ``keep``, orphaned instance disks.

        A base behind any disk of the host (an instance's, a kept one of a
        move, a rescue disk) is never removed; ``moving`` names the instances
        whose move is not yet confirmed or reverted. With ``keep`` (the
        instances the database places on this host or in a move touching it),
        an instance disk of any other instance, used by no domain and older
        than the age, is removed too: what a copy or a delete left while the
        host did not answer. Returns what was removed. Repeat: safe. Drivers
        without an image cache have nothing to remove.
        """
        return []

    def close(self) -> None:  # noqa: B027 - optional hook, most drivers hold nothing
        """Release the connection; the driver may not be used afterwards."""
