"""The sync daemon: periodic jobs and event listeners for the hosts it owns.

A daemon owns a host through :meth:`Store.try_claim_host` (a PostgreSQL
advisory lock, or a lock file beside a SQLite database), so several daemons
split the hosts between them and no host is ever synced by two at once; the
hosts of a daemon that dies are claimed by the others at their next claim
round. At start and every lease period it recovers tasks whose owner died
(:mod:`lifecycle.recovery`); every minute it applies the resize confirm
window (:mod:`lifecycle.resize_window`). For each owned host it records a heartbeat (so the scheduler sees
the host up), runs a sync pass at start and then every ``sync_interval``,
listens to the host's lifecycle events, and cleans the host's image cache
every ``image_cache_interval``. Timers sleep by waiting on
the stop event, so SIGTERM and SIGINT stop the daemon at once: a pass stops
between chunks, never inside a write.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from lifecycle.events import EventProcessor
from lifecycle.store.store import HostClaim
from lifecycle.sweep import sweep_host

if TYPE_CHECKING:
    from lifecycle.engine import Engine

__all__ = ["Daemon", "Job"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Job:
    """A periodic job: run every ``interval`` seconds, first at ``next_due``."""

    name: str
    interval: float
    run: Callable[[], object]
    next_due: float = 0.0


class Daemon:
    """Runs until :attr:`stop` is set; call :meth:`run` on the thread that owns it."""

    def __init__(
        self,
        engine: Engine,
        *,
        hosts: list[str] | None = None,
        claim_interval: float = 10.0,
        image_cache_interval: float = 2400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.only_hosts = set(hosts) if hosts else None
        self.claim_interval = claim_interval
        self.image_cache_interval = image_cache_interval
        self.clock = clock
        self.stop = threading.Event()
        self.claims: dict[str, HostClaim] = {}
        self.jobs: list[Job] = [
            Job("recover_tasks", engine.settings.lease_seconds, engine.recover),
            Job("claim_hosts", claim_interval, self._claim_hosts),
            Job("resize_window", 60.0, engine.poll_unconfirmed_resizes),
        ]
        self._processors: dict[str, tuple[EventProcessor, threading.Thread, threading.Event]] = {}

    def run(self) -> None:
        """Run jobs until stopped; then release every host and listener."""
        log.info("daemon_started", pid=os.getpid(), owner=self.engine.owner)
        try:
            while not self.stop.is_set():
                self._run_due()
                wait = min(job.next_due for job in self.jobs) - self.clock()
                if wait > 0:
                    self.stop.wait(wait)
        finally:
            self._shutdown()
            log.info("daemon_stopped", pid=os.getpid())

    def _run_due(self) -> None:
        for job in list(self.jobs):
            if self.stop.is_set():
                return
            if job.next_due <= self.clock():
                try:
                    job.run()
                except Exception:  # a failed job is retried at its next turn, the daemon goes on
                    log.exception("daemon_job_failed", job=job.name)
                job.next_due = self.clock() + job.interval

    def _claim_hosts(self) -> None:
        # Disabled hosts too: disabling only keeps the scheduler away; their guests still need sync.
        names = {h.name for h in self.engine.hosts()}
        for gone in [h for h in self.claims if h not in names]:
            self._release(gone)
        for name in sorted(names):
            wanted = self.only_hosts is None or name in self.only_hosts
            if not wanted or name in self.claims:
                continue
            claim = self.engine.store.try_claim_host(name)
            if claim is not None:
                self._own(name, claim)

    def _release(self, host: str) -> None:
        """Stop serving a host that was removed: its jobs, its listener, its claim."""
        self.jobs = [job for job in self.jobs if not job.name.endswith(f":{host}")]
        processor, thread, done = self._processors.pop(host)
        with suppress(Exception):  # the driver went with the host
            self.engine.driver(host).register_event_listener(None)
        done.set()
        processor.wake()
        thread.join(timeout=5)
        self.claims.pop(host).release()
        log.info("host_released", host=host, reason="removed")

    def _own(self, host: str, claim: HostClaim) -> None:
        self.claims[host] = claim
        s = self.engine.settings
        processor = EventProcessor(self.engine, host, s.sync_policy, delay=s.stopped_event_delay)
        done = threading.Event()  # set when this host is released or the daemon stops
        thread = threading.Thread(target=processor.run, args=(done,), name=f"events-{host}", daemon=True)
        thread.start()
        self._processors[host] = (processor, thread, done)
        try:
            self.engine.driver(host).register_event_listener(processor.on_event)
        except Exception:  # the periodic pass still covers a host whose events cannot be had
            log.exception("event_listener_failed", host=host)
        self.jobs.append(Job(f"heartbeat:{host}", max(1.0, s.host_down_after / 3), lambda: self.engine.heartbeat(host)))
        self.jobs.append(Job(f"sync:{host}", s.sync_interval, lambda: self._sync(host)))
        self.jobs.append(
            Job(f"image_cache:{host}", self.image_cache_interval, lambda: self.engine.clean_image_cache(host))
        )
        log.info("host_claimed", host=host, pid=os.getpid())

    def _sync(self, host: str) -> None:
        s = self.engine.settings
        sweep_host(self.engine, host, s.sync_policy, chunk=s.sync_chunk_size, stop=self.stop)

    def _shutdown(self) -> None:
        self.stop.set()
        for host, (processor, thread, done) in self._processors.items():
            try:
                self.engine.driver(host).register_event_listener(None)
            except Exception:
                log.exception("event_listener_release_failed", host=host)
            done.set()
            processor.wake()
            thread.join(timeout=5)
        for claim in self.claims.values():
            claim.release()
        self.claims.clear()
