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

Each owned host gets a :class:`lifecycle.host_worker.HostWorker`, with threads of its own.

:func:`serve` is the process around it, what ``lifecycle daemon`` runs: the
engine, the Prometheus endpoint, the signal handlers.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING

from lifecycle import validation
from lifecycle.errors import InMemoryHostElsewhere, InvalidInput
from lifecycle.host_worker import HostWorker, Job, duty_interval, run_jobs
from lifecycle.logs import get_logger
from lifecycle.store.store import HostClaim

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from lifecycle.clock import Clock
    from lifecycle.config import Settings
    from lifecycle.engine import Engine
    from lifecycle.records import Host

__all__ = ["Daemon", "HostWorker", "Job", "serve"]

log = get_logger(__name__)


class Daemon:
    """What keeps an engine's hosts and instances right over time: run one beside every application, in its process.

    An embedder runs it on a thread of its own (``with Daemon(engine):``,
    or :meth:`start` then :meth:`close`); ``lifecycle daemon`` runs it as a
    process (:func:`serve`, which calls :meth:`run`). Without one, hosts
    stop heartbeating and after ``host_down_after`` the scheduler finds no
    host up (every create fails "ComputeFilter: down"). It does:

    - for each host it claims (every ``claim_interval`` s; a host is served
      by one daemon at a time): heartbeats while the hypervisor answers a ping
      (every ``host_down_after`` / 3 s, at least 1 s), a power-sync pass at start
      and every ``sync_interval`` s, the hypervisor's lifecycle events, the
      image cache cleanup every ``image_cache_interval`` s, and the destruction
      of the copies of instances evacuated away from it before anything else;
    - recovery of tasks whose owner's lease ran out, at start and every ``lease_seconds``;
    - the resize confirm window (``resize_confirm_window``), every minute;
    - the operator duties, each every tenth of its setting (1 s to a minute) when set:
      reclaim of soft-deleted instances (``reclaim_instance_interval``), the
      build timeout (``instance_build_timeout``), the offload of shelved
      instances (``shelved_offload_time``), the change feed's retention
      (``change_retention``);
    - every minute, the purge of console tokens revoked or long expired.

    A job that fails is logged (``daemon_job_failed``, with its traceback) and
    run again at its next turn; the daemon goes on. Its timers run on the
    engine's clock. An in-memory fake host (``fake://``) another process added
    is never claimed (:class:`~lifecycle.errors.InMemoryHostElsewhere`, logged once).

    Its arguments are checked when it is made (:class:`~lifecycle.errors.InvalidInput`):
    ``hosts`` is None (every host) or a list, tuple or set of host names, each
    a host of the engine now (else :class:`~lifecycle.errors.HostNotFound`);
    the intervals are finite numbers of seconds, at least 0.01.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        hosts: list[str] | tuple[str, ...] | set[str] | frozenset[str] | None = None,
        claim_interval: float = 10.0,
        image_cache_interval: float = 2400.0,
        clock: Clock | None = None,
    ) -> None:
        self.engine = engine
        self.only_hosts = _hosts(engine, hosts)
        self.claim_interval = claim_interval = validation.period("claim_interval", claim_interval, _MIN_INTERVAL)
        self.image_cache_interval = validation.period("image_cache_interval", image_cache_interval, _MIN_INTERVAL)
        self.clock = clock or engine.clock
        """What the jobs' timers run on: the engine's clock unless given."""
        self.stop = threading.Event()
        """Set to stop the daemon: :meth:`run` returns within a moment, having released every host."""
        self.thread: threading.Thread | None = None
        """The thread :meth:`start` runs the daemon on (None when it was not started that way)."""
        self.failure: BaseException | None = None
        """What ended :meth:`run` on the daemon's own thread, if anything did (it is logged too)."""
        self._refused: set[str] = set()
        self._first_round = threading.Event()
        self.claims: dict[str, HostClaim] = {}
        self.workers: dict[str, HostWorker] = {}
        self.jobs: list[Job] = [
            Job("recover_tasks", engine.settings.lease_seconds, engine.recover),
            Job("claim_hosts", claim_interval, self._claim_hosts),
            Job("resize_window", 60.0, engine.duties.poll_unconfirmed_resizes),
            Job(
                "reclaim",
                duty_interval(engine.settings.reclaim_instance_interval),
                engine.duties.reclaim_queued_deletes,
            ),
            Job(
                "build_timeout",
                duty_interval(engine.settings.instance_build_timeout),
                engine.duties.check_build_timeouts,
            ),
            Job(
                "shelved_offload",
                duty_interval(engine.settings.shelved_offload_time),
                engine.duties.offload_shelved_instances,
            ),
            Job("prune_changes", duty_interval(engine.settings.change_retention), engine.feed.prune),
            Job("purge_console_tokens", 60.0, engine.duties.purge_console_tokens),
        ]

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def start(self) -> Daemon:
        """Run the daemon on a thread of its own (``lifecycle-daemon``, a daemon thread); return it.

        For an application embedding the engine: start it at start-up (an
        ASGI lifespan, say) and :meth:`close` it at shutdown. Starting twice,
        or after :meth:`close`, is refused (:class:`InvalidInput`).
        """
        if self.thread is not None:
            raise InvalidInput("this daemon was started already: make a new Daemon to run it again")
        if self.stop.is_set():
            raise InvalidInput("this daemon was closed: make a new Daemon to run it")
        self.thread = threading.Thread(target=self._run_logged, name="lifecycle-daemon", daemon=True)
        self.thread.start()
        return self

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until the first claim round ran and each host it claimed had its first heartbeat; return whether so.

        Call it after :meth:`start` when the application creates instances at
        once: until then the scheduler may see no host up. A host whose
        hypervisor does not answer counts once its first ping failed. False too
        when a host named in ``hosts`` was not claimed (another daemon serves
        it, or it cannot be served from this process).
        """
        timeout = validation.seconds("timeout", timeout)
        deadline = time.monotonic() + timeout
        if not self._first_round.wait(timeout):
            return False
        if self.only_hosts is not None and not self.only_hosts <= self.workers.keys():
            return False
        return all(w.first_beat.wait(max(0.0, deadline - time.monotonic())) for w in list(self.workers.values()))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the daemon and wait up to ``timeout`` s for its thread to release its hosts; safe to call twice.

        A host thread stuck in a hypervisor call is not waited for (see
        :meth:`HostWorker.stop`); a daemon thread still running after ``timeout``
        is logged (``daemon_thread_stuck``) and left behind.
        """
        timeout = validation.seconds("timeout", timeout)
        self.stop.set()
        thread = self.thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("daemon_thread_stuck", thread=thread.name, timeout=timeout)

    def _run_logged(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # on its own thread nobody would see it: kept and logged
            self.failure = exc
            log.exception("daemon_failed")

    def run(self) -> None:
        """Run the daemon-wide jobs on this thread until stopped; then release every host."""
        log.info("daemon_started", pid=os.getpid(), owner=self.engine.owner)
        try:
            run_jobs(self.jobs, self.stop, self.clock)
        finally:
            self._shutdown()
            log.info("daemon_stopped", pid=os.getpid())

    def _claim_hosts(self) -> None:
        # Disabled hosts too: disabling only keeps the scheduler away; their guests still need sync.
        hosts = self.engine.hosts.list()
        names = {h.name for h in hosts}
        for gone in [h for h in self.claims if h not in names]:
            self._release(gone, reason="removed")
        for host in sorted(hosts, key=lambda h: h.name):
            name = host.name
            wanted = self.only_hosts is None or name in self.only_hosts
            if not wanted or name in self.claims or not self._servable(host):
                continue
            claim = self.engine.store.ownership.try_claim_host(name)
            if claim is not None:
                self._own(name, claim)
        self._first_round.set()

    def _servable(self, host: Host) -> bool:
        """Whether this process can serve ``host``: not another process's in-memory fake (said once per host)."""
        try:
            self.engine.drivers.check_here(host)
        except InMemoryHostElsewhere as exc:
            if host.name not in self._refused:
                self._refused.add(host.name)
                log.error("host_not_served", host=host.name, error=str(exc))
            return False
        return True

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


_MIN_INTERVAL = 0.01
"""The shortest interval a Daemon takes: zero or less would spin a core."""


def _hosts(engine: Engine, hosts: object) -> set[str] | None:
    """Return the host names a Daemon is limited to (None: every host), each a host of the engine."""
    if hosts is None:
        return None
    if not isinstance(hosts, list | tuple | set | frozenset) or not hosts:
        raise InvalidInput(f"hosts must be a non-empty list of host names, or None for every host, got {hosts!r:.80}")
    names = {validation.name("host", h) for h in hosts}
    for name in sorted(names):
        engine.hosts.get(name)  # HostNotFound for a typo
    return names


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
        for name in hosts or ():  # refuse a typo, or another process's in-memory host, before claiming anything
            engine.drivers.check_here(engine.hosts.get(name))
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
