"""Hostile endpoints on real sockets: redirects, trickles, garbage, huge and slow answers; the sender stays bounded and alive.

Each endpoint is a TCP listener on 127.0.0.1 that reads a request and plays
the next scripted answer to each connection (then a plain 204). Scripts
wait on the endpoint's stop event, never on a sleep, so a test ends at once.
"""

from __future__ import annotations

import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lifecycle import Engine
from lifecycle.webhooks import ANSWER_LIMIT, Webhook, consumer_name, deliver
from tests.conftest import FLAVOR, require
from tests.test_feed import STOPPED, WAIT, wait_until
from tests.test_feed_outage import all_logs
from tests.test_webhooks import SECRET, Receiver, running

OK = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"


class Conn:
    """The endpoint's side of one connection, as a script sees it: sends are counted, a hang-up can be awaited."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sent = sock, 0

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def hung_up(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the sender to close (it sends nothing after its request); return whether it did."""
        return bool(select.select([self.sock], [], [], seconds)[0])


Script = Callable[[Conn, threading.Event], None]


def answer(raw: bytes) -> Script:
    """Send ``raw``, then end the answer."""
    return lambda conn, _stop: conn.sendall(raw)


def trickle(raw: bytes, every: float = 0.05) -> Script:
    """Send ``raw`` a byte every ``every`` seconds (each read well within any timeout), until the sender hangs up."""

    def play(conn: Conn, stop: threading.Event) -> None:
        for i in range(len(raw)):
            if stop.is_set() or conn.hung_up(every):
                return
            conn.sendall(raw[i : i + 1])

    return play


def then(*scripts: Script) -> Script:
    """Play ``scripts`` one after another on one connection."""

    def play(conn: Conn, stop: threading.Event) -> None:
        for script in scripts:
            script(conn, stop)

    return play


@dataclass
class Endpoint:
    """A scripted TCP endpoint: the requests it read, how long each connection lasted, how much each answer sent."""

    scripts: list[Script]
    listener: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    stop: threading.Event = field(default_factory=threading.Event)
    requests: list[bytes] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"

    def positions(self) -> list[str]:
        """The X-Lifecycle-Position of each request, in the order they came."""
        return [_headers(r)[1]["x-lifecycle-position"] for r in self.requests]

    def serve(self) -> None:
        self.listener.settimeout(0.05)
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            with sock:
                self._one(sock)

    def _one(self, sock: socket.socket) -> None:
        began, conn = time.monotonic(), Conn(sock)
        sock.settimeout(WAIT)
        self.requests.append(_read_request(sock))
        script = self.scripts.pop(0) if self.scripts else answer(OK)
        with suppress(OSError):  # the sender hung up first: what the tests look at
            script(conn, self.stop)
            sock.shutdown(socket.SHUT_WR)  # the answer ends here
            conn.hung_up(WAIT)
        self.seconds.append(time.monotonic() - began)
        self.sent.append(conn.sent)


def _read_request(sock: socket.socket) -> bytes:
    """Read one request (head and Content-Length body) off ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    length = int(_headers(data)[1].get("content-length", "0"))
    while len(data.partition(b"\r\n\r\n")[2]) < length:
        data += sock.recv(65536)
    return data


def _headers(raw: bytes) -> tuple[str, dict[str, str]]:
    """The request line and the headers (lower-case names) of a request."""
    line, *fields = raw.partition(b"\r\n\r\n")[0].decode().split("\r\n")
    return line, {k.lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}


@contextmanager
def serving(endpoint: Endpoint) -> Iterator[Endpoint]:
    """Run the endpoint in a thread for the block; its scripts stop at once afterwards."""
    thread = threading.Thread(target=endpoint.serve, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        endpoint.stop.set()
        thread.join(WAIT)
        endpoint.listener.close()


@contextmanager
def sending(engine: Engine, hook: Webhook) -> Iterator[threading.Event]:
    """Run the sender in a thread for the block (registered at the newest change first); yield its stop event."""
    stop = threading.Event()
    deliver(engine.services, hook, stop=STOPPED)
    thread = threading.Thread(target=deliver, args=(engine, hook), kwargs={"stop": stop}, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(WAIT)
        assert not thread.is_alive(), "the sender did not stop when told"


def _position(engine: Engine, url: str) -> str:
    """The position the URL's consumer has stored."""
    return next(str(c.position) for c in engine.feed.consumers() if c.name == consumer_name(url))


