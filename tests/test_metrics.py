"""Prometheus metrics: counted as passes, events and recoveries happen; read from the database at scrape time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lifecycle import Engine, Flavor, PowerState, Settings, upgrade
from lifecycle.clock import ManualClock
from lifecycle.metrics import Metrics
from tests.conftest import Fakes, all_logs, wait_until
from tests.images import fake_image


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text with prometheus-client's own parser into {(name, labels): value}."""
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def cloud(db_url: str, fakes: Fakes, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """One fake host with two instances (on the test's clock if it asks for one)."""
    clock = request.getfixturevalue("clock") if "clock" in request.fixturenames else None
    engine = Engine(db_url, driver_factory=fakes.factory, settings=Settings(shutdown_timeout=0), clock=clock)
    engine.hosts.add("a", "fake://", vcpus=8, memory_mb=8192, disk_gb=80)
    engine.hosts.heartbeat("a")
    engine.images.add("cirros", fake_image("cirros"))
    yield engine
    engine.close()


def test_a_pass_counts_its_result_drift_and_actions(cloud: Engine, fakes: Fakes) -> None:
    """A sync pass over a drifted guest counts one ok pass, one drifted instance and the rule's action."""
    uuid = cloud.create("vm", host="a", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
    fakes["a"].set_power(uuid, PowerState.SHUTDOWN, event=False)
    cloud.hosts.sync("a")
    s = _samples(generate_latest(cloud.metrics.registry).decode())
    assert _value(s, "lifecycle_sync_passes_total", host="a", result="ok") == 1
    assert _value(s, "lifecycle_sync_drift_total", host="a") == 1
    assert _value(s, "lifecycle_sync_actions_total", host="a", rule="active_but_off:adopt") == 1
    assert _value(s, "lifecycle_sync_pass_seconds_count", host="a") == 1
    assert _value(s, "lifecycle_instances", vm_state="stopped", task_state="none") == 1
    assert _value(s, "lifecycle_host_up", host="a") == 1


def test_a_pass_that_cannot_run_counts_as_failed_and_as_a_host_error(cloud: Engine, fakes: Fakes) -> None:
    """An unreachable hypervisor makes the pass failed and counts a sync_pass error for the host."""
    cloud.create("vm", host="a", flavor=Flavor(1, 64, 1), image="cirros")
    fakes["a"].unreachable = True
    cloud.hosts.sync("a")
    s = _samples(generate_latest(cloud.metrics.registry).decode())
    assert _value(s, "lifecycle_sync_passes_total", host="a", result="failed") == 1
    assert _value(s, "lifecycle_host_errors_total", host="a", kind="sync_pass") == 1


def test_a_stuck_task_shows_as_a_growing_age(cloud: Engine, fakes: Fakes, clock: ManualClock) -> None:
    """A stop held in the driver is a running task whose oldest age grows between scrapes as the clock moves."""
    uuid = cloud.create("vm", host="a", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
    gate = fakes["a"].faults.hold("power_off")
    worker = threading.Thread(target=cloud.stop, args=(uuid,))
    worker.start()
    try:
        assert gate.wait_entered()
        first = _samples(generate_latest(cloud.metrics.registry).decode())
        assert _value(first, "lifecycle_running_tasks", operation="stop") == 1
        assert _value(first, "lifecycle_instances", vm_state="active", task_state="powering-off") == 1
        age1 = _value(first, "lifecycle_oldest_running_task_seconds", operation="stop")
        assert age1 is not None
        clock.advance(90)
        later = _samples(generate_latest(cloud.metrics.registry).decode())
        assert _value(later, "lifecycle_oldest_running_task_seconds", operation="stop") == age1 + 90
    finally:
        gate.release()
        worker.join(10)
    after = _samples(generate_latest(cloud.metrics.registry).decode())
    assert _value(after, "lifecycle_running_tasks", operation="stop") is None


def test_an_embedder_passes_its_own_registry(db_url: str, fakes: Fakes) -> None:
    """Engine(metrics_registry=R) registers its metrics on R, so an embedder serves them with its own."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    with Engine(db_url, driver_factory=fakes.factory, metrics_registry=registry) as engine:
        engine.hosts.add("a", "fake://")
        engine.hosts.heartbeat("a")
        engine.hosts.sync("a")
        assert engine.metrics.registry is registry
        assert registry.get_sample_value("lifecycle_sync_passes_total", {"host": "a", "result": "ok"}) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _served(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """The samples served on ``port``; None while nothing serves there yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return _samples(response.read().decode())
    except OSError:
        return None


def test_the_daemon_serves_metrics_over_http(tmp_path: Path) -> None:
    """`lifecycle daemon --metrics-listen` serves passes and states a scraper parses; SIGTERM stops it and the port."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    with Engine(url) as engine:
        engine.images.add("cirros", fake_image("cirros"))
        engine.hosts.add("h1", f"fake://{tmp_path / 'h1.json'}")
        engine.create("vm", host="h1", flavor=Flavor(1, 64, 1), image="cirros")
    port = _free_port()

    def two_passes() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        s = _served(port)
        return s if s and (_value(s, "lifecycle_sync_passes_total", host="h1", result="ok") or 0) >= 2 else None

    cmd = [sys.executable, "-m", "lifecycle.cli", "--db", url, "daemon", "--interval", "0.2"]
    proc = subprocess.Popen([*cmd, "--metrics-listen", f"127.0.0.1:{port}"], stderr=subprocess.PIPE)
    try:
        s = wait_until("two ok sync passes of h1 served", two_passes, 30, interval=0.1)
        assert _value(s, "lifecycle_instances", vm_state="active", task_state="none") == 1
        assert _value(s, "lifecycle_host_up", host="h1") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_a_bad_metrics_address_is_refused(tmp_path: Path) -> None:
    """--metrics-listen with no port, or not an IP address, exits 2 before the daemon starts."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    for bad in ("localhost:9464", "127.0.0.1", "127.0.0.1:99999"):
        done = subprocess.run(
            [sys.executable, "-m", "lifecycle.cli", "--db", url, "daemon", "--metrics-listen", bad],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ},
            check=False,
        )
        assert done.returncode == 2 and "--metrics-listen" in done.stderr, (bad, done.stderr)


def test_a_given_registry_holds_the_metrics_before_anything_is_observed(db_url: str, fakes: Fakes) -> None:
    """Metrics are made lazily only for the engine's own registry: an embedder's shows them from construction."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    with Engine(db_url, driver_factory=fakes.factory, metrics_registry=registry):
        text = generate_latest(registry).decode()
    assert "# TYPE lifecycle_sync_passes_total counter" in text
    assert "# TYPE lifecycle_instances gauge" in text


def test_the_metrics_are_made_once_whichever_threads_observe_first(
    db_url: str, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads observing at once on a fresh engine share one registry: every count lands in the one served."""
    from lifecycle import metrics

    made = metrics._Made.__init__
    lock = _CountedLock()

    def slow(self: metrics._Made, *args: object) -> None:
        # Make the registry only once every thread got past the check for one and asks for the lock.
        wait_until("every thread asking for the metrics' lock", lambda: len(lock.asked) == len(threads), interval=0.01)
        made(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(metrics._Made, "__init__", slow)
    with Engine(db_url, driver_factory=fakes.factory) as engine:
        engine.metrics._lock = lock  # type: ignore[assignment]
        threads = [threading.Thread(target=engine.metrics.host_error, args=("a", "event")) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (
            engine.metrics.registry.get_sample_value("lifecycle_host_errors_total", {"host": "a", "kind": "event"}) == 8
        )


class _CountedLock:
    """A lock that notes every call that asks for it, so a test sees who is queued on it."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self.asked.append(threading.get_ident())
        self._lock.acquire()

    def __exit__(self, *_exc: object) -> None:
        self._lock.release()


def _closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (bound, then released)."""
    return _free_port()


def test_a_scrape_with_the_database_unreachable_answers_with_database_up_0(tmp_path: Path) -> None:
    """Served as the daemon serves it, a scrape with PostgreSQL unreachable is 200: the counters and database_up 0."""
    from prometheus_client import start_wsgi_server

    from lifecycle.store import Store

    store = Store(f"postgresql+psycopg://lifecycle:s3cr3tpw@127.0.0.1:{_closed_port()}/lifecycle")
    metrics = Metrics(store, Settings())
    metrics.host_error("a", "heartbeat")
    server, thread = start_wsgi_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        with (
            all_logs() as logged,
            urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response,
        ):
            assert response.status == 200
            s = _samples(response.read().decode())
        assert [e["event"] for e in logged] == ["metrics_database_down"]
        assert "Connection refused" in logged[0]["error"] and "s3cr3tpw" not in str(logged)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        store.close()
    assert _value(s, "lifecycle_database_up") == 0
    assert _value(s, "lifecycle_host_errors_total", host="a", kind="heartbeat") == 1
    assert not any(name == "lifecycle_instances" for name, _ in s)


class Relay:
    """A TCP relay in front of PostgreSQL; :meth:`cut` closes its port and every relayed connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # cut
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def cut(self) -> None:
        """Make the database unreachable through the relay: refused connections, and the open ones reset."""
        for sock in [self.listener, *self.sockets]:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.thread.join(10)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@pytest.mark.postgres
def test_the_daemons_metrics_answer_while_its_database_is_down(pg_url: str, tmp_path: Path) -> None:
    """`lifecycle daemon --metrics-listen` answers 200 with database_up 1, and still 200 with 0 once PostgreSQL is cut."""
    import sqlalchemy as sa

    upgrade(pg_url)
    with Engine(pg_url) as engine:
        engine.hosts.add("h1", f"fake://{tmp_path / 'h1.json'}")
    server = sa.make_url(pg_url)
    relay = Relay((server.host or "127.0.0.1", server.port or 5432))
    relayed = server.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
    port = _free_port()
    cmd = [sys.executable, "-m", "lifecycle.cli", "--db", relayed, "daemon", "--metrics-listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        s = wait_until("the daemon's metrics served", lambda: _served(port), 30, interval=0.1)
        assert _value(s, "lifecycle_database_up") == 1 and _value(s, "lifecycle_host_up", host="h1") is not None
        relay.cut()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            assert response.status == 200
            text = response.read().decode()
        s = _samples(text)
        assert _value(s, "lifecycle_database_up") == 0 and _value(s, "lifecycle_host_up", host="h1") is None
        assert "# TYPE lifecycle_sync_passes_total counter" in text  # the families counted in the process
    finally:
        relay.cut()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert b"metrics_database_down" in err and b"Connection refused" in err, err.decode()[-2000:]
