"""The drivers an engine opened, one per host, each opened once and kept.

A ``fake://`` host (no state file) is a hypervisor held in the memory of the
process that added it: another process (the ``lifecycle`` command, a daemon
started elsewhere, the application restarted) would open it empty. Building
there is harmless (a benchmark's workers each fill their own), but a sync
pass or a daemon would take that emptiness as the truth and send every
instance there to error: :meth:`DriverCache.check_here` refuses those with
:class:`InMemoryHostElsewhere` (a process may serve the hosts it added, known
by name). An engine given its own ``driver_factory`` decides for itself. Each
engine opens its own fake host, so give the in-process :class:`lifecycle.Daemon`
the application's engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from lifecycle import drivers, validation
from lifecycle.config import Settings
from lifecycle.drivers.base import Driver
from lifecycle.errors import InMemoryHostElsewhere
from lifecycle.records import Host
from lifecycle.store import Store

__all__ = ["DriverCache", "DriverFactory", "connect_host"]

DriverFactory = Callable[[Host], Driver]

IN_MEMORY = "fake://"
"""The URI of a fake host held in one process's memory (``fake:///ABS/state.json`` is shared through its file)."""

_added_here: set[str] = set()
"""The names of the in-memory fake hosts this process added: the only ones it may open.

By name, whatever the database: a copy of a database file (a test's fixture) keeps its hosts openable.
"""
_added_lock = threading.Lock()


def connect_host(settings: Settings, host: Host) -> Driver:
    """Open ``host``'s driver from its URI with the engine's settings (what an engine does unless given a factory)."""
    return drivers.connect(
        host.driver_uri,
        host.name,
        host.instances_path,
        domain_type=settings.libvirt_domain_type,
        vnc_listen=host.console_address or settings.vnc_listen,
        soft_reboot_seconds=settings.soft_reboot_seconds,
    )


class DriverCache:
    """Opens a host's driver on first use under a lock of that host alone, and keeps it.

    With no ``factory``, drivers are opened from their URIs (:func:`connect_host`), and an
    in-memory fake host another process added is not to be synced here (:meth:`check_here`).
    """

    def __init__(self, store: Store, factory: DriverFactory | None, settings: Settings) -> None:
        self._store = store
        self._settings = settings
        self.factory = factory or self.connect
        """Opens the driver of a host record (replaceable before the first use, e.g. by a test)."""
        self._drivers: dict[str, Driver] = {}
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def connect(self, host: Host) -> Driver:
        """Open ``host``'s driver from its URI with the engine's settings."""
        return connect_host(self._settings, host)

    def added(self, host: Host) -> None:
        """Note that this process added ``host``: an in-memory fake one is this process's to open."""
        if host.driver_uri == IN_MEMORY:
            with _added_lock:
                _added_here.add(host.name)

    def check_here(self, host: Host) -> None:
        """Refuse (:class:`InMemoryHostElsewhere`) to serve (sync, claim) an in-memory fake host opened empty here.

        Only with the engine's own opening (no ``driver_factory``): a
        ``fake://`` host is served only in a process that added a host of that name.
        """
        if self.factory != self.connect or host.driver_uri != IN_MEMORY:
            return
        with _added_lock:
            here = host.name in _added_here
        if not here:
            raise InMemoryHostElsewhere(host.name)

    def get(self, host_name: str) -> Driver:
        """Return the (cached) driver of a host.

        Opened under a lock of that host alone: connecting to a hypervisor that
        does not answer blocks callers for that host, never for the others.
        """
        validation.name("host", host_name)
        with self._lock:
            driver = self._drivers.get(host_name)
            if driver is not None:
                return driver
            opening = self._opening.setdefault(host_name, threading.Lock())
        with opening:
            with self._lock:
                driver = self._drivers.get(host_name)
            if driver is None:
                driver = self.factory(self._store.hosts.get(host_name))
                with self._lock:
                    self._drivers[host_name] = driver
            return driver

    def forget(self, host_name: str) -> None:
        """Close and drop the driver of a host that was removed."""
        with self._lock:
            driver = self._drivers.pop(host_name, None)
        if driver is not None:
            driver.close()

    def close(self) -> None:
        """Close every driver opened."""
        with self._lock:
            opened = list(self._drivers.values())
        for driver in opened:
            driver.close()