def _changes(engine: Engine) -> tuple[str, str]:
    """Commit a create's changes; return the first's position and the newest's."""
    before = engine.feed.changes(limit=10_000)
    engine.create("vm", host="h1", flavor=FLAVOR, image="cirros")
    # On PostgreSQL a transaction open elsewhere in the shared cluster may hold committed changes back a moment.
    wait_until("the create's changes readable", lambda: not engine.store.feed.held_back())
    new = engine.feed.changes(after=before[-1].position if before else None, limit=10_000)
    return str(new[0].position), str(new[-1].position)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_attempt_never_followed(engine: Engine, status: int) -> None:
    """A 3xx is retried with backoff, its Location (http or ftp) logged and never opened, the position not moved meanwhile."""
    target = socket.create_server(("127.0.0.1", 0))  # where the redirects point: must never see a connection
    target.setblocking(False)
    port = target.getsockname()[1]
    locations = [f"http://127.0.0.1:{port}/elsewhere", f"ftp://127.0.0.1:{port}/file"]
    scripts = [
        answer(f"HTTP/1.1 {status} Moved\r\nLocation: {where}\r\nContent-Length: 0\r\n\r\n".encode())
        for where in locations
    ]
    hold = threading.Event()
    scripts.insert(1, lambda conn, stop: hold.wait(WAIT) and answer(b"HTTP/1.1 307 Moved\r\n\r\n")(conn, stop))
    with all_logs() as logs, serving(Endpoint(scripts)) as endpoint:
        hook = Webhook(endpoint.url, SECRET, first_backoff=0.01, max_backoff=0.02)
        with sending(engine, hook):
            before = _position(engine, endpoint.url)
            first, newest = _changes(engine)
            wait_until("a redirect refused and the retry waiting", lambda: len(endpoint.requests) >= 2)
            assert _position(engine, endpoint.url) == before, "a redirect moved the position"
            hold.set()
            wait_until("delivered once the redirects end", lambda: _position(engine, endpoint.url) == newest)
    with pytest.raises(BlockingIOError):
        target.accept()
    target.close()
    assert endpoint.positions()[:4] == [first] * 4
    failed = [(e["status"], e["location"]) for e in logs if e["event"] == "webhook_failed"]
    assert failed == [(status, locations[0]), (307, None), (status, locations[1])]


