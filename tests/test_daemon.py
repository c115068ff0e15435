"""The daemon: host ownership, periodic passes, prompt shutdown, several daemons on PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from lifecycle import Engine, Flavor, PowerState, Settings, VmState, upgrade
from lifecycle.console import token_hash
from lifecycle.daemon import Daemon
from lifecycle.store import Store
from lifecycle.store.tables import CONSOLE_TOKENS
from tests.conftest import Fakes, make_engine, wait_until
from tests.images import fake_image
from tests.invariants import check_invariants


def _claims_are_exclusive(url: str) -> None:
    a, b = Store(url), Store(url)
    claim = a.ownership.try_claim_host("h1")
    assert claim is not None
    assert b.ownership.try_claim_host("h1") is None
    other = b.ownership.try_claim_host("h2")
    assert other is not None
    claim.release()
    again = b.ownership.try_claim_host("h1")
    assert again is not None
    for c in (other, again):
        c.release()
    a.close()
    b.close()


def test_host_claims_are_exclusive_on_sqlite(sqlite_url: str) -> None:
    """Only one claimant at a time may own a host; releasing lets another take it."""
    _claims_are_exclusive(sqlite_url)


@pytest.mark.postgres
def test_host_claims_are_exclusive_on_postgres(pg_url: str) -> None:
    """The same with PostgreSQL advisory locks."""
    upgrade(pg_url)
    _claims_are_exclusive(pg_url)


def test_daemon_syncs_its_hosts_and_lets_go_on_stop(sqlite_url: str, fakes: Fakes) -> None:
    """A daemon claims every host, passes over it at start and periodically, and releases it when stopped."""
    engine = make_engine(sqlite_url, fakes, sync_interval=0.05, stopped_event_delay=0.0)
    uuid = engine.create("vm", host="h1", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
    fakes["h1"].set_power(uuid, PowerState.CRASHED, event=False)  # silently: only a pass can see it
    daemon = Daemon(engine, claim_interval=0.05)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    wait_until("the instance stopped by the daemon's sync", lambda: engine.get(uuid).vm_state is VmState.STOPPED, 20)
    assert set(daemon.claims) == {"h1", "h2"}
    daemon.stop.set()
    thread.join(10)
    assert not thread.is_alive() and daemon.claims == {}
    claim = engine.store.ownership.try_claim_host("h1")
    assert claim is not None
    claim.release()
    engine.close()


def _start_daemon(url: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "lifecycle.cli",
        "--db",
        url,
        "--log-format",
        "json",
        "--log-level",
        "info",
        "daemon",
        "--claim-interval",
        "0.2",
        *extra,
    ]
    with log.open("w") as sink:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sink)


def _events(log: Path) -> list[dict[str, object]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [json.loads(line) for line in lines if line.startswith("{")]


def _setup(url: str, tmp_path: Path, hosts: int, per_host: int) -> list[str]:
    upgrade(url)
    uuids = []
    with Engine(url, settings=Settings(shutdown_timeout=0)) as engine:
        engine.images.add("cirros", fake_image("cirros"))
        for h in range(hosts):
            engine.hosts.add(f"h{h}", f"fake://{tmp_path / f'h{h}.json'}")
            for i in range(per_host):
                uuids.append(
                    engine.create(f"vm{h}-{i}", host=f"h{h}", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
                )
    return uuids


def _drift_all(tmp_path: Path, hosts: int) -> None:
    for h in range(hosts):
        path = tmp_path / f"h{h}.json"
        state = json.loads(path.read_text())
        for dom in state["domains"].values():
            dom["power"] = int(PowerState.SHUTDOWN)
        path.write_text(json.dumps(state))


@pytest.mark.slow
def test_sigterm_mid_pass_stops_promptly_and_cleanly(tmp_path: Path) -> None:
    """SIGTERM during a long pass ends the daemon within seconds, between tasks, with nothing left running."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    uuids = _setup(url, tmp_path, hosts=1, per_host=150)
    _drift_all(tmp_path, hosts=1)
    log = tmp_path / "daemon.log"
    proc = _start_daemon(url, log, "--interval", "600")
    try:
        wait_until("a host claimed by the daemon", lambda: any(e["event"] == "host_claimed" for e in _events(log)), 20)
        with Engine(url) as engine:
            wait_until(
                "an instance stopped by a sync pass",
                lambda: any(engine.get(u).vm_state is VmState.STOPPED for u in uuids),
                20,
            )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
    events = _events(log)
    passes = [e for e in events if e["event"] == "sync_pass"]
    assert passes and passes[-1]["interrupted"] is True and events[-1]["event"] == "daemon_stopped"
    with Engine(url) as engine:
        check_invariants(engine.store)
        stopped = sum(engine.get(u).vm_state is VmState.STOPPED for u in uuids)
        assert 0 < stopped < len(uuids)


