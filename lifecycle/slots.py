"""Build slots: at most ``max_concurrent_builds`` spawns per host at once inside one engine (Nova's option).

A burst of creates onto one host queues here instead of piling onto its
hypervisor. A build waiting for a slot shows in its step log as an open step
``queued_for_build_slot`` (``lifecycle tasks``; its detail names the host and
how many builds run there), closed when the slot is granted. Slots are granted in the order they were asked for, and a
waiting build still answers to a takeover: the ``check`` it is given runs
between waits (a delete of a queued build ends the wait at once).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["BuildSlots"]

_POLL_SECONDS = 0.5


class BuildSlots:
    """The build slots of one engine, ``limit`` per host."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._mutex = threading.Lock()
        self._running: collections.Counter[str] = collections.Counter()
        self._queues: dict[str, collections.deque[threading.Event]] = collections.defaultdict(collections.deque)

    def running(self, host: str) -> int:
        """How many builds hold a slot of ``host`` now."""
        with self._mutex:
            return self._running[host]

    def queued(self, host: str) -> int:
        """How many builds wait for a slot of ``host`` now."""
        with self._mutex:
            return len(self._queues[host])

    @contextmanager
    def slot(
        self, host: str, *, queued: Callable[[int], object], granted: Callable[[], object], check: Callable[[], object]
    ) -> Iterator[None]:
        """Hold a slot of ``host`` for the block, waiting in turn when all are taken.

        ``queued(running)`` is called once when the build must wait, then
        ``granted()`` when it gets its slot; ``check()`` runs between waits and
        may raise (the task was taken over). Whatever any of them raises (a
        database that went away), the place in line or the slot is given back.
        """
        with self._mutex:
            queue = self._queues[host]
            free = self._running[host] < self.limit and not queue
            turn = threading.Event()
            if free:
                self._running[host] += 1
            else:
                queue.append(turn)
                running = self._running[host]
        if not free:
            try:
                queued(running)
                while not turn.wait(_POLL_SECONDS):
                    check()
            except BaseException:  # the place in line (or a slot granted meanwhile) is given back
                self._leave(host, turn)
                raise
        try:
            if not free:
                granted()
            yield
        finally:
            self._release(host)

    def _leave(self, host: str, turn: threading.Event) -> None:
        """Give up a place in line; a slot granted meanwhile is passed on."""
        with self._mutex:
            if not turn.is_set():
                self._queues[host].remove(turn)
                return
        self._release(host)

    def _release(self, host: str) -> None:
        with self._mutex:
            queue = self._queues[host]
            if queue:
                queue.popleft().set()  # handed over: the count stays, now the next build's
                return
            self._running[host] -= 1
