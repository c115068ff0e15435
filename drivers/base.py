"""The driver contract: what every hypervisor driver promises the engine.

Each method's docstring states what holds afterwards (postcondition), whether
calling it again is safe (idempotency), and which errors it raises. Drivers
raise only :class:`~lifecycle.errors.DriverError` and its subclasses;
:class:`~lifecycle.errors.DomainNotFound` means the domain does not exist, and
:class:`~lifecycle.errors.DriverUnavailable` means "try again later".

Drivers may import only the contract side of lifecycle (errors and states).

The values the methods take and return live in :mod:`lifecycle.drivers._values`, the
retry helper in :mod:`lifecycle.drivers._wait`; both are re-exported here, the one place
drivers and the engine import them from.
"""

from __future__ import annotations

import abc
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from lifecycle.drivers._values import (
    Attempt,
    Console,
    DiskRead,
    DiskSegments,
    DiskSource,
    EventListener,
    HostObject,
    LifecycleEvent,
    Listing,
    Progress,
    RebootType,
    Stamp,
    Transition,
    volume_name,
    volume_tag,
)
from lifecycle.drivers._wait import wait_out
from lifecycle.states import PowerState

__all__ = [
    "Attempt",
    "Console",
    "DiskRead",
    "DiskSegments",
    "DiskSource",
    "DomainSpec",
    "Driver",
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
    "wait_out",
]


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
    disk: str | None = None
    """The root volume the database records as the instance's current disk on the host called (None: the
    bare-uuid name of volumes made before attempts were named, or no disk yet)."""
    attempt: Attempt | None = None
    """The task attempt the call acts for (None outside a task: it then owns nothing it did not make)."""

    @property
    def root(self) -> str:
        """The name of the current root volume on the host called."""
        return self.disk or self.uuid


