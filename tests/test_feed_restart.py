"""A real PostgreSQL restarted under ``lifecycle changes --follow`` and ``lifecycle changes webhook``: every change arrives once.

The server is this test's own: ``initdb`` in a fresh folder, its own port and
socket folder, started and stopped by its data directory with ``pg_ctl``
(stopped however the test ends), never the shared test server. The follower
and the sender are processes of their own, as an operator runs them.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from lifecycle import Engine, upgrade
from tests.conftest import FLAVOR, Fakes, make_engine, require, wait_until
from tests.test_feed import WAIT
from tests.test_webhooks import SECRET, Receiver, running

SLOW = 60.0
"""Seconds a step involving a server start or a reconnect may take before the test fails."""


def _server_binaries() -> Path | None:
    """The newest PostgreSQL server binaries folder (Debian's layout), or where pg_ctl is on PATH."""
    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    found = [f for f in folders if (f / "pg_ctl").exists()]
    if found:
        return found[-1]
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    """A PostgreSQL server of the test's own, driven through pg_ctl on its data directory."""

    binaries: Path
    data: Path
    sockets: Path
    port: int
    as_user: list[str]
    """``runuser -u postgres --`` when the test runs as root (initdb and postgres refuse root)."""

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.binaries / "pg_ctl"), "-D", str(self.data), *args],
            check=True,
            capture_output=True,
            timeout=SLOW,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.ctl("-l", str(self.sockets / "server.log"), "-w", "-o", options, "start")

    def stop(self) -> None:
        """Stop at once, sessions terminated (``-m fast``), as a restart by an operator does."""
        self.ctl("-m", "fast", "-w", "stop")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"


@pytest.fixture
def own_postgres() -> Iterator[Cluster]:
    """A fresh PostgreSQL server for this test alone, stopped by its data directory whatever the test did."""
    binaries = _server_binaries()
    require("PostgreSQL server binaries", binaries is not None, "apt-get install postgresql (initdb, pg_ctl)")
    assert binaries is not None
    as_user: list[str] = []
    if os.geteuid() == 0:
        require("a postgres user", _user_exists("postgres"), "the postgresql package creates one")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="lifecycle-restart-"))
    root.chmod(0o755)  # the server's user reaches its folders through it
    cluster = Cluster(binaries, root / "data", root / "sockets", _free_port(), as_user)
    try:
        for folder in (cluster.data, cluster.sockets):
            folder.mkdir(mode=0o700)
            if as_user:
                shutil.chown(folder, "postgres", "postgres")
        subprocess.run(
            [
                *as_user,
                str(binaries / "initdb"),
                "-D",
                str(cluster.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=SLOW,
        )
        cluster.start()
        yield cluster
    finally:
        if (cluster.data / "postmaster.pid").exists():
            with suppress(subprocess.SubprocessError):
                cluster.ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _database(cluster: Cluster) -> str:
    """Create and migrate database ``lifecycle`` on the cluster; return its URL."""
    admin = sa.create_engine(cluster.url("postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE lifecycle")
    admin.dispose()
    url = cluster.url("lifecycle")
    upgrade(url)
    return url


@dataclass
class Process:
    """A ``lifecycle`` command running on its own, its stdout and stderr in files."""

    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines (stderr is not a terminal) of event ``name``."""
        found = []
        for line in self.err.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found


@contextmanager
def lifecycle(folder: Path, name: str, *argv: str, env: dict[str, str]) -> Iterator[Process]:
    """Run ``lifecycle ARGV`` for the block; killed afterwards if it still runs."""
    out, err = folder / f"{name}.out", folder / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        popen = subprocess.Popen(
            [sys.executable, "-m", "lifecycle.cli", "--log-level", "info", *argv],
            env={**os.environ, **env},
            stdout=stdout,
            stderr=stderr,
        )
    try:
        yield Process(popen, out, err)
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait(WAIT)


def _positions(lines: list[str]) -> list[str]:
    return [json.loads(line)["position"] for line in lines]


def _write(engine: Engine, uuid: str | None = None) -> str:
    """Create an instance (or stop and start ``uuid``); return its uuid."""
    if uuid is None:
        return engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    engine.stop(uuid)
    engine.start(uuid)
    return uuid


@pytest.mark.postgres
@pytest.mark.slow
def test_follow_and_webhook_survive_a_database_restart(own_postgres: Cluster, tmp_path: Path, fakes: Fakes) -> None:
    """Across a server restart both processes warn with the server's words, reconnect, LISTEN again and get every change before and after it exactly once; told to stop while it is down, each exits 1 with one error line."""
    url = _database(own_postgres)
    engine = make_engine(url, fakes)
    env = {"LIFECYCLE_DB_URL": url, "LIFECYCLE_WEBHOOK_SECRET": SECRET.decode()}
    try:
        with (
            running(Receiver(fail_odd=False)) as receiver,
            lifecycle(tmp_path, "follow", "changes", "--follow", "--format", "json", env=env) as follower,
            lifecycle(tmp_path, "webhook", "changes", "webhook", receiver.url, env=env) as sender,
        ):
            wait_until("the sender registered", lambda: bool(engine.feed.consumers()), SLOW)
            wait_until("the follower following", lambda: bool(follower.events("feed_follow_started")), SLOW)
            uuid = _write(engine)
            _arrived(engine, follower, receiver)

            own_postgres.stop()
            for process in (follower, sender):  # the connection lost, then a reconnect refused
                wait_until("two warnings", lambda p=process: len(p.events("feed_database_lost")) >= 2, SLOW)
            own_postgres.start()
            for process in (follower, sender):
                wait_until("the database back", lambda p=process: bool(p.events("feed_database_back")), SLOW)
            _write(engine, uuid)  # woken by NOTIFY: a LISTEN lost with the server would wait 30 s
            _arrived(engine, follower, receiver, within=IDLE_WAKE)

            for process in (follower, sender):  # in the server's and the driver's own words, a doubling wait
                lost, refused = process.events("feed_database_lost")[:2]
                assert "terminating connection" in lost["error"] or "closed the connection" in lost["error"], lost
                assert "Connection refused" in refused["error"] or "shutting down" in refused["error"], refused
                assert (lost["retry_in"], refused["retry_in"]) == (0.5, 1.0)
            own_postgres.stop()
            for process in (follower, sender):
                wait_until("lost again", lambda p=process: len(p.events("feed_database_lost")) > 2, SLOW)
                process.popen.send_signal(signal.SIGTERM)
            for process in (follower, sender):
                assert process.popen.wait(SLOW) == 1
                last = process.err.read_text().splitlines()[-1]
                assert last.startswith("error: stopped while the database was unreachable ("), last
                assert "Traceback" not in process.err.read_text()
            assert "follow again with --after" in follower.err.read_text().splitlines()[-1]
    finally:
        engine.close()


IDLE_WAKE = 15.0
"""Seconds changes may take to arrive after the restart: under feed.IDLE_RECHECK (30 s), so only NOTIFY meets it."""


def _arrived(engine: Engine, follower: Process, receiver: Receiver, within: float = SLOW) -> None:
    """Wait for every change to reach both; then each got the whole feed once, in order."""
    feed = [str(c.position) for c in engine.feed.changes(limit=10_000)]
    wait_until("the follower printed every change", lambda: len(follower.lines()) >= len(feed), within)
    wait_until("the receiver took every change", lambda: len(receiver.accepted) >= len(feed), within)
    assert _positions(follower.lines()) == feed, "the follower lost, repeated or reordered a change"
    assert [a["position"] for a in receiver.accepted] == feed, "the webhook lost, repeated or reordered a change"
