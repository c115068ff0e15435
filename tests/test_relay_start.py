"""Relays started while their database is down wait for it, as they do during an outage, and stop cleanly on a signal."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import lifecycle.feed as feed
import lifecycle.store._follower as follower
from lifecycle.errors import DatabaseUnavailable
from tests.test_feed import WAIT
from tests.test_feed_outage import all_logs


def _closed_port() -> int:
    """Return a local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _relay(*argv: str) -> subprocess.Popen[str]:
    exe = Path(sys.executable).with_name("lifecycle")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "lifecycle.cli"]
    env = {**os.environ, "LIFECYCLE_WEBHOOK_SECRET": "s3cr3t-0123456789abcdef"}
    env.pop("LIFECYCLE_DB_URL", None)
    return subprocess.Popen([*command, "--log-format", "json", *argv], env=env, stderr=subprocess.PIPE, text=True)


def _lines_until(process: subprocess.Popen[str], needle: str, count: int) -> list[str]:
    """Read the process's stderr until ``count`` lines hold ``needle``; fail after WAIT seconds."""
    assert process.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + WAIT
    while sum(needle in line for line in seen) < count:
        assert time.monotonic() < deadline and process.poll() is None, seen
        if select.select([process.stderr], [], [], 0.1)[0]:
            seen.append(process.stderr.readline())
    return seen


@pytest.mark.parametrize(
    "argv", [["changes", "--follow"], ["changes", "--follow", "--consumer", "c"], ["changes", "webhook", "http://h/x"]]
)
def test_a_relay_started_while_the_database_is_down_waits_then_stops_with_exit_1(argv: list[str]) -> None:
    """A relay whose PostgreSQL refuses connections logs feed_database_lost with the database's message and a doubling wait, and exits 1 with one error line on SIGTERM."""
    relay = _relay("--db", f"postgresql+psycopg://u@127.0.0.1:{_closed_port()}/x", *argv)
    try:
        lines = _lines_until(relay, '"feed_database_lost"', 2)
        relay.send_signal(signal.SIGTERM)
        _, err = relay.communicate(timeout=WAIT)
    finally:
        relay.kill()
    lost = [line for line in lines if '"feed_database_lost"' in line]
    assert '"retry_in": 0.5' in lost[0] and '"retry_in": 1.0' in lost[1] and "refused" in lost[0], lost
    assert relay.returncode == 1, err
    errors = [line for line in err.splitlines() if not line.startswith("{")]
    assert len(errors) == 1 and errors[0].startswith("error: stopped while the database was unreachable"), err


def test_a_relay_with_bad_input_exits_2_while_the_database_is_down() -> None:
    """Bad input (a webhook URL no request can reach) is refused at once with exit 2, the database down or not."""
    relay = _relay("--db", f"postgresql+psycopg://u@127.0.0.1:{_closed_port()}/x", "changes", "webhook", "http://a..b/")
    _, err = relay.communicate(timeout=WAIT)
    assert relay.returncode == 2 and "feed_database_lost" not in err, err


def test_wait_for_database_returns_once_it_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two refused connections are logged and waited out (the wait doubling), the third returns; nothing raised."""
    monkeypatch.setattr(feed, "RECONNECT_FIRST", 0.01)
    monkeypatch.setattr(feed, "RECONNECT_MAX", 0.02)
    tries: list[str] = []

    def probe(url: str) -> None:
        tries.append(url)
        if len(tries) < 3:
            raise DatabaseUnavailable("connection refused", transient=True)

    monkeypatch.setattr(follower, "probe", probe)
    with all_logs() as logs:
        feed.wait_for_database("postgresql+psycopg://u@h/x", "c", stop=threading.Event())
    lost = [e for e in logs if e["event"] == "feed_database_lost"]
    assert len(tries) == 3 and [e["retry_in"] for e in lost] == [0.01, 0.02], lost
    assert all(e["error"] == "connection refused" and e["consumer"] == "c" for e in lost)


def test_wait_for_database_leaves_an_error_waiting_cannot_cure_to_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal waiting cannot cure (a wrong password) returns at once, unlogged, for opening the database to report."""
    calls: list[str] = []

    def probe(url: str) -> None:
        calls.append(url)
        raise DatabaseUnavailable("password authentication failed", transient=False)

    monkeypatch.setattr(follower, "probe", probe)
    with all_logs() as logs:
        feed.wait_for_database("postgresql+psycopg://u@h/x", None, stop=threading.Event())
    assert len(calls) == 1 and not [e for e in logs if e["event"] == "feed_database_lost"]
