"""The console proxy on real sockets: who gets bridged to a VNC server, who is refused before, and how it stops.

The VNC server here is a plain TCP server that records every connection and what it received; the
engine is real (SQLite, fake hypervisor hosts), and each host's console address is a loopback address
of the test's own (the fake hypervisor numbers VNC ports from 5900, as QEMU guests on 127.0.0.1 do).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import random
import secrets
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode
from websockets.sync.client import ClientConnection, connect

from lifecycle import Engine, Settings, console
from lifecycle.cli import main
from lifecycle.console_proxy import ConsoleProxy
from lifecycle.errors import InvalidInput
from tests.conftest import FLAVOR, Fakes, all_logs, make_engine, wait_until

ORIGIN = "http://console.test"
BANNER = b"RFB 003.008\n"
LIFECYCLE = str(Path(sys.executable).with_name("lifecycle"))


class FakeVnc(socketserver.ThreadingTCPServer):
    """A TCP server that greets like VNC and records each connection and the bytes it received."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]) -> None:
        self.connections = 0
        self.received = bytearray()
        self.closed = threading.Event()
        super().__init__(address, _VncHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _VncHandler(socketserver.BaseRequestHandler):
    server: FakeVnc

    def handle(self) -> None:
        self.server.connections += 1
        self.request.sendall(BANNER)
        while data := self.request.recv(4096):
            self.server.received += data
        self.server.closed.set()


class RunningProxy:
    """A ConsoleProxy on its own event loop thread, listening on a free port of 127.0.0.1."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.proxy = ConsoleProxy(
            functools.partial(console.lookup, engine.store),
            functools.partial(console.serving, driver_for=engine.hosts.driver),
            settings,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        host, port = self.run(self.proxy.start("127.0.0.1", 0))
        self.base = f"ws://{host}:{port}"
        self.http = f"http://{host}:{port}"

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.run(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def open(self, token: str | None, origin: str | None = ORIGIN) -> ClientConnection:
        query = f"?token={token}" if token is not None else ""
        headers = {"Origin": origin} if origin is not None else None
        return connect(
            f"{self.base}/websockify{query}", subprotocols=["binary"], additional_headers=headers, open_timeout=10
        )

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        raise AssertionError(f"no sample {name} {labels}")


def _loopback() -> str:
    """A loopback address of this test's own, away from 127.0.0.1 and 127.0.0.2 (real guests' VNC)."""
    return f"127.{random.randint(10, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """Capture the library's log events, as the CLI's handler would print them."""
    with all_logs() as events:
        yield events


@pytest.fixture
def engine(sqlite_url: str, fakes: Fakes, tmp_path: Path) -> Iterator[Engine]:
    """An engine on SQLite with a fake host ``far`` whose consoles lead to a loopback address of the test's own.

    ``far`` keeps its domains in a state file, so a ``lifecycle console-proxy`` process sees them too.
    """
    eng = make_engine(sqlite_url, fakes)
    eng.hosts.add("far", f"fake://{tmp_path / 'far.json'}", console_address=_loopback())
    yield eng
    eng.close()


@pytest.fixture
def new_console(engine: Engine) -> Iterator[Callable[[], tuple[str, str, FakeVnc]]]:
    """Create an instance on ``far``, issue a console token, start a fake VNC server where it leads."""
    servers: list[FakeVnc] = []

    def make() -> tuple[str, str, FakeVnc]:
        uuid = engine.create("vm", host="far", flavor=FLAVOR, image="cirros").instance_uuid
        token = engine.consoles.get_vnc_console(uuid).token
        target = engine.consoles.check_token(token)
        assert target is not None
        servers.append(FakeVnc((target.host, target.port)))
        return uuid, token, servers[-1]

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy_for(engine: Engine) -> Iterator[Callable[..., RunningProxy]]:
    """Start a proxy over ``engine`` with the given settings (allowed origin: ORIGIN); stopped afterwards."""
    started: list[RunningProxy] = []

    def start(**settings: Any) -> RunningProxy:
        started.append(RunningProxy(engine, Settings(console_allowed_origins=(ORIGIN,), **settings)))
        return started[-1]

    yield start
    for running in started:
        running.close()


def _refused_with(proxy: RunningProxy, token: str | None, origin: str | None = ORIGIN) -> int:
    with pytest.raises(InvalidStatus) as refused:
        proxy.open(token, origin)
    return refused.value.response.status_code


def _close_of(ws: ClientConnection) -> tuple[int | None, str | None]:
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=10)
    return ws.close_code, ws.close_reason


def test_a_valid_token_is_bridged_both_ways(
    new_console: Callable[[], tuple[str, str, FakeVnc]], proxy_for: Callable[..., RunningProxy]
) -> None:
    """A valid token with an allowed Origin reaches its VNC server: its greeting arrives, the browser's bytes go back."""
    _, token, vnc = new_console()
    proxy = proxy_for()
    with proxy.open(token) as ws:
        assert ws.subprotocol == "binary"
        assert ws.recv(timeout=10) == BANNER
        ws.send(BANNER)
        assert proxy.metric("lifecycle_console_connections_open") == 1
        wait_until("the browser's bytes at the VNC server", lambda: bytes(vnc.received) == BANNER, 5)
        assert vnc.connections == 1
    assert vnc.closed.wait(10), "closing the websocket closes the VNC connection"


