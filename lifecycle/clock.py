"""The lifecycle's clock: what time it is for its policy, injectable so tests can move it.

Every policy time reads one :class:`Clock`, given to the engine
(``Engine(..., clock=...)``) and passed from there to the store, the runner,
the services and the daemon: when something happened (task, step, audit,
heartbeat, feed and token rows), what is old (the resize confirm window,
build timeouts, queued deletes, shelved offload, feed retention, a host not
heard from for ``host_down_after``), what expired (task leases, console
tokens), and when a daemon job is due (:meth:`Clock.monotonic`,
:meth:`Clock.wait`). The database's own ``now()`` is never used: a
comparison takes the clock's time as a parameter, so a test clock moves
every one of them together.

Waits on real processes are not policy and keep :func:`time.monotonic` for
their own deadlines: a driver polling a domain's state, a socket or HTTP
timeout, a connection pool's idle check, a thread join on shutdown, a
preemptor waiting for the worker it stopped, how often a feed follower saves
its position. So do the timestamps other parties check against their own
clocks (a webhook's signature time) and those a hypervisor's events carry.

:class:`SystemClock` is the default; :class:`ManualClock` is the test clock,
which moves only when told (:meth:`~ManualClock.advance`, :meth:`~ManualClock.set`).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """Where the lifecycle reads the time."""

    def now(self) -> datetime:
        """Return the current time, timezone-aware UTC."""

    def monotonic(self) -> float:
        """Return seconds on a clock that never goes back (for the daemon's timers)."""

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Wait until ``event`` is set or ``seconds`` passed on this clock; return whether ``event`` is set."""


class SystemClock:
    """The real time: :func:`datetime.now` in UTC and :func:`time.monotonic`."""

    def now(self) -> datetime:
        """Return the current time, timezone-aware UTC."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """Return :func:`time.monotonic`."""
        return time.monotonic()

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Return :meth:`threading.Event.wait` of ``seconds``."""
        return event.wait(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


class ManualClock:
    """A clock that stands still until moved; safe to read and move from any thread.

    It starts at ``start`` (default: the real time when made, to the second)
    with :meth:`monotonic` at 0; :meth:`advance` moves both, :meth:`set`
    moves the wall time only (forwards or back, as a system clock can).
    :meth:`wait` returns once the clock was advanced far enough (or the
    event is set), however little real time passed; :attr:`waiting` says how
    many threads are inside it, so a test can advance the clock once a timer
    is asleep (and not while its thread is still working out its next turn).
    """

    _POLL = 0.02
    """Real seconds between two looks at a waited event (an event cannot wake a condition)."""

    def __init__(self, start: datetime | None = None) -> None:
        if start is not None and start.tzinfo is None:
            raise ValueError(f"start must be timezone-aware, got {start!r}")
        self._lock = threading.Condition()
        self._now = (start or datetime.now(UTC).replace(microsecond=0)).astimezone(UTC)
        self._monotonic = 0.0
        self._waiting = 0

    def now(self) -> datetime:
        """Return the clock's time, timezone-aware UTC."""
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        """Return the seconds this clock was advanced since it was made."""
        with self._lock:
            return self._monotonic

    def advance(self, seconds: float) -> datetime:
        """Move the clock ``seconds`` (not negative) forwards; return the new time."""
        if seconds < 0:
            raise ValueError(f"a clock advances by zero seconds or more, got {seconds}")
        with self._lock:
            self._now += timedelta(seconds=seconds)
            self._monotonic += seconds
            self._lock.notify_all()
            return self._now

    def set(self, moment: datetime) -> None:
        """Set the wall time to ``moment`` (timezone-aware); :meth:`monotonic` does not move."""
        if moment.tzinfo is None:
            raise ValueError(f"moment must be timezone-aware, got {moment!r}")
        with self._lock:
            self._now = moment.astimezone(UTC)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Wait until ``event`` is set or the clock was advanced ``seconds`` from now; return whether it is set."""
        with self._lock:
            deadline = self._monotonic + seconds
            self._waiting += 1
            try:
                while not event.is_set() and self._monotonic < deadline:
                    self._lock.wait(self._POLL)
            finally:
                self._waiting -= 1
        return event.is_set()

    @property
    def waiting(self) -> int:
        """How many threads are inside :meth:`wait` now."""
        with self._lock:
            return self._waiting

    def __repr__(self) -> str:
        return f"ManualClock({self.now().isoformat()})"
