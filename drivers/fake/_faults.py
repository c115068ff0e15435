"""The fake driver's scripted faults: failures, holds, crashes, an unreachable host and a busy storage pool.

Each knob scripts the next call of a name (``fail_next``, ``fail_after``,
``hold``, ``crash_after``), the whole host (``unreachable``) or its storage
pool (``busy_pool``); :meth:`Faults._before` applies them as a call starts.
"""

from __future__ import annotations

import threading
from typing import Any

from lifecycle.drivers.base import Driver, wait_out
from lifecycle.errors import DriverError, DriverUnavailable

__all__ = ["POOL_CALLS", "Busy", "Faults", "Gate", "Script", "SimulatedCrash"]


class SimulatedCrash(BaseException):
    """Raised by ``crash_after``: the process is considered dead at this point."""


class Gate:
    """A held call: ``entered`` is set once the call blocks; ``release`` lets it go on.

    A held call goes on by itself after ``timeout`` seconds, so a test that
    fails before releasing its gate ends instead of hanging the suite.
    """

    def __init__(self, timeout: float = 30.0) -> None:
        self.entered = threading.Event()
        self._released = threading.Event()
        self._timeout = timeout

    def release(self) -> None:
        """Let the held call continue."""
        self._released.set()

    def wait_entered(self, timeout: float = 10.0) -> bool:
        """Block until the held call has started; False on timeout."""
        return self.entered.wait(timeout)

    def _block(self) -> None:
        self.entered.set()
        self._released.wait(self._timeout)


POOL_CALLS = frozenset(
    {
        "spawn",
        "destroy",
        "remove",
        "objects",
        "migrate_disk_and_power_off",
        "finish_migration",
        "finish_revert_migration",
        "confirm_migration",
        "snapshot",
        "spawn_from_snapshot",
        "rescue",
        "unrescue",
    }
)
"""Calls that create, delete, list or stream volumes of the host's pools (busy_pool answers them)."""


class Busy(Exception):
    """A busy pool's answer inside the fake (waited out; never leaves the driver as itself)."""


class Script:
    """The faults scripted for one fake host's next calls (``fake.faults``): what the host meets, in order."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.queued: dict[str, list[tuple[str, Any]]] = {}
        self.busy = 0

    def fail_next(self, call: str, error: BaseException | None = None) -> None:
        """Make the next ``call`` raise ``error`` (a DriverError by default) before acting."""
        exc = error or DriverError(f"injected failure in {call}", call=call)
        self.queued.setdefault(call, []).append(("fail", exc))

    def fail_after(self, call: str, error: BaseException | None = None) -> None:
        """Make the next ``call`` act, then raise ``error`` (a DriverError by default)."""
        exc = error or DriverError(f"injected failure after {call}", call=call)
        self.queued.setdefault(call, []).append(("fail_after", exc))

    def hold(self, call: str) -> Gate:
        """Make the next ``call`` block until the returned gate is released."""
        gate = Gate()
        self.queued.setdefault(call, []).append(("hold", gate))
        return gate

    def busy_pool(self, answers: int) -> None:
        """Make the next ``answers`` storage-pool calls of this host answer busy once each before acting."""
        with self.lock:
            self.busy += answers

    def crash_after(self, call: str) -> None:
        """Make the next ``call`` complete, then raise :class:`SimulatedCrash`."""
        self.queued.setdefault(call, []).append(("crash", None))

    def clear(self, call: str | None = None) -> None:
        """Drop the scripted faults not yet consumed (of ``call``, or of every call); held gates stay held."""
        with self.lock:
            if call is None:
                self.queued.clear()
            else:
                self.queued.pop(call, None)


class Faults(Driver):
    """How one fake host meets the faults scripted for it (:class:`Script`); the host is in ``_host``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []
        self._lock = threading.RLock()
        self.faults = Script()
        """The scripted faults: ``fake.faults.fail_next(call)``, ``hold``, ``crash_after``, ``busy_pool``, ..."""
        self.unreachable = False
        """While True, every call raises DriverUnavailable, as a hypervisor that does not answer."""
        self.busy_seconds = 2.0
        """How long a busy pool answer is waited out (the libvirt driver: ``storage.BUSY_SECONDS``)."""
        self.busy_answers = 0
        """How many busy answers the driver has waited out so far."""

    def _before(self, call: str) -> BaseException | None:
        """Record the call and apply its scripted fault; return what to raise after acting."""
        if self.unreachable:
            raise DriverUnavailable(f"{call}: hypervisor {self.name} unreachable (injected)", call=call)
        if call in POOL_CALLS:
            self._pool_ready(call)
        with self._lock:
            self.calls.append(call)
        with self.faults.lock:
            queue = self.faults.queued.get(call)
            kind, arg = queue.pop(0) if queue else ("", None)
        if kind == "fail":
            assert isinstance(arg, BaseException)
            raise arg
        if kind == "hold":
            assert isinstance(arg, Gate)
            arg._block()
        if kind == "crash":
            return SimulatedCrash(f"crash after {call}")
        return arg if kind == "fail_after" else None

    def _pool_ready(self, call: str) -> None:
        """Wait out the busy answers the storage pool gives ``call`` (busy_pool); DriverError past busy_seconds."""

        def answer() -> None:
            with self.faults.lock:
                if self.faults.busy <= 0:
                    return
                self.faults.busy -= 1
                self.busy_answers += 1
            raise Busy(f"pool '{self.name}-disks' has asynchronous jobs running.")

        try:
            wait_out(answer, lambda exc: isinstance(exc, Busy), seconds=self.busy_seconds, first=0.001, most=0.05)
        except Busy as exc:
            raise DriverError(
                f"{call} failed on {self.name}: {exc} (still busy after {self.busy_seconds:.0f} s of retries)",
                call=call,
            ) from exc
