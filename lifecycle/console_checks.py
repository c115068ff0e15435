"""The console proxy's token checks: the database's half, then the hypervisor's, each bounded.

A token check is two synchronous halves, each on a thread pool of the proxy's own (never
asyncio's default, which the websockets library shares) and each with a deadline of
``_CHECK_DEADLINE`` seconds, past which the handshake gets HTTP 503: the database's (the token
is valid, its instance where it was issued), then the hypervisor's (the guest still serves the
port). A host holds at most ``_CHECKS_PER_HOST`` threads in a check (counted until the thread
really returns: a libvirt call stuck on a hung host keeps its thread), further handshakes to its
guests get 503 at once, and so do they for ``_SILENT_FOR`` seconds after one of its checks missed
the deadline: one hung hypervisor never takes the threads other hosts' handshakes need. A check
not yet started when its handshake is given up (deadline, or the client gone) never runs.
"""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from lifecycle.console import ConsoleConnection, TokenClaim
from lifecycle.errors import DriverUnavailable

__all__ = ["TokenChecker", "Unavailable"]

_CHECK_DEADLINE = 5.0
"""Seconds each half of a token check (database, hypervisor) may take before the handshake gets 503."""
_CHECKS_PER_HOST = 2
"""Threads one host may hold in hypervisor checks; a handshake beyond that gets 503 at once."""
_SILENT_FOR = 10.0
"""Seconds a host whose check missed the deadline is answered 503 at once, without asking it."""
_DB_THREADS = 4
_HYPERVISOR_THREADS = 16
R = TypeVar("R")


class Unavailable(Exception):
    """A token check could not be answered in time (the database or the hypervisor): the handshake gets 503."""


class TokenChecker:
    """Checks tokens for one proxy, on two thread pools of its own.

    ``lookup`` is the database's half (:func:`lifecycle.console.lookup`: a claim, or None),
    ``serving`` the hypervisor's (:func:`lifecycle.console.serving`: where to connect, or None).
    Both run on the loop's behalf; :meth:`check` is called from the loop's thread only.
    """

    def __init__(
        self,
        lookup: Callable[[str], TokenClaim | None],
        serving: Callable[[TokenClaim], ConsoleConnection | None],
    ) -> None:
        self._lookup = lookup
        self._serving = serving
        self._db = ThreadPoolExecutor(_DB_THREADS, thread_name_prefix="console-db")
        self._hypervisor = ThreadPoolExecutor(_HYPERVISOR_THREADS, thread_name_prefix="console-hypervisor")
        self._checking: Tally[str] = Tally()
        """Threads in a hypervisor check, per host, until each really returns."""
        self._silent_until: dict[str, float] = {}

    async def check(self, token: str) -> ConsoleConnection | None:
        """Check a token: where to connect, None when it is not valid; :class:`Unavailable` when not answered in time.

        InvalidInput (a malformed token) and the database's own errors pass through.
        """
        loop = asyncio.get_running_loop()
        claim = await self._within(self._db.submit(self._lookup, token), "the database")
        if claim is None:
            return None
        host = claim.host
        if loop.time() < self._silent_until.get(host, 0.0):
            raise Unavailable(f"host {host} missed a check's deadline lately: not asked again yet")
        if self._checking[host] >= _CHECKS_PER_HOST:
            raise Unavailable(f"host {host} has {self._checking[host]} checks in flight already")
        self._checking[host] += 1
        future = self._hypervisor.submit(self._serving, claim)
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._checked, host))
        try:
            return await self._within(future, f"host {host}")
        except Unavailable:
            self._silent_until[host] = loop.time() + _SILENT_FOR
            raise
        except DriverUnavailable as exc:
            raise Unavailable(f"host {host} does not answer: {exc}") from exc

    def shutdown(self) -> None:
        """Stop both pools without waiting: a thread stuck in a hung hypervisor is not waited for."""
        for pool in (self._db, self._hypervisor):
            pool.shutdown(wait=False, cancel_futures=True)

    def _checked(self, host: str) -> None:
        self._checking[host] -= 1
        if self._checking[host] <= 0:
            del self._checking[host]

    async def _within(self, future: Future[R], who: str) -> R:
        """Wait for a check's thread up to the deadline (a check not started by then never runs)."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), _CHECK_DEADLINE)
        except TimeoutError:
            raise Unavailable(f"{who} did not answer within {_CHECK_DEADLINE:.0f} s") from None
