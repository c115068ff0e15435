"""Webhooks: every change posted, signed and in order, through a receiver that fails half its requests."""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from lifecycle import Engine, InvalidInput
from lifecycle.webhooks import Webhook, consumer_name, deliver, signature
from tests.test_feed import STOPPED, WAIT, wait_until

SECRET = b"a shared secret of some length"


class Receiver(ThreadingHTTPServer):
    """An endpoint on 127.0.0.1 that answers 500 to every other request and keeps the bodies it accepted."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests = 0
        self.accepted: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        expected = signature(SECRET, self.headers["X-Lifecycle-Timestamp"], body)
        with self.server.lock:
            self.server.requests += 1
            fail = self.server.requests % 2 == 1
            if not hmac.compare_digest(expected, self.headers["X-Lifecycle-Signature"]):
                self.server.bad_signatures += 1
            elif not fail:
                self.server.accepted.append({**json.loads(body), "header": self.headers["X-Lifecycle-Position"]})
        self.send_response(500 if fail else 204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:  # the test's output stays quiet
        pass


@contextmanager
def running(server: Receiver) -> Iterator[Receiver]:
    """Serve in a thread for the block."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


@contextmanager
def delivering(engine: Engine, hook: Webhook) -> Iterator[list[int]]:
    """Run the webhook in a thread for the block; yield where its count lands once it stopped."""
    stop, result = threading.Event(), []
    deliver(engine, hook, stop=STOPPED)  # registers its consumer at the newest change, here and now
    thread = threading.Thread(target=lambda: result.append(deliver(engine, hook, stop=stop)), daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join(WAIT)
        assert not thread.is_alive(), "the webhook did not stop when told"


def test_a_receiver_failing_half_its_requests_still_gets_every_change_in_order(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """Each change reaches the endpoint once accepted, in feed order, signed; every failed post was retried."""
    with running(Receiver()) as receiver:
        hook = Webhook(receiver.url, SECRET, first_backoff=0.005, max_backoff=0.02)
        with delivering(engine, hook) as result:
            uuid = new_instance()
            engine.stop(uuid)
            engine.start(uuid)
            feed = [c for c in engine.changes(limit=10_000) if c.instance_uuid == uuid]
            wait_until("every change accepted", lambda: len(receiver.accepted) >= len(feed))
        assert result == [len(feed)]
    assert [a["position"] for a in receiver.accepted] == [str(c.position) for c in feed]
    assert [a["header"] for a in receiver.accepted] == [a["position"] for a in receiver.accepted]
    assert receiver.bad_signatures == 0 and receiver.requests == 2 * len(feed)
    (consumer,) = engine.consumers()
    assert (consumer.name, consumer.position) == (consumer_name(hook.url), feed[-1].position)


def test_a_dead_endpoint_blocks_no_write_and_loses_nothing(engine: Engine, new_instance: Callable[..., str]) -> None:
    """With nothing listening, operations still commit; the webhook keeps its position and stops when told."""
    with running(Receiver()) as receiver:
        dead = receiver.url
    hook = Webhook(dead, SECRET, timeout=1.0, first_backoff=0.01, max_backoff=0.05)
    with delivering(engine, hook) as result:
        uuid = new_instance()
        engine.stop(uuid)
        engine.start(uuid)
        (consumer,) = engine.consumers()
    assert result == [0]
    assert engine.consumers() == [consumer], "nothing was delivered, so the position did not move"
    assert len([c for c in engine.changes(after=consumer.position, limit=10_000) if c.instance_uuid == uuid]) == 9


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"url": "ftp://host/x"}, "http:// or https://"),
        ({"url": "http:///nohost"}, "with a host"),
        ({"url": "http://h/\x1b"}, "webhook URL"),
        ({"secret": b"short"}, "at least 16 bytes"),
        ({"secret": "a str, not bytes, long"}, "at least 16 bytes"),
        ({"timeout": 0}, "webhook timeout"),
        ({"first_backoff": 2.0, "max_backoff": 1.0}, "webhook max backoff"),
    ],
)
def test_a_bad_webhook_is_refused(kw: dict[str, Any], needle: str) -> None:
    """A URL that is not http(s) with a host, a short or non-bytes secret, or bad timings is InvalidInput."""
    values: dict[str, Any] = {"url": "http://127.0.0.1:9/hook", "secret": SECRET, **kw}
    with pytest.raises(InvalidInput, match=needle):
        Webhook(**values)