class Driver(abc.ABC):
    """One host's hypervisor. Methods may be called from several threads at once."""

    allocates_console_ports: bool = True
    """False where the hypervisor never assigns VNC ports (libvirt's test driver)."""

    @abc.abstractmethod
    def spawn(self, spec: DomainSpec, *, power_on: bool = True) -> str:
        """Create the root volume and define the domain, both naming ``spec.attempt``; start it if ``power_on``.

        After: the domain exists with ``spec``'s size, running when ``power_on``
        else shut down. Returns the root volume's name (what the instance
        records as its disk). Repeat: safe; a domain an earlier epoch of the
        same task made is taken over (stamped anew) and started if
        ``power_on``. A domain of any other attempt is never adopted nor
        started: :class:`~lifecycle.errors.StaleObject` (callers clear
        leftovers first, see :meth:`objects`); one a later epoch of the task
        took: ``Fenced``. Errors: DriverError.
        """

    @abc.abstractmethod
    def destroy(self, uuid: str, *, destroy_disks: bool = True, attempt: Attempt | None = None) -> None:
        """Stop the domain at once, undefine it and (by default) delete the instance's volumes here.

        Without ``attempt``, everything of ``uuid`` on this host goes (what a
        delete, the owner of the instance's fate, wants). With it, only what
        that attempt's task made: a worker cleaning up after itself never
        touches another attempt's domain or disk. After: no such domain, nor
        volume when ``destroy_disks``. Repeat: safe; a missing or already-off
        domain is success, as is one a racing destroy removes meanwhile.
        """

    @abc.abstractmethod
    def objects(self, uuid: str) -> list[HostObject]:
        """Return every domain and root volume of ``uuid`` on this host, with the attempt each names.

        Repeat: safe, no side effect.
        """

    @abc.abstractmethod
    def remove(self, uuid: str, objects: list[HostObject]) -> list[str]:
        """Destroy exactly ``objects`` as :meth:`objects` listed them: domains stopped and undefined, volumes deleted.

        A domain stamped anew since it was listed, or a volume a domain now
        uses, is left alone (someone took it meanwhile). Returns the names
        removed. Repeat: safe.
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

        A hard reboot defines the domain anew from ``spec`` on its disk
        (``spec.root``), so a domain lost while its disk survived comes back
        (as Nova regenerates the XML on a hard reboot). After: running.
        Repeat: safe (it reboots again). Errors: DomainNotFound (no domain
        for a soft reboot; no disk for a hard one); DriverError when a soft
        reboot finds the guest off.
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
    def migrate_disk_and_power_off(
        self,
        uuid: str,
        *,
        timeout: float,
        retry_interval: float,
        disk: str | None = None,
        attempt: Attempt | None = None,
    ) -> str:
        """Source side of a move: power off (clean, then hard), undefine, keep the disk ``disk``.

        ``disk`` is the root volume the instance records here (None: the bare
        uuid). The epoch is checked (``attempt.holds``) right before the hard
        stop and the undefine, and a domain a later epoch of the task took is
        never touched (``Fenced``). After: no domain for ``uuid`` here; its
        disk kept, unchanged, until confirm or revert. Returns the kept
        volume's name (for the record and for operators). Repeat: safe
        (returns the same name). Errors: DomainNotFound when there is neither
        a domain nor the kept disk.
        """

    @abc.abstractmethod
    def read_disk(self, uuid: str, disk: str | None = None) -> AbstractContextManager[DiskRead]:
        """Open the kept root volume ``disk`` (None: the bare uuid) for reading, as sparse segments.

        Closing it ends the read. Repeat: safe, no side effect.
        Errors: DomainNotFound when no such volume is here.
        """

    @abc.abstractmethod
    def finish_migration(
        self, spec: DomainSpec, source: DiskSource, *, power_on: bool, progress: Progress | None = None
    ) -> str:
        """Destination side: copy the disk from ``source``, check it arrived intact, grow it, define, start.

        The image ``spec`` names is ensured in this host's cache first (the
        disk is backed by it). ``progress`` hears the bytes copied; an error
        it raises stops the copy. A copy that fails or arrives different from
        what was sent leaves nothing here. ``spec`` carries the new flavor;
        the disk grows to ``spec.root_gb`` when that is larger. The copy goes
        into a volume named after ``spec.attempt`` (a stalled earlier attempt
        cleaning up its own partial copy never touches it), and the epoch is
        checked right before the define and the start. After: the domain
        exists, running if ``power_on``. Returns the root volume's name.
        Repeat: safe (a domain of an earlier epoch of the task is taken over;
        one of another attempt is never adopted: StaleObject).
        """

    @abc.abstractmethod
    def snapshot(self, spec: DomainSpec, target: Path) -> None:
        """Write the instance's root disk (``spec.root``) to ``target``, a file on the engine's machine, as an image.

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
    ) -> str:
        """Spawn with a root disk holding ``snapshot``'s content (a :meth:`snapshot`), backed by ``spec``'s image.

        The disk is made on the engine's side as the difference between the
        snapshot and ``spec``'s image, sent over this host's connection,
        checked to have arrived intact and grown to ``spec.root_gb``, so it is
        laid out as any spawned disk (later moves copy it the same way). After:
        the domain exists, running when ``power_on``. Returns the root volume's
        name. A copy that fails leaves nothing here. Repeat: safe, as
        :meth:`finish_migration`. Errors: DriverError (CopyFailed for the copy).
        """

    @abc.abstractmethod
    def confirm_migration(self, uuid: str, disk: str | None = None) -> None:
        """Source side of a confirm: delete the kept volume ``disk`` (never one a domain here uses). Repeat: safe."""

    @abc.abstractmethod
    def finish_revert_migration(self, spec: DomainSpec, *, power_on: bool) -> None:
        """Source side of a revert: put the kept disk (``spec.root``) back, define with ``spec`` (old flavor), start.

        A domain here is kept only when it uses that disk; the domain is
        stamped with ``spec.attempt``. After: the domain exists here again,
        running if ``power_on``. Repeat: safe. Errors: DomainNotFound when
        nothing was kept.
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
