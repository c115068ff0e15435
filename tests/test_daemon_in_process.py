"""The daemon run inside an application's process (lifecycle.Daemon), and fake hosts that belong to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle import (
    Daemon,
    Engine,
    Flavor,
    HostNotFound,
    InMemoryHostElsewhere,
    InvalidInput,
    NoValidHost,
    Settings,
    TaskFailed,
    VmState,
    upgrade,
)
from lifecycle.clock import ManualClock
from tests.conftest import FLAVOR, all_logs, wait_until
from tests.images import fake_image


def _beaten_at(engine: Engine, clock: ManualClock) -> bool:
    """Whether every host's last heartbeat is the clock's time now."""
    return all(h.last_heartbeat == clock.now() for h in engine.hosts.list())


def test_an_in_process_daemon_keeps_hosts_up_past_the_down_window(engine: Engine, clock: ManualClock) -> None:
    """A Daemon beside the engine heartbeats hosts past host_down_after (a late create is placed); close() ends it."""
    window = engine.settings.host_down_after
    with Daemon(engine, claim_interval=window) as daemon:
        assert daemon.thread is not None and daemon.thread.name == "lifecycle-daemon"
        assert daemon.wait_ready() and _beaten_at(engine, clock)
        asleep = 1 + 2 * len(engine.hosts.list())  # the daemon's loop, and each host's heartbeat and work loops
        for _ in range(4):  # four heartbeat periods: past the window
            wait_until("every host heartbeated now", lambda: _beaten_at(engine, clock))
            wait_until("every timer asleep", lambda: clock.waiting == asleep)
            clock.advance(window / 3)
        wait_until("every host heartbeated now", lambda: _beaten_at(engine, clock))
        assert clock.monotonic() > window
        task = engine.create("late", flavor=FLAVOR, image="cirros")
        assert engine.get(task.instance_uuid).vm_state is VmState.ACTIVE
    thread = daemon.thread
    assert not thread.is_alive() and daemon.claims == {} and daemon.failure is None
    daemon.close()  # a second close is harmless
    with pytest.raises(InvalidInput, match="started already"):
        daemon.start()


def test_without_a_daemon_hosts_go_down_after_the_window(engine: Engine, clock: ManualClock) -> None:
    """The counterpart: one heartbeat and no daemon, and a create past host_down_after finds no host up."""
    for host in ("h1", "h2"):
        engine.hosts.heartbeat(host)
    clock.advance(engine.settings.host_down_after + 1)
    with pytest.raises(NoValidHost, match="ComputeFilter") as failed:
        engine.create("late", flavor=FLAVOR, image="cirros")
    assert isinstance(failed.value, TaskFailed) and set(failed.value.reasons) == {"h1", "h2"}


def test_a_job_that_fails_is_logged_and_the_daemon_goes_on(engine: Engine, clock: ManualClock) -> None:
    """An error in a daemon job on its own thread is not lost: it is logged with its traceback, and runs again."""
    runs: list[float] = []

    def broken() -> None:
        runs.append(clock.monotonic())
        raise RuntimeError("boom")

    daemon = Daemon(engine, claim_interval=engine.settings.host_down_after)
    daemon.jobs[0].run = broken  # the first job: recover_tasks
    with all_logs() as logs, daemon:
        wait_until("the broken job ran once", lambda: runs == [0.0])
        wait_until("every timer asleep", lambda: clock.waiting == 5)
        clock.advance(engine.settings.lease_seconds)
        wait_until("the broken job ran again at its next turn", lambda: len(runs) == 2)
        assert daemon.thread is not None and daemon.thread.is_alive()
    failures = [e for e in logs if e["event"] == "daemon_job_failed"]
    assert len(failures) == 2 and failures[0]["job"] == "recover_tasks" and failures[0]["exc_info"]
    assert daemon.failure is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"claim_interval": 0}, "claim_interval must be a finite number of seconds"),
        ({"claim_interval": -1}, "claim_interval must be a finite number of seconds"),
        ({"claim_interval": float("nan")}, "claim_interval must be a finite number of seconds"),
        ({"claim_interval": "x"}, "claim_interval must be a number of seconds"),
        ({"claim_interval": True}, "claim_interval must be a number of seconds"),
        ({"image_cache_interval": 0}, "image_cache_interval must be a finite number of seconds"),
        ({"hosts": "h1"}, "hosts must be a non-empty list of host names"),
        ({"hosts": []}, "hosts must be a non-empty list of host names"),
        ({"hosts": [5]}, "host name must be a string"),
    ],
)
def test_a_daemon_refuses_bad_arguments_when_made(engine: Engine, kwargs: dict[str, object], match: str) -> None:
    """A zero, negative, non-finite or non-number interval, or hosts that are a str or empty, raise InvalidInput."""
    with pytest.raises(InvalidInput, match=match):
        Daemon(engine, **kwargs)  # type: ignore[arg-type]


def test_a_daemon_refuses_an_unknown_host_and_a_bad_timeout(engine: Engine) -> None:
    """hosts naming no host raises HostNotFound when made; close() and wait_ready() refuse a timeout that is no number."""
    with pytest.raises(HostNotFound, match="nope"):
        Daemon(engine, hosts=["h1", "nope"])
    daemon = Daemon(engine, hosts=("h1",))
    with pytest.raises(InvalidInput, match="timeout must be a number of seconds"):
        daemon.close(timeout="x")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="timeout must be a number of seconds"):
        daemon.wait_ready(timeout="x")  # type: ignore[arg-type]
    assert not daemon.stop.is_set()  # the refused close changed nothing


def test_a_closed_daemon_refuses_to_start(engine: Engine) -> None:
    """start() after close() (never started) raises InvalidInput instead of running a thread that ends at once."""
    daemon = Daemon(engine)
    daemon.close()
    with pytest.raises(InvalidInput, match="this daemon was closed"):
        daemon.start()
    assert daemon.thread is None


def test_wait_ready_is_false_when_a_named_host_was_not_claimed(engine: Engine) -> None:
    """A daemon limited to a host another daemon holds claims nothing, and wait_ready() says False, not True."""
    with Daemon(engine, hosts=["h1"]) as first:
        assert first.wait_ready() and set(first.claims) == {"h1"}
        with Daemon(engine, hosts=["h1", "h2"]) as second:
            assert second.wait_ready() is False
            assert set(second.claims) == {"h2"}


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "lifecycle.cli", "--db", url, "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_another_process_refuses_to_sync_an_in_memory_fake_host(tmp_path: Path) -> None:
    """`lifecycle sync` in another process refuses this one's fake:// host (exit 2, saying why); its instance stays."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    upgrade(url)
    with Engine(url, settings=Settings(shutdown_timeout=0)) as engine:
        engine.hosts.add("mem-1", "fake://")
        engine.hosts.add("file-1", f"fake://{tmp_path / 'file-1.json'}")
        engine.images.add("cirros", fake_image("cirros"))
        for host in ("mem-1", "file-1"):
            engine.hosts.heartbeat(host)
        uuid = engine.create("vm", host="mem-1", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
        engine.hosts.sync("mem-1")  # this process holds the host: its own sync is fine
        refused = _cli(url, "sync", "--once")
        assert refused.returncode == 2, refused
        error = json.loads(refused.stdout or refused.stderr)
        assert "mem-1" in str(error) and "fake:///ABS/state.json" in str(error)
        assert engine.get(uuid).vm_state is VmState.ACTIVE
        synced = _cli(url, "sync", "--once", "--host", "file-1")
        assert synced.returncode == 0, synced
        assert engine.get(uuid).vm_state is VmState.ACTIVE


def test_an_in_memory_fake_host_is_refused_where_it_was_not_added(sqlite_url: str) -> None:
    """A fake:// host this process never added (a restarted app) is neither synced nor claimed by a daemon here."""
    with Engine(sqlite_url) as engine:
        engine.store.hosts.add("elsewhere", "fake://", "/var/lib/lifecycle/instances")  # as another process would
        with pytest.raises(InMemoryHostElsewhere, match="'elsewhere' is an in-memory fake"):
            engine.hosts.sync()
        daemon = Daemon(engine)
        daemon._claim_hosts()
        assert daemon.claims == {}
