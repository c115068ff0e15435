"""What a daemon does for one host it owns, on the host's own threads; and the periodic job loop.

Each owned host gets a :class:`HostWorker` with threads of its own, so a
hypervisor that stops answering stalls only its own host: one thread
heartbeats the host while its hypervisor answers a ping (a silent one stops
heartbeating, so the scheduler sees it down until it answers again), one runs
its sync pass at start and every ``sync_interval`` and cleans its image cache
every ``image_cache_interval``, one handles its lifecycle events. Before any
of that, and again each time the hypervisor answers after it stopped, the
worker destroys the host's copies of instances evacuated away from it
(:func:`lifecycle.evacuation.destroy_evacuated`): no heartbeat, sync pass or
event handling for the host until they are gone. Each heartbeat goes through
:meth:`Engine.hosts.heartbeat`, which destroys any copy still pending with the same
function and refuses to record the host up while one remains. Timers run on
the engine's clock (:mod:`lifecycle.clock`, so a test moves them) and sleep
by waiting on events, so SIGTERM and SIGINT stop the daemon at once: a pass
stops between chunks, never inside a write; a thread stuck inside a
hypervisor call is left behind (it is a daemon thread) rather than waited for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lifecycle.errors import EvacuatedCopiesPending
from lifecycle.events import EventProcessor
from lifecycle.logs import get_logger
from lifecycle.sweep import PassSummary, sweep_host

if TYPE_CHECKING:
    from lifecycle.clock import Clock
    from lifecycle.engine import Engine

__all__ = ["HostWorker", "Job", "duty_interval", "run_jobs"]

log = get_logger(__name__)


@dataclass(slots=True)
class Job:
    """A periodic job: run every ``interval`` seconds, first at ``next_due``."""

    name: str
    interval: float
    run: Callable[[], object]
    next_due: float = 0.0


def _run_due(jobs: list[Job], stop: threading.Event, clock: Callable[[], float]) -> float:
    """Run the jobs that are due (each failure logged and retried at its next turn); return the wait to the next."""
    for job in jobs:
        if stop.is_set():
            break
        if job.next_due <= clock():
            try:
                job.run()
            except Exception:  # a failed job is retried at its next turn, the loop goes on
                log.exception("daemon_job_failed", job=job.name)
            job.next_due = clock() + job.interval
    return min(job.next_due for job in jobs) - clock()


def run_jobs(jobs: list[Job], stop: threading.Event, clock: Clock) -> None:
    """Run ``jobs`` as they fall due on ``clock`` until ``stop`` is set, sleeping by waiting on it."""
    while not stop.is_set():
        wait = _run_due(jobs, stop, clock.monotonic)
        if wait > 0:
            clock.wait(stop, wait)


def duty_interval(setting: float) -> float:
    """How often a duty bounded by ``setting`` seconds runs: a tenth of it, from 1 s to a minute."""
    return min(60.0, max(1.0, setting / 10)) if setting > 0 else 60.0


class HostWorker:
    """What a daemon does for one host, on the host's own threads."""

    def __init__(self, engine: Engine, host: str, *, image_cache_interval: float, clock: Clock | None = None) -> None:
        self.engine = engine
        self.host = host
        self.clock = clock or engine.clock
        self.done = threading.Event()
        """Set when the host is released or the daemon stops."""
        self.cleared = threading.Event()
        """Set once the copies of instances evacuated away were destroyed since the hypervisor last answered."""
        self._clearing = threading.Lock()
        self.first_beat = threading.Event()
        """Set once the first heartbeat was tried (recorded, or refused because the hypervisor did not answer)."""
        s = engine.settings
        self.processor = EventProcessor(engine.services, host, s.sync_policy, delay=s.stopped_event_delay)
        self.beats = [Job(f"heartbeat:{host}", max(1.0, s.host_down_after / 3), self.heartbeat)]
        self.jobs = [
            Job(f"sync:{host}", s.sync_interval, self.sync),
            Job(f"image_cache:{host}", image_cache_interval, self.clean_image_cache),
        ]
        self.threads = [
            threading.Thread(target=self.processor.run, args=(self.done,), name=f"events-{host}", daemon=True),
            threading.Thread(
                target=run_jobs, args=(self.beats, self.done, self.clock), name=f"beat-{host}", daemon=True
            ),
            threading.Thread(target=self._work, name=f"work-{host}", daemon=True),
        ]

    def start(self) -> None:
        """Start the host's threads."""
        for thread in self.threads:
            thread.start()

    def heartbeat(self) -> None:
        """Record the host as up, only if its hypervisor answers now (a silent one goes down by itself)."""
        try:
            self._heartbeat()
        finally:
            self.first_beat.set()

    def _heartbeat(self) -> None:
        try:
            self.engine.hosts.driver(self.host).ping()
        except Exception as exc:
            log.warning("host_not_answering", host=self.host, error=f"{type(exc).__name__}: {exc}")
            self.engine.metrics.host_error(self.host, "heartbeat")
            self.cleared.clear()  # when it answers again, its evacuated copies go first
            return
        if not self.clear_evacuated():
            return
        try:
            self.engine.hosts.heartbeat(self.host)  # destroys a copy evacuated since the clear, or refuses
        except EvacuatedCopiesPending as exc:
            log.warning("evacuated_cleanup_failed", host=self.host, error=str(exc))
            self.engine.metrics.host_error(self.host, "evacuated_cleanup")
            self.cleared.clear()

    def clear_evacuated(self) -> bool:
        """Destroy the host's copies of evacuated instances unless done since it last answered; return whether done."""
        with self._clearing:
            if self.cleared.is_set():
                return True
            try:
                destroyed = self.engine.hosts.destroy_evacuated(self.host)
            except Exception as exc:  # retried before the next heartbeat; nothing else runs for the host meanwhile
                log.warning("evacuated_cleanup_failed", host=self.host, error=f"{type(exc).__name__}: {exc}")
                self.engine.metrics.host_error(self.host, "evacuated_cleanup")
                return False
            self.cleared.set()
        if destroyed:
            log.warning("evacuated_copies_destroyed", host=self.host, count=len(destroyed))
        return True

    def sync(self) -> None:
        """One sync pass over the host, stopped between chunks when the host is released; counted in metrics."""
        s = self.engine.settings
        try:
            summary = sweep_host(
                self.engine.services, self.host, s.sync_policy, chunk=s.sync_chunk_size, stop=self.done
            )
        except Exception as exc:
            self.engine.metrics.observe_pass(PassSummary(self.host, error=f"{type(exc).__name__}: {exc}"))
            raise
        self.engine.metrics.observe_pass(summary)

    def clean_image_cache(self) -> None:
        """Clean the host's image cache; a failure is counted in metrics (and logged by the job loop)."""
        try:
            self.engine.images.clean_cache(self.host)
        except Exception:
            self.engine.metrics.host_error(self.host, "image_cache")
            raise

    def _work(self) -> None:
        retry = max(1.0, self.engine.settings.host_down_after / 3)
        while not self.clear_evacuated():
            if self.clock.wait(self.done, retry):
                return
        try:
            self.engine.hosts.driver(self.host).register_event_listener(self.processor.on_event)
        except Exception:  # the periodic pass still covers a host whose events cannot be had
            log.exception("event_listener_failed", host=self.host)
        run_jobs(self.jobs, self.done, self.clock)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the host's threads; a thread stuck in a hypervisor call is not waited for past ``timeout``."""
        self.done.set()
        self.processor.wake()
        releaser = threading.Thread(target=self._unlisten, name=f"unlisten-{self.host}", daemon=True)
        releaser.start()
        deadline = time.monotonic() + timeout
        for thread in [*self.threads, releaser]:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("host_thread_stuck", host=self.host, thread=thread.name)

    def _unlisten(self) -> None:
        with suppress(Exception):  # the driver may be gone with the host, or the hypervisor silent
            self.engine.hosts.driver(self.host).register_event_listener(None)