@pytest.mark.postgres
@pytest.mark.slow
def test_two_daemons_split_hosts_and_take_over(pg_url: str, tmp_path: Path) -> None:
    """Two daemons on PostgreSQL own disjoint hosts; when one dies the other takes its hosts over."""
    hosts = 4
    _setup(pg_url, tmp_path, hosts=hosts, per_host=2)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start_daemon(pg_url, log, "--interval", "0.3") for log in logs]
    try:

        def owners() -> dict[str, set[int]]:
            found: dict[str, set[int]] = {}
            for i, log in enumerate(logs):
                for e in _events(log):
                    if e["event"] == "host_claimed":
                        found.setdefault(str(e["host"]), set()).add(i)
            return found

        wait_until("every host owned by a daemon", lambda: len(owners()) == hosts, 20)
        assert all(len(o) == 1 for o in owners().values()), owners()
        wait_until(
            "a sync pass logged by every daemon",
            lambda: all(
                any(e["event"] == "sync_pass" for e in _events(log))
                for log in logs
                if any(e["event"] == "host_claimed" for e in _events(log))
            ),
            20,
        )
        synced_by = {}
        for i, log in enumerate(logs):
            for e in _events(log):
                if e["event"] == "sync_pass":
                    synced_by.setdefault(str(e["host"]), set()).add(i)
        assert all(len(s) == 1 for s in synced_by.values()), synced_by
        victim = next(i for i in range(2) if any(i in o for o in owners().values()))
        survivor = 1 - victim
        procs[victim].kill()
        procs[victim].wait(10)
        wait_until("every host taken over by the survivor", lambda: all(survivor in o for o in owners().values()), 20)
        procs[survivor].send_signal(signal.SIGTERM)
        assert procs[survivor].wait(timeout=15) == 0
    finally:
        for p in procs:
            p.kill()


def test_the_daemon_purges_dead_console_tokens(sqlite_url: str, fakes: Fakes) -> None:
    """A running daemon deletes a console token expired long ago and keeps a live one (its purge duty)."""
    engine = make_engine(sqlite_url, fakes)
    uuid = engine.create("vm", host="h1", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
    live, dead = engine.consoles.get_vnc_console(uuid).token, engine.consoles.get_vnc_console(uuid).token
    table = CONSOLE_TOKENS
    with engine.store.engine.begin() as db:
        db.execute(
            sa.update(table)
            .where(table.c.token_hash == token_hash(dead))
            .values(expires_at=datetime.now(UTC) - timedelta(days=1))
        )
    daemon = Daemon(engine, claim_interval=60.0)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        wait_until("the expired console tokens purged", lambda: _tokens(engine) == 1, 20)
    finally:
        daemon.stop.set()
        thread.join(10)
    assert engine.consoles.check_token(live) is not None
    engine.close()


def _tokens(engine: Engine) -> int:
    with engine.store.engine.connect() as db:
        return int(db.execute(sa.select(sa.func.count()).select_from(CONSOLE_TOKENS)).scalar_one())
