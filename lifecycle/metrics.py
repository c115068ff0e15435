"""Prometheus metrics of an engine, on a registry of its own that an embedder can mount anywhere.

Counted as things happen (the daemon and the engine call the ``observe_*``
methods); read from the database at scrape time (so always current, and
right across several engine processes): instances per state, running tasks
and the age of the oldest per operation (a stuck task shows as an age that
only grows), and each host up or down. ``lifecycle daemon --metrics-listen
ADDR:PORT`` serves :attr:`Metrics.registry` in Prometheus text format.

prometheus-client is imported, and the metrics made, when first used (an
observation, or reading ``registry``), or at once when the embedder gives a
registry of its own: a command that only reads the database never loads it.

=========================================  ================================================
metric                                     meaning
=========================================  ================================================
lifecycle_sync_pass_seconds{host}          histogram of sync pass durations
lifecycle_sync_passes_total{host,result}   passes: ok, interrupted, or failed (could not run)
lifecycle_sync_drift_total{host}           instances a pass found out of sync
lifecycle_sync_actions_total{host,rule}    what passes and events did, per sync rule
lifecycle_host_errors_total{host,kind}     sync_pass, heartbeat, event or image_cache errors
lifecycle_event_lag_seconds{host}          hypervisor event time to handling time
lifecycle_recovered_tasks_total{plan,...}  tasks recovery took over, per plan and outcome
lifecycle_resize_window_total{action,...}  finished moves the confirm window confirmed or reverted
lifecycle_instances{vm_state,task_state}   live instances per state (scrape time)
lifecycle_running_tasks{operation}         running tasks per operation (scrape time)
lifecycle_oldest_running_task_seconds{op}  age of the oldest running task (scrape time)
lifecycle_host_up{host}                    1 while the host heartbeats within host_down_after
lifecycle_database_up                      1 when the scrape's database reads worked, else 0
=========================================  ================================================

A scrape while the database does not answer still succeeds: it serves the
counted families and ``lifecycle_database_up 0`` (the scrape-time families
are left out, not served stale), and logs the database's own error.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from lifecycle.logs import get_logger
from lifecycle.placement import host_is_up

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    from lifecycle.config import Settings
    from lifecycle.recovery import Recovered
    from lifecycle.results import PassSummary, WindowResult
    from lifecycle.store import Store

__all__ = ["Metrics"]

log = get_logger(__name__)

_PASS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 30, 60, 300)


class Metrics:
    """The metrics of one engine."""

    def __init__(self, store: Store, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self._store = store
        self._settings = settings
        self._given = registry
        self._lock = threading.Lock()
        self._built: _Made | None = None
        if registry is not None:
            self._made  # noqa: B018  # the embedder's registry shows the metrics from the start, as it always did

    @property
    def registry(self) -> CollectorRegistry:
        """The registry to serve: the embedder's, else one of this engine's own."""
        return self._made.registry

    @property
    def _made(self) -> _Made:
        made = self._built
        if made is None:
            with self._lock:  # once, whichever thread observes first
                if self._built is None:
                    self._built = _Made(self._store, self._settings, self._given)
                made = self._built
        return made

    def observe_pass(self, summary: PassSummary) -> None:
        """Count one sync pass: its duration, result, drift and the actions per rule."""
        self._made.observe_pass(summary)

    def observe_event(self, host: str, at: datetime, outcome: str) -> None:
        """Count one handled hypervisor event: its lag, and the rule it fired (or an error)."""
        self._made.observe_event(host, at, outcome)

    def host_error(self, host: str, kind: str) -> None:
        """Count an error of a host's heartbeat, image cache cleanup or other periodic job."""
        self._made.errors.labels(host, kind).inc()

    def observe_recovery(self, results: Iterable[Recovered]) -> None:
        """Count the tasks a recovery round took over."""
        for r in results:
            self._made.recovered.labels(r.plan, r.outcome).inc()

    def observe_window(self, results: Iterable[WindowResult]) -> None:
        """Count the moves the confirm window handled."""
        for r in results:
            self._made.window.labels(r.action, r.outcome).inc()