def _body_trickle(conn: Conn, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n")
    trickle(b"y" * 400)(conn, stop)


@pytest.mark.parametrize(
    "play",
    [
        pytest.param(trickle(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 200 + b"\r\n\r\n"), id="head"),
        pytest.param(_body_trickle, id="body"),
    ],
)
def test_a_trickling_answer_cannot_hold_an_attempt_past_its_deadline(engine: Engine, play: Script) -> None:
    """An answer sent a byte every 50 ms (each read in time) ends each attempt at its 0.5 s deadline; a stop mid-trickle ends the sender within it."""
    with serving(Endpoint([play] * 50)) as endpoint:
        hook = Webhook(endpoint.url, SECRET, timeout=0.5, first_backoff=0.01, max_backoff=0.02)
        with sending(engine, hook) as stop:
            before = _position(engine, endpoint.url)
            _changes(engine)
            wait_until("two attempts cut at the deadline", lambda: len(endpoint.seconds) >= 2)
            wait_until("a third attempt under way", lambda: len(endpoint.requests) >= 3)
            asked = time.monotonic()
            stop.set()
        took = time.monotonic() - asked
        assert _position(engine, endpoint.url) == before, "a cut answer counted as delivered"
    assert all(0.4 <= s < 0.9 for s in endpoint.seconds[:2]), endpoint.seconds
    assert took < 0.9, f"the sender took {took:.2f} s to stop"


GARBAGE = {
    "bad-status-line": answer(b"SMTP ready\r\n\r\n"),
    "long-bad-status-line": answer(b"X" * 15000 + b"\r\n\r\n"),
    "over-100-headers": answer(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n"),
    "head-over-the-limit": answer(b"HTTP/1.1 200 OK\r\nX-Big: " + b"y" * ANSWER_LIMIT + b"\r\n\r\n"),
    "short-body": answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"),
    "short-chunked-body": answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\nabc"),
    "nothing": answer(b""),
    "http-0.9": answer(b"<html>hello</html>"),
    "binary": answer(bytes(range(256)) * 4),
    "head-cut-short": answer(b"HTTP/1.1 200 OK\r\nContent-Len"),
    "head-without-blank-line": answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"),
    "two-content-lengths": answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nhello"),
    "endless-interim-answers": answer(b"HTTP/1.1 103 Early Hints\r\n\r\n" * 10 + b"HTTP/1.1 200 OK\r\n\r\n"),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_a_garbage_answer_is_retried_and_the_sender_lives(engine: Engine, name: str) -> None:
    """Malformed answers (bad status line, >100 headers, a head over-long or cut short, a short body, two lengths, none at all) fail the attempt, logged clipped; the retry delivers."""
    with all_logs() as logs, serving(Endpoint([GARBAGE[name]] * 3)) as endpoint:
        hook = Webhook(endpoint.url, SECRET, timeout=2.0, first_backoff=0.01, max_backoff=0.02)
        with sending(engine, hook):
            first, newest = _changes(engine)
            wait_until("delivered after the garbage", lambda: _position(engine, endpoint.url) == newest)
    assert endpoint.positions()[:4] == [first] * 4 and endpoint.positions().count(first) == 4
    failed = [e for e in logs if e["event"] == "webhook_failed"]
    assert len(failed) == 3 and all(e["error"] and e["position"] == first for e in failed), failed
    assert all(len(e["error"]) <= 300 for e in failed), "a failed attempt's error logged unclipped"
    assert max(endpoint.seconds) < 1.0, "a malformed answer was waited on until the deadline"


@pytest.mark.parametrize("status", [200, 500])
def test_a_huge_answer_is_not_read_into_memory(engine: Engine, status: int) -> None:
    """A 600 MiB answer body: the sender reads a few KiB and hangs up (peak memory under 4 MiB); a 2xx counts, a 500 is retried."""
    chunk = b"y" * 65536

    def huge(conn: Conn, stop: threading.Event) -> None:
        conn.sendall(f"HTTP/1.1 {status} Huge\r\nContent-Length: {600 << 20}\r\n\r\n".encode())
        for _ in range((600 << 20) // len(chunk)):
            if stop.is_set():
                return
            conn.sendall(chunk)

    with serving(Endpoint([huge] * 2)) as endpoint:
        hook = Webhook(endpoint.url, SECRET, timeout=5.0, first_backoff=0.01, max_backoff=0.02)
        tracemalloc.start()
        try:
            with sending(engine, hook):
                first, newest = _changes(engine)
                wait_until("delivered", lambda: _position(engine, endpoint.url) == newest, 30)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert endpoint.positions().count(first) == (1 if status == 200 else 3)
    assert peak < 4 << 20, f"peak {peak >> 10} KiB"
    assert all(sent < 64 << 20 for sent in endpoint.sent), endpoint.sent


def test_a_slow_endpoint_is_waited_for_within_the_timeout_and_retried_past_it(engine: Engine) -> None:
    """An answer that would come after 1.5 s with a 0.5 s timeout fails at 0.5 s; one after 0.2 s is taken at the first try."""

    def late(seconds: float) -> Script:
        def play(conn: Conn, stop: threading.Event) -> None:
            if not conn.hung_up(seconds) and not stop.is_set():
                conn.sendall(OK)

        return play

    with serving(Endpoint([late(1.5), late(0.2)])) as endpoint:
        hook = Webhook(endpoint.url, SECRET, timeout=0.5, first_backoff=0.01, max_backoff=0.02)
        with sending(engine, hook):
            first, newest = _changes(engine)
            wait_until("delivered", lambda: _position(engine, endpoint.url) == newest)
    assert endpoint.positions().count(first) == 2
    assert 0.4 <= endpoint.seconds[0] < 0.9, "the first attempt did not end at its deadline"
    assert 0.2 <= endpoint.seconds[1] < 0.5


def test_the_request_is_one_post_with_its_headers(engine: Engine) -> None:
    """The sender writes one POST to the URL's path and query with Host, Content-Length and the three X-Lifecycle headers, and closes."""
    with serving(Endpoint([])) as endpoint:
        url = endpoint.url + "?tenant=a"
        with sending(engine, Webhook(url, SECRET, first_backoff=0.01)):
            _, newest = _changes(engine)
            wait_until("delivered", lambda: _position(engine, url) == newest)
    line, headers = _headers(endpoint.requests[0])
    assert line == "POST /hook?tenant=a HTTP/1.1"
    assert headers["host"] == url.split("/")[2] and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(endpoint.requests[0].partition(b"\r\n\r\n")[2])
    assert {"x-lifecycle-position", "x-lifecycle-timestamp", "x-lifecycle-signature"} <= headers.keys()


def test_a_tls_handshake_never_answered_ends_at_the_deadline(engine: Engine) -> None:
    """An https endpoint that accepts but never answers the TLS handshake fails each attempt at the 0.5 s deadline."""
    silent = [lambda conn, stop: None] * 5
    with serving(Endpoint(silent)) as endpoint:
        url = endpoint.url.replace("http://", "https://")
        with sending(engine, Webhook(url, SECRET, timeout=0.5, first_backoff=0.01, max_backoff=0.02)):
            before = _position(engine, url)
            _changes(engine)
            wait_until("two handshakes given up", lambda: len(endpoint.seconds) >= 2)
            assert _position(engine, url) == before
    assert all(0.4 <= s < 0.9 for s in endpoint.seconds[:2]), endpoint.seconds


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl command."""
    openssl = shutil.which("openssl")
    require("openssl", openssl is not None, "apt-get install openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    names = ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [str(openssl), *request, *names, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_https_is_delivered_to_a_trusted_certificate_and_refused_an_unknown_one(
    engine: Engine, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over https the sender checks the endpoint's certificate: trusted (SSL_CERT_FILE) it delivers, unknown it retries and never sends the change."""
    cert, key = certificate
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    receiver = Receiver(fail_odd=False)
    receiver.socket = tls.wrap_socket(receiver.socket, server_side=True)
    url = receiver.url.replace("http://", "https://")
    with running(receiver), all_logs() as logs:

        def failed() -> list[dict[str, Any]]:
            return [e for e in logs if e["event"] == "webhook_failed"]

        untrusted = Webhook(url, SECRET, timeout=2.0, first_backoff=0.01, max_backoff=0.02)
        with sending(engine, untrusted):
            first, _ = _changes(engine)
            wait_until("two refused handshakes", lambda: len(failed()) >= 2)
        assert receiver.accepted == [] and all("CERTIFICATE_VERIFY_FAILED" in e["error"] for e in failed())
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with sending(engine, Webhook(url, SECRET, timeout=2.0, first_backoff=0.01)):
            wait_until("delivered over https", lambda: len(receiver.accepted) >= 1)
    assert receiver.accepted[0]["position"] == first


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 199 Whatever\r\n\r\n",
    ],
)
def test_interim_answers_are_skipped_and_the_final_one_counts(engine: Engine, interim: bytes) -> None:
    """1xx answers (but 101) before a 200 in the same packet are skipped: the change is delivered in one attempt, none lost."""
    final = answer(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    with all_logs() as logs, serving(Endpoint([final] * 50)) as endpoint:
        hook = Webhook(endpoint.url, SECRET, timeout=2.0, first_backoff=0.01, max_backoff=0.02)
        with sending(engine, hook):
            first, newest = _changes(engine)
            wait_until("delivered", lambda: _position(engine, endpoint.url) == newest)
    assert endpoint.positions()[0] == first and len(endpoint.positions()) == len(set(endpoint.positions()))
    assert [e for e in logs if e["event"] == "webhook_failed"] == []
