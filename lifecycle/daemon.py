"""The sync daemon: periodic jobs and event listeners for the hosts it owns.

A daemon owns a host through :meth:`Store.ownership.try_claim_host` (a PostgreSQL
advisory lock, or a lock file beside a SQLite database), so several daemons
split the hosts between them and no host is ever synced by two at once; the
hosts of a daemon that dies are claimed by the others at their next claim
round. At start and every lease period it recovers tasks whose owner died
(:mod:`lifecycle.recovery`); every minute it applies the resize confirm
window (:mod:`lifecycle.resize_window`); and it runs the operator duties
(:mod:`lifecycle.duties`): reclaim of soft-deleted instances and the build
timeout, and the change feed's retention (``change_retention``), each every
tenth of its setting (1 s to a minute) when set; every minute it deletes the
console tokens revoked or long expired (:func:`lifecycle.duties.purge_console_tokens`).

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

:func:`serve` is the process around it, what ``lifecycle daemon`` runs: the
engine, the Prometheus endpoint, the signal handlers.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lifecycle.errors import EvacuatedCopiesPending, InvalidInput
from lifecycle.events import EventProcessor
from lifecycle.logs import get_logger
from lifecycle.store.store import HostClaim
from lifecycle.sweep import PassSummary, sweep_host

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from lifecycle.clock import Clock
    from lifecycle.config import Settings
    from lifecycle.engine import Engine

__all__ = ["Daemon", "HostWorker", "Job", "serve"]

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


def _loop(jobs: list[Job], stop: threading.Event, clock: Clock) -> None:
    while not stop.is_set():
        wait = _run_due(jobs, stop, clock.monotonic)
        if wait > 0:
            clock.wait(stop, wait)


def _duty_interval(setting: float) -> float:
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
        s = engine.settings
        self.processor = EventProcessor(engine.services, host, s.sync_policy, delay=s.stopped_event_delay)
        self.beats = [Job(f"heartbeat:{host}", max(1.0, s.host_down_after / 3), self.heartbeat)]
        self.jobs = [
            Job(f"sync:{host}", s.sync_interval, self.sync),
            Job(f"image_cache:{host}", image_cache_interval, self.clean_image_cache),
        ]
        self.threads = [
            threading.Thread(target=self.processor.run, args=(self.done,), name=f"events-{host}", daemon=True),
            threading.Thread(target=_loop, args=(self.beats, self.done, self.clock), name=f"beat-{host}", daemon=True),
            threading.Thread(target=self._work, name=f"work-{host}", daemon=True),
        ]

    def start(self) -> None:
        """Start the host's threads."""
        for thread in self.threads:
            thread.start()

    def heartbeat(self) -> None:
        """Record the host as up, only if its hypervisor answers now (a silent one goes down by itself)."""
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
        _loop(self.jobs, self.done, self.clock)

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


class Daemon:
    """Runs until :attr:`stop` is set; call :meth:`run` on the thread that owns it."""

    def __init__(
        self,
        engine: Engine,
        *,
        hosts: list[str] | None = None,
        claim_interval: float = 10.0,
        image_cache_interval: float = 2400.0,
        clock: Clock | None = None,
    ) -> None:
        self.engine = engine
        self.only_hosts = set(hosts) if hosts else None
        self.claim_interval = claim_interval
        self.image_cache_interval = image_cache_interval
        self.clock = clock or engine.clock
        """What the jobs' timers run on: the engine's clock unless given."""
        self.stop = threading.Event()
        self.claims: dict[str, HostClaim] = {}
        self.workers: dict[str, HostWorker] = {}
        self.jobs: list[Job] = [
            Job("recover_tasks", engine.settings.lease_seconds, engine.recover),
            Job("claim_hosts", claim_interval, self._claim_hosts),
            Job("resize_window", 60.0, engine.duties.poll_unconfirmed_resizes),
            Job(
                "reclaim",
                _duty_interval(engine.settings.reclaim_instance_interval),
                engine.duties.reclaim_queued_deletes,
            ),
            Job(
                "build_timeout",
                _duty_interval(engine.settings.instance_build_timeout),
                engine.duties.check_build_timeouts,
            ),
            Job(
                "shelved_offload",
                _duty_interval(engine.settings.shelved_offload_time),
                engine.duties.offload_shelved_instances,
            ),
            Job("prune_changes", _duty_interval(engine.settings.change_retention), engine.feed.prune),
            Job("purge_console_tokens", 60.0, engine.duties.purge_console_tokens),
        ]

    def run(self) -> None:
        """Run the daemon-wide jobs until stopped; then release every host."""
        log.info("daemon_started", pid=os.getpid(), owner=self.engine.owner)
        try:
            _loop(self.jobs, self.stop, self.clock)
        finally:
            self._shutdown()
            log.info("daemon_stopped", pid=os.getpid())

    def _claim_hosts(self) -> None:
        # Disabled hosts too: disabling only keeps the scheduler away; their guests still need sync.
        names = {h.name for h in self.engine.hosts.list()}
        for gone in [h for h in self.claims if h not in names]:
            self._release(gone, reason="removed")
        for name in sorted(names):
            wanted = self.only_hosts is None or name in self.only_hosts
            if not wanted or name in self.claims:
                continue
            claim = self.engine.store.ownership.try_claim_host(name)
            if claim is not None:
                self._own(name, claim)

    def _own(self, host: str, claim: HostClaim) -> None:
        self.claims[host] = claim
        worker = HostWorker(self.engine, host, image_cache_interval=self.image_cache_interval, clock=self.clock)
        self.workers[host] = worker
        worker.start()
        log.info("host_claimed", host=host, pid=os.getpid())

    def _release(self, host: str, *, reason: str) -> None:
        """Stop serving a host: its threads, its listener, its claim."""
        self.workers.pop(host).stop()
        self.claims.pop(host).release()
        log.info("host_released", host=host, reason=reason)

    def _shutdown(self) -> None:
        self.stop.set()
        for host in list(self.workers):
            self._release(host, reason="stopping")


def serve(
    db_url: str,
    settings: Settings,
    *,
    hosts: list[str] | None = None,
    claim_interval: float = 10.0,
    metrics_listen: tuple[str, int] | None = None,
) -> None:
    """Run a daemon over the engine at ``db_url`` until SIGTERM or SIGINT, then release its hosts and stop.

    A name in ``hosts`` that is no host is refused before anything is
    claimed; with ``metrics_listen`` (address, port) the engine's metrics are
    served over HTTP for as long as the daemon runs, and an address that
    cannot be bound is refused (:class:`InvalidInput`) before it starts.
    Signal handlers are installed, so call it on the main thread.
    """
    from lifecycle.engine import Engine  # the engine pulls in the whole package; the CLI imports this module late

    with Engine(db_url, settings=settings) as engine:
        for name in hosts or ():
            engine.hosts.get(name)  # refuse a typo before claiming anything
        server = None if metrics_listen is None else _serve_metrics(engine, *metrics_listen)
        daemon = Daemon(engine, hosts=hosts, claim_interval=claim_interval)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: daemon.stop.set())
        try:
            daemon.run()
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()


def _serve_metrics(engine: Engine, addr: str, port: int) -> WSGIServer:
    """Serve the engine's metrics at ``addr:port`` on a thread of their own; return the server."""
    from prometheus_client import start_wsgi_server

    try:
        server, _ = start_wsgi_server(port, addr=addr, registry=engine.metrics.registry)
    except OSError as exc:
        raise InvalidInput(f"--metrics-listen {addr}:{port}: {exc.strerror or exc}") from None
    return server