class _Made:
    """The registry and the metrics on it, made on first use."""

    def __init__(self, store: Store, settings: Settings, registry: CollectorRegistry | None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pass_seconds = Histogram(
            "lifecycle_sync_pass_seconds", "Duration of sync passes", ["host"], buckets=_PASS_BUCKETS, registry=r
        )
        self.passes = Counter("lifecycle_sync_passes", "Sync passes by result", ["host", "result"], registry=r)
        self.drift = Counter("lifecycle_sync_drift", "Instances found out of sync by passes", ["host"], registry=r)
        self.actions = Counter("lifecycle_sync_actions", "Sync actions taken, per rule", ["host", "rule"], registry=r)
        self.errors = Counter("lifecycle_host_errors", "Errors per host and kind", ["host", "kind"], registry=r)
        self.event_lag = Histogram(
            "lifecycle_event_lag_seconds", "Hypervisor event to handling", ["host"], buckets=_LAG_BUCKETS, registry=r
        )
        self.recovered = Counter(
            "lifecycle_recovered_tasks", "Tasks taken over by recovery", ["plan", "outcome"], registry=r
        )
        self.window = Counter(
            "lifecycle_resize_window", "Moves the confirm window handled", ["action", "outcome"], registry=r
        )
        r.register(_state_collector(store, settings))

    def observe_pass(self, summary: PassSummary) -> None:
        """Count one sync pass: its duration, result, drift and the actions per rule."""
        host = summary.host
        result = "failed" if summary.error is not None else "interrupted" if summary.interrupted else "ok"
        self.passes.labels(host, result).inc()
        if summary.error is not None:
            self.errors.labels(host, "sync_pass").inc()
            return
        self.pass_seconds.labels(host).observe(summary.duration_ms / 1000)
        self.drift.labels(host).inc(summary.drifted)
        if summary.errors:
            self.errors.labels(host, "sync_pass").inc(summary.errors)
        for rule, count in summary.rules.items():
            self.actions.labels(host, rule).inc(count)

    def observe_event(self, host: str, at: datetime, outcome: str) -> None:
        """Count one handled hypervisor event: its lag, and the rule it fired (or an error)."""
        # Real time, as the hypervisor stamped the event: a lag is a duration measured, not a policy time.
        self.event_lag.labels(host).observe(max(0.0, (datetime.now(UTC) - at).total_seconds()))
        if outcome == "error":
            self.errors.labels(host, "event").inc()
        elif ":" in outcome:  # a sync rule fired (rules are named case:stance)
            self.actions.labels(host, outcome).inc()


def _state_collector(store: Store, settings: Settings) -> Collector:
    """Return the collector of what the database says now: instances per state, running tasks, hosts up."""
    from prometheus_client.registry import Collector

    class _StateCollector(Collector):
        def describe(self) -> Iterable[GaugeMetricFamily]:
            return []  # collected from the database at scrape time only, not at registration

        def collect(self) -> Iterator[GaugeMetricFamily]:
            return _collect(store, settings)

    return _StateCollector()


def _collect(store: Store, settings: Settings) -> Iterator[GaugeMetricFamily]:
    """Yield the scrape-time families and ``lifecycle_database_up``; only the latter while the database fails."""
    import sqlalchemy as sa
    from prometheus_client.core import GaugeMetricFamily

    up = GaugeMetricFamily("lifecycle_database_up", "1 when this scrape's database reads worked, else 0")
    try:
        families = _read_state(store, settings)  # read in full first: a failure halfway yields nothing of it
    except sa.exc.SQLAlchemyError as exc:  # the database's own errors, connection refused included
        log.warning("metrics_database_down", error=f"{type(exc).__name__}: {_one_line(exc)}")
        up.add_metric([], 0.0)
        yield up
        return
    yield from families
    up.add_metric([], 1.0)
    yield up


def _one_line(exc: BaseException) -> str:
    """Return the driver's own message on one line (SQLAlchemy's wrapper adds the statement and a link)."""
    text = str(getattr(exc, "orig", None) or exc)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _read_state(store: Store, settings: Settings) -> list[GaugeMetricFamily]:
    """Read what the database says now: instances per state, running tasks, hosts up."""
    from prometheus_client.core import GaugeMetricFamily

    instances = GaugeMetricFamily(
        "lifecycle_instances", "Live instances per vm_state and task_state", labels=["vm_state", "task_state"]
    )
    for (vm, task), count in sorted(store.stats.instance_counts().items(), key=str):
        instances.add_metric([vm, task or "none"], count)
    running = GaugeMetricFamily("lifecycle_running_tasks", "Running tasks per operation", labels=["operation"])
    oldest = GaugeMetricFamily(
        "lifecycle_oldest_running_task_seconds", "Age of the oldest running task", labels=["operation"]
    )
    moment = store.clock.now()
    for operation, (count, started) in sorted(store.stats.running_task_stats().items()):
        running.add_metric([operation], count)
        oldest.add_metric([operation], max(0.0, (moment - started).total_seconds()))
    up = GaugeMetricFamily("lifecycle_host_up", "1 while the host heartbeats within host_down_after", labels=["host"])
    for host in store.hosts.list():
        up.add_metric([host.name], 1.0 if host_is_up(host, settings.host_down_after, now=moment) else 0.0)
    return [instances, running, oldest, up]
