"""The drivers an engine opened, one per host, each opened once and kept."""

from __future__ import annotations

import threading
from collections.abc import Callable

from lifecycle import validation
from lifecycle.drivers.base import Driver
from lifecycle.records import Host
from lifecycle.store import Store

__all__ = ["DriverCache", "DriverFactory"]

DriverFactory = Callable[[Host], Driver]


class DriverCache:
    """Opens a host's driver on first use under a lock of that host alone, and keeps it."""

    def __init__(self, store: Store, factory: DriverFactory) -> None:
        self._store = store
        self.factory = factory
        """Opens the driver of a host record (replaceable before the first use, e.g. by a test)."""
        self._drivers: dict[str, Driver] = {}
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

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