def _forge(engine: Engine, uuid: str, token: str) -> str:
    return secrets.token_urlsafe(32)


def _revoke(engine: Engine, uuid: str, token: str) -> str:
    assert engine.store.consoles.revoke_tokens(uuid) >= 1
    return token


def _too_long(engine: Engine, uuid: str, token: str) -> str:
    return "A" * 300


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [(_forge, "invalid_token"), (_revoke, "invalid_token"), (_too_long, "bad_token")],
)
def test_a_token_that_is_not_valid_reaches_no_vnc_server(
    engine: Engine,
    new_console: Callable[[], tuple[str, str, FakeVnc]],
    proxy_for: Callable[..., RunningProxy],
    logged: list[dict[str, Any]],
    spoil: Callable[[Engine, str, str], str],
    reason: str,
) -> None:
    """A forged, revoked or too long token gets HTTP 403, no VNC connection, and a refusal logged by its hash only."""
    uuid, token, vnc = new_console()
    proxy = proxy_for()
    bad = spoil(engine, uuid, token)
    assert _refused_with(proxy, bad) == 403
    assert vnc.connections == 0
    assert proxy.metric("lifecycle_console_refusals_total", reason=reason) == 1
    refusal = next(e for e in logged if e["event"] == "console_refused")
    assert refusal["reason"] == reason and refusal["token_hash"] == hashlib.sha256(bad.encode()).hexdigest()
    assert bad not in json.dumps(logged, default=str) and token not in json.dumps(logged, default=str)


