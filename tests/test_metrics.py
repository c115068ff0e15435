"""Prometheus metrics: counted as passes, events and recoveries happen; read from the database at scrape time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lifecycle import Engine, Flavor, PowerState, Settings, upgrade
from tests.conftest import Fakes
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
def cloud(db_url: str, fakes: Fakes) -> Iterator[Engine]:
    """One fake host with two instances."""
    engine = Engine(db_url, driver_factory=fakes.factory, settings=Settings(shutdown_timeout=0))
    engine.add_host("a", "fake://", vcpus=8, memory_mb=8192, disk_gb=80)
    engine.heartbeat("a")
    engine.add_image("cirros", fake_image("cirros"))
    yield engine
    engine.close()


def test_a_pass_counts_its_result_drift_and_actions(cloud: Engine, fakes: Fakes) -> None:
    """A sync pass over a drifted guest counts one ok pass, one drifted instance and the rule's action."""
    uuid = cloud.create("vm", host="a", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
    fakes["a"].set_power(uuid, PowerState.SHUTDOWN, event=False)
    cloud.sync("a")
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
    cloud.sync("a")
    s = _samples(generate_latest(cloud.metrics.registry).decode())
    assert _value(s, "lifecycle_sync_passes_total", host="a", result="failed") == 1
    assert _value(s, "lifecycle_host_errors_total", host="a", kind="sync_pass") == 1


def test_a_stuck_task_shows_as_a_growing_age(cloud: Engine, fakes: Fakes) -> None:
    """A stop held in the driver is a running task whose oldest age grows between scrapes."""
    uuid = cloud.create("vm", host="a", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
    gate = fakes["a"].hold("power_off")
    worker = threading.Thread(target=cloud.stop, args=(uuid,))
    worker.start()
    try:
        assert gate.wait_entered()
        first = _samples(generate_latest(cloud.metrics.registry).decode())
        time.sleep(0.2)
        second = _samples(generate_latest(cloud.metrics.registry).decode())
        assert _value(first, "lifecycle_running_tasks", operation="stop") == 1
        age1 = _value(first, "lifecycle_oldest_running_task_seconds", operation="stop")
        age2 = _value(second, "lifecycle_oldest_running_task_seconds", operation="stop")
        assert age1 is not None and age2 is not None and age2 >= age1 + 0.15
        assert _value(first, "lifecycle_instances", vm_state="active", task_state="powering-off") == 1
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
        engine.add_host("a", "fake://")
        engine.heartbeat("a")
        engine.sync("a")
        assert engine.metrics.registry is registry
        assert registry.get_sample_value("lifecycle_sync_passes_total", {"host": "a", "result": "ok"}) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int, deadline: float) -> str:
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_the_daemon_serves_metrics_over_http(tmp_path: Path) -> None:
    """`lifecycle daemon --metrics-listen` serves passes and states a scraper parses; SIGTERM stops it and the port."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    with Engine(url) as engine:
        engine.add_image("cirros", fake_image("cirros"))
        engine.add_host("h1", f"fake://{tmp_path / 'h1.json'}")
        engine.create("vm", host="h1", flavor=Flavor(1, 64, 1), image="cirros")
    port = _free_port()
    cmd = [sys.executable, "-m", "lifecycle.cli", "--db", url, "daemon", "--interval", "0.2"]
    proc = subprocess.Popen([*cmd, "--metrics-listen", f"127.0.0.1:{port}"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            s = _samples(_scrape(port, deadline))
            passes = _value(s, "lifecycle_sync_passes_total", host="h1", result="ok") or 0
            if passes >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert passes >= 2
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

    def slow(self: metrics._Made, *args: object) -> None:
        time.sleep(0.05)  # widen the window in which a second thread could make a second registry
        made(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(metrics._Made, "__init__", slow)
    with Engine(db_url, driver_factory=fakes.factory) as engine:
        threads = [threading.Thread(target=engine.metrics.host_error, args=("a", "event")) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (
            engine.metrics.registry.get_sample_value("lifecycle_host_errors_total", {"host": "a", "kind": "event"}) == 8
        )