def _refused_and_logged(
    proxy: RunningProxy, vnc: FakeVnc, logged: list[dict[str, Any]], token: str, reason: str
) -> None:
    connections = vnc.connections
    assert _refused_with(proxy, token) == 403
    assert vnc.connections == connections
    assert proxy.metric("lifecycle_console_refusals_total", reason=reason) == 1
    refusal = next(e for e in logged if e["event"] == "console_refused")
    assert refusal["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in json.dumps(logged, default=str)


def test_an_expired_token_reaches_no_vnc_server(
    sqlite_url: str,
    fakes: Fakes,
    engine: Engine,
    new_console: Callable[[], tuple[str, str, FakeVnc]],
    proxy_for: Callable[..., RunningProxy],
    logged: list[dict[str, Any]],
) -> None:
    """A token past its time-to-live is refused with 403 before any VNC connection, and logged by hash."""
    uuid, _, vnc = new_console()
    short = make_engine(sqlite_url, fakes, console_token_ttl=0.0)
    expired = short.consoles.get_vnc_console(uuid).token
    short.close()
    _refused_and_logged(proxy_for(), vnc, logged, expired, "invalid_token")


def test_a_token_reused_after_delete_reaches_no_vnc_server(
    engine: Engine,
    new_console: Callable[[], tuple[str, str, FakeVnc]],
    proxy_for: Callable[..., RunningProxy],
    logged: list[dict[str, Any]],
) -> None:
    """A token that worked is refused once its instance is deleted: the VNC server sees the first session only."""
    uuid, token, vnc = new_console()
    proxy = proxy_for()
    with proxy.open(token) as ws:
        assert ws.recv(timeout=10) == BANNER
    engine.delete(uuid)
    _refused_and_logged(proxy, vnc, logged, token, "invalid_token")
    assert vnc.connections == 1


@pytest.mark.parametrize(("origin", "reason"), [("http://evil.example", "origin"), (None, "origin")])
def test_a_foreign_or_missing_origin_reaches_no_vnc_server(
    new_console: Callable[[], tuple[str, str, FakeVnc]],
    proxy_for: Callable[..., RunningProxy],
    logged: list[dict[str, Any]],
    origin: str | None,
    reason: str,
) -> None:
    """A valid token from a page of another origin, or with no Origin at all, is refused with 403 and no VNC bytes."""
    _, token, vnc = new_console()
    proxy = proxy_for()
    assert _refused_with(proxy, token, origin) == 403
    assert vnc.connections == 0
    assert proxy.metric("lifecycle_console_refusals_total", reason=reason) == 1
    assert [e["token_hash"] for e in logged if e["event"] == "console_refused"] == [
        hashlib.sha256(token.encode()).hexdigest()
    ]


def test_without_allowed_origins_only_the_console_pages_own_origin_is_allowed(
    engine: Engine, new_console: Callable[[], tuple[str, str, FakeVnc]]
) -> None:
    """With console_allowed_origins empty, the origin of console_base_url is allowed and any other is refused."""
    _, token, vnc = new_console()
    proxy = RunningProxy(engine, Settings(console_base_url="https://Consoles.example.org:443/vnc_lite.html"))
    try:
        assert _refused_with(proxy, token, "https://consoles.example.org:6080") == 403
        with proxy.open(token, "https://consoles.example.org") as ws:
            assert ws.recv(timeout=10) == BANNER
    finally:
        proxy.close()
    assert vnc.connections == 1


def test_no_token_is_refused(proxy_for: Callable[..., RunningProxy], logged: list[dict[str, Any]]) -> None:
    """A websocket with no token in its query is refused with 403, logged without a hash."""
    proxy = proxy_for()
    assert _refused_with(proxy, None) == 403
    assert [(e["reason"], e["token_hash"]) for e in logged if e["event"] == "console_refused"] == [("no_token", None)]


def test_sessions_are_bounded_per_token_and_in_total(
    engine: Engine, new_console: Callable[[], tuple[str, str, FakeVnc]], proxy_for: Callable[..., RunningProxy]
) -> None:
    """Past the per-token limit, then the total one, a websocket is closed with 1013 before reaching its VNC server."""
    uuid, token, vnc = new_console()
    other, third_token = engine.consoles.get_vnc_console(uuid).token, engine.consoles.get_vnc_console(uuid).token
    proxy = proxy_for(console_max_connections_per_token=1, console_max_connections=2)
    with proxy.open(token) as first:
        assert first.recv(timeout=10) == BANNER
        with proxy.open(token) as again:
            assert _close_of(again) == (CloseCode.TRY_AGAIN_LATER, "console refused: token_limit")
        with proxy.open(other) as second:
            assert second.recv(timeout=10) == BANNER
            with proxy.open(third_token) as third:
                assert _close_of(third) == (CloseCode.TRY_AGAIN_LATER, "console refused: limit")
            assert proxy.metric("lifecycle_console_connections_open") == 2
    assert vnc.connections == 2
    assert proxy.metric("lifecycle_console_refusals_total", reason="token_limit") == 1


def test_an_idle_session_is_closed(
    new_console: Callable[[], tuple[str, str, FakeVnc]], proxy_for: Callable[..., RunningProxy]
) -> None:
    """A session with no byte either way for console_idle_timeout is closed (1000, idle), and its VNC connection too."""
    _, token, vnc = new_console()
    proxy = proxy_for(console_idle_timeout=0.3)
    with proxy.open(token) as ws:
        assert ws.recv(timeout=10) == BANNER
        assert _close_of(ws) == (CloseCode.NORMAL_CLOSURE, "idle")
    assert vnc.closed.wait(10)


def test_an_unreachable_console_closes_the_websocket(engine: Engine, proxy_for: Callable[..., RunningProxy]) -> None:
    """A valid token whose VNC server does not answer gets close code 1011, and the proxy goes on."""
    uuid = engine.create("vm", host="far", flavor=FLAVOR, image="cirros").instance_uuid
    proxy = proxy_for()
    with proxy.open(engine.consoles.get_vnc_console(uuid).token) as ws:
        assert _close_of(ws) == (CloseCode.INTERNAL_ERROR, "console unreachable")
    assert proxy.metric("lifecycle_console_connections_open") == 0


def test_stopping_mid_session_closes_the_websocket_with_going_away(
    new_console: Callable[[], tuple[str, str, FakeVnc]], engine: Engine
) -> None:
    """Stopping the proxy mid-session sends the browser a close frame (1001) and closes the VNC connection."""
    _, token, vnc = new_console()
    proxy = RunningProxy(engine, Settings(console_allowed_origins=(ORIGIN,)))
    with proxy.open(token) as ws:
        assert ws.recv(timeout=10) == BANNER
        proxy.close()
        assert _close_of(ws) == (CloseCode.GOING_AWAY, "console proxy stopping")
    assert vnc.closed.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_stops_the_console_proxy_command_cleanly(
    sqlite_url: str, tmp_path: Path, new_console: Callable[[], tuple[str, str, FakeVnc]]
) -> None:
    """``lifecycle console-proxy`` bridges a session, and on SIGTERM closes it with 1001 and exits 0, the token unlogged."""
    _, token, vnc = new_console()
    config = tmp_path / "lifecycle.toml"
    config.write_text(f'console_allowed_origins = ["{ORIGIN}"]\n')
    port = _free_port()
    env = {**os.environ, "LIFECYCLE_CONFIG": str(config)}
    cmd = [LIFECYCLE, "--db", sqlite_url, "--log-level", "info", "console-proxy", "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ws = _connect_when_up(f"ws://127.0.0.1:{port}/websockify?token={token}", proc)
        with ws:
            assert ws.recv(timeout=10) == BANNER
            proc.send_signal(signal.SIGTERM)
            assert _close_of(ws) == (CloseCode.GOING_AWAY, "console proxy stopping")
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "console_opened" in err and token not in err
    assert vnc.closed.wait(10)


def _connect_when_up(url: str, proc: subprocess.Popen[str]) -> ClientConnection:
    def connected() -> ClientConnection | None:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            return connect(url, subprotocols=["binary"], additional_headers={"Origin": ORIGIN}, open_timeout=10)
        except ConnectionRefusedError:
            return None

    return wait_until("the console proxy listening", connected, 15)


def test_the_page_noVNC_and_metrics_are_served_and_nothing_else(tmp_path: Path, engine: Engine) -> None:
    """The page folder's files are served with safe headers; paths outside it, and unknown kinds of file, are not."""
    page = tmp_path / "page"
    (page / "novnc" / "core").mkdir(parents=True)
    (page / "vnc_lite.html").write_text("<!DOCTYPE html><title>console</title>")
    (page / "novnc" / "core" / "rfb.js").write_text("export default class RFB {}")
    (page / "secret.txt").write_text("not for browsers")
    (tmp_path / "outside.html").write_text("outside")
    proxy = RunningProxy(engine, Settings(console_page_dir=str(page)))
    try:
        with urllib.request.urlopen(f"{proxy.http}/vnc_lite.html?path=%3Ftoken%3Dx", timeout=10) as html:
            html.read()
        assert html.headers["Content-Type"].startswith("text/html")
        assert (
            html.headers["Referrer-Policy"] == "no-referrer"
            and "frame-ancestors 'none'" in html.headers["Content-Security-Policy"]
        )
        with urllib.request.urlopen(f"{proxy.http}/novnc/core/rfb.js", timeout=10) as js:
            assert js.headers["Content-Type"].startswith("text/javascript") and b"RFB" in js.read()
        for path in (
            "/secret.txt",
            "/../outside.html",
            "/%2e%2e/outside.html",
            "/novnc/../../outside.html",
            "/nope.js",
            "/" + "a" * 5000 + ".html",  # a name too long for the filesystem: 404, not a 500
        ):
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(f"{proxy.http}{path}", timeout=10)
            missing.value.close()
            assert missing.value.code == 404, path
        assert proxy.metric("lifecycle_console_connections_open") == 0
    finally:
        proxy.close()


def test_an_unbuilt_page_says_how_to_build_it(tmp_path: Path, engine: Engine) -> None:
    """Without a built page the proxy answers 404 naming scripts/console-assets.sh."""
    proxy = RunningProxy(engine, Settings(console_page_dir=str(tmp_path / "none")))
    try:
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{proxy.http}/vnc_lite.html", timeout=10)
        assert missing.value.code == 404 and b"scripts/console-assets.sh" in missing.value.read()
        missing.value.close()
    finally:
        proxy.close()


@pytest.mark.parametrize(
    "settings",
    [
        {"console_proxy_listen": "localhost:6080"},
        {"console_proxy_listen": "127.0.0.1:70000"},
        {"console_proxy_listen": "127.0.0.1"},
        {"console_allowed_origins": ("http://a.example/page",)},
        {"console_allowed_origins": ("*",)},
        {"console_allowed_origins": "http://a.example"},
        {"console_max_connections_per_token": 0},
        {"console_max_connections": True},
        {"console_idle_timeout": -1.0},
        {"console_page_dir": "dist\x00"},
        {"console_metrics_listen": "on"},
        {"console_metrics_listen": "localhost:9181"},
        {"console_metrics_listen": "127.0.0.1:6080"},  # the console port itself: empty says that
    ],
)
def test_bad_console_proxy_settings_are_refused(settings: dict[str, Any]) -> None:
    """Each console proxy setting is checked: a bad listen address, origin, limit, timeout or folder is refused."""
    with pytest.raises(InvalidInput, match=next(iter(settings))):
        Settings(**settings)


def test_an_address_in_use_is_refused_with_exit_2(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``lifecycle console-proxy --listen`` on an address already taken exits 2 with a one-line reason."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--db", sqlite_url, "console-proxy", "--listen", f"127.0.0.1:{port}"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_database_that_fails_refuses_with_503_and_the_proxy_goes_on(
    sqlite_url: str,
    engine: Engine,
    new_console: Callable[[], tuple[str, str, FakeVnc]],
    proxy_for: Callable[..., RunningProxy],
    logged: list[dict[str, Any]],
) -> None:
    """When the token check fails in the database the websocket gets 503 (no VNC connection) and later ones still work."""
    _, token, vnc = new_console()
    proxy = proxy_for()
    database = Path(sqlite_url.removeprefix("sqlite:///"))
    kept = database.with_suffix(".kept")
    engine.store.engine.dispose()
    database.rename(kept)  # the next connection opens a new, empty file: no tables
    try:
        assert _refused_with(proxy, token) == 503
    finally:
        engine.store.engine.dispose()
        kept.replace(database)
    assert vnc.connections == 0
    assert [e["reason"] for e in logged if e["event"] == "console_refused"] == ["unavailable"]
    with proxy.open(token) as ws:
        assert ws.recv(timeout=10) == BANNER


def test_two_origin_headers_are_refused_not_a_crash(
    engine: Engine, proxy_for: Callable[..., RunningProxy], new_console: Callable[[], tuple[str, str, FakeVnc]]
) -> None:
    """A websocket request carrying Origin twice is refused with 403 and counted, and reaches no VNC server."""
    import http.client

    _, token, vnc = new_console()
    proxy = proxy_for()
    host, port = proxy.http.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("GET", f"/websockify?token={token}", skip_host=True, skip_accept_encoding=True)
    for name, value in (
        ("Host", f"{host}:{port}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Origin", ORIGIN),
        ("Origin", "http://evil.example"),
    ):
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 403
    conn.close()
    assert proxy.metric("lifecycle_console_refusals_total", reason="origin") == 1
    assert vnc.connections == 0


@pytest.fixture
def quick_deadline(monkeypatch: pytest.MonkeyPatch) -> float:
    """Token checks get a half-second deadline (the proxy's is 5 s), and a silent host 2 s of quiet."""
    from lifecycle import console_checks

    monkeypatch.setattr(console_checks, "_CHECK_DEADLINE", 0.5)
    monkeypatch.setattr(console_checks, "_SILENT_FOR", 2.0)
    return 0.5


def _second_console(engine: Engine, tmp_path: Path) -> tuple[str, FakeVnc]:
    """An instance on a host ``near`` of its own, with a fake VNC server where its console leads."""
    engine.hosts.add("near", f"fake://{tmp_path / 'near.json'}", console_address=_loopback())
    uuid = engine.create("other", host="near", flavor=FLAVOR, image="cirros").instance_uuid
    token = engine.consoles.get_vnc_console(uuid).token
    target = engine.consoles.check_token(token)
    assert target is not None
    return token, FakeVnc((target.host, target.port))


def test_a_hung_host_gets_503_in_time_and_never_starves_the_others(
    engine: Engine,
    fakes: Fakes,
    tmp_path: Path,
    new_console: Callable[[], tuple[str, str, FakeVnc]],
    proxy_for: Callable[..., RunningProxy],
    quick_deadline: float,
) -> None:
    """8 handshakes to a guest whose hypervisor hangs get 503 within the deadline, at most 2 reach it; another host's answer at once."""
    import time

    _, token, vnc = new_console()
    near_token, near_vnc = _second_console(engine, tmp_path)
    far = fakes.factory(engine.hosts.get("far"))
    gates = [far.faults.hold("get_vnc_console") for _ in range(8)]
    proxy = proxy_for()
    took: list[float] = []
    codes: list[int] = []

    def handshake() -> None:
        started = time.monotonic()
        codes.append(_refused_with(proxy, token))
        took.append(time.monotonic() - started)

    try:
        threads = [threading.Thread(target=handshake) for _ in range(8)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        with proxy.open(near_token) as ws:  # the other host, while 8 checks of the hung one are in flight
            assert ws.recv(timeout=10) == BANNER
        assert time.monotonic() - started < 1.0
        for thread in threads:
            thread.join(10)
        assert codes == [503] * 8 and max(took) < quick_deadline + 1.5, took
        assert sum(g.entered.is_set() for g in gates) <= 2  # the rest were answered without asking the host
        assert vnc.connections == 0
    finally:
        for gate in gates:
            gate.release()
        near_vnc.shutdown()
        near_vnc.server_close()


@pytest.mark.postgres
def test_a_locked_token_table_gets_503_within_the_deadline(
    pg_url: str, fakes: Fakes, tmp_path: Path, quick_deadline: float
) -> None:
    """A handshake while console_tokens is locked (PostgreSQL) gets 503 within the deadline, then works once freed."""
    import time

    import sqlalchemy as sa

    from lifecycle import upgrade

    upgrade(pg_url)
    engine = make_engine(pg_url, fakes)
    engine.hosts.add("far", f"fake://{tmp_path / 'far.json'}", console_address=_loopback())
    uuid = engine.create("vm", host="far", flavor=FLAVOR, image="cirros").instance_uuid
    token = engine.consoles.get_vnc_console(uuid).token
    target = engine.consoles.check_token(token)
    assert target is not None
    vnc = FakeVnc((target.host, target.port))
    proxy = RunningProxy(engine, Settings(console_allowed_origins=(ORIGIN,)))
    lock_engine = sa.create_engine(pg_url)
    locker = lock_engine.connect()
    try:
        with locker.begin():
            locker.exec_driver_sql("LOCK TABLE console_tokens IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            assert _refused_with(proxy, token) == 503
            assert time.monotonic() - started < quick_deadline + 1.5
        assert vnc.connections == 0
        with proxy.open(token) as ws:
            assert ws.recv(timeout=10) == BANNER
    finally:
        locker.close()
        lock_engine.dispose()
        proxy.close()
        vnc.shutdown()
        vnc.server_close()
        engine.close()


def _status(url: str) -> int:
    """GET ``url`` and return the HTTP status (an error status too)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        return error.code


def _samples(url: str) -> dict[tuple[str, str], float]:
    """Scrape ``url``: {(sample name, its ``reason`` label or ""): value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, s.labels.get("reason", "")): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


def test_metrics_moved_to_their_own_address_are_gone_from_the_console_port(
    new_console: Callable[[], tuple[str, str, FakeVnc]], proxy_for: Callable[..., RunningProxy]
) -> None:
    """With console_metrics_listen ADDR:PORT the metrics (refusals counted) are there only; the console port says 404."""
    _, token, _vnc = new_console()
    proxy = proxy_for(console_metrics_listen="127.0.0.1:0")
    assert proxy.proxy.metrics_address is not None
    metrics = "http://{}:{}".format(*proxy.proxy.metrics_address)
    assert _refused_with(proxy, token, "http://evil.example") == 403
    assert _status(f"{proxy.http}/metrics") == 404
    assert _samples(f"{metrics}/metrics")[("lifecycle_console_refusals_total", "origin")] == 1
    assert _status(f"{metrics}/vnc_lite.html") == _status(f"{metrics}/websockify?token={token}") == 404
    with proxy.open(token) as ws:  # the console port still bridges
        assert ws.recv(timeout=10) == BANNER
    proxy.run(proxy.proxy.stop())
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{metrics}/metrics", timeout=2)


def test_metrics_turned_off_are_served_nowhere(engine: Engine, proxy_for: Callable[..., RunningProxy]) -> None:
    """With console_metrics_listen off the console port answers 404 on /metrics and no other address is opened."""
    proxy = proxy_for(console_metrics_listen="off")
    assert _status(f"{proxy.http}/metrics") == 404 and proxy.proxy.metrics_address is None


def test_a_metrics_address_in_use_leaves_nothing_listening(engine: Engine) -> None:
    """A metrics address already taken is InvalidInput naming the setting, and the console port is not opened."""
    console_port = _free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(console_metrics_listen=f"127.0.0.1:{taken.getsockname()[1]}")
        proxy = ConsoleProxy(
            functools.partial(console.lookup, engine.store),
            functools.partial(console.serving, driver_for=engine.hosts.driver),
            settings,
        )
        with pytest.raises(InvalidInput, match="console_metrics_listen"):
            asyncio.run(proxy.start("127.0.0.1", console_port))
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", console_port)) != 0


def test_a_metrics_address_equal_to_the_console_address_is_refused_naming_both(engine: Engine) -> None:
    """console_metrics_listen set to the proxy's own listen address is refused up front, naming both, nothing listening."""
    console_port = _free_port()
    settings = Settings(console_metrics_listen=f"127.0.0.1:{console_port}")
    proxy = ConsoleProxy(
        functools.partial(console.lookup, engine.store),
        functools.partial(console.serving, driver_for=engine.hosts.driver),
        settings,
    )
    with pytest.raises(InvalidInput, match=r"console_metrics_listen .* own listen address"):
        asyncio.run(proxy.start("127.0.0.1", console_port))
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", console_port)) != 0


def test_the_console_proxy_command_reads_the_metrics_address_from_the_environment(
    sqlite_url: str, tmp_path: Path
) -> None:
    """``lifecycle console-proxy`` with LIFECYCLE_CONSOLE_METRICS_LISTEN serves metrics there, 404 on its console port."""
    port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "LIFECYCLE_CONSOLE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"}
    cmd = [LIFECYCLE, "--db", sqlite_url, "console-proxy", "--listen", f"127.0.0.1:{port}"]

    def status() -> int | None:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            return _status(f"http://127.0.0.1:{port}/metrics")
        except urllib.error.URLError:
            return None

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until("the console proxy listening", status, 15) == 404
        assert ("lifecycle_console_connections_open", "") in _samples(f"http://127.0.0.1:{metrics_port}/metrics")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
