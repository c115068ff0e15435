"""Webhooks: the change feed POSTed to a URL, one change per request, signed, retried, never blocking a write.

Each URL is a feed consumer of its own (``webhook:`` and a digest of the
URL), so a webhook gets every change at least once and in order, resumes
after a restart where it stopped, and holds back retention until it has
passed a change. A request is one change as JSON (:func:`lifecycle.feed.change_data`,
or Nova's ``instance.update`` with ``nova=True``) with headers:

- ``X-Lifecycle-Position``: the change's position (a redelivery has the same);
- ``X-Lifecycle-Timestamp``: seconds since the epoch when it was sent;
- ``X-Lifecycle-Signature``: ``sha256=`` and the hex HMAC-SHA256, keyed by the
  shared secret, of ``TIMESTAMP.BODY``: a receiver recomputes it, compares in
  constant time, and refuses old timestamps (replays).

Any answer but 2xx, a timeout or a connection error is retried after a
backoff that doubles from ``first_backoff`` up to ``max_backoff`` seconds;
the next change waits (order is kept). A slow or dead endpoint stalls only
its own consumer: it reads committed changes, so no writer ever waits for it.
An endpoint gone for good must be forgotten (``lifecycle changes forget``)
for retention to go on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import structlog

from lifecycle import validation
from lifecycle.audit import Change
from lifecycle.errors import InvalidInput
from lifecycle.feed import change_data, nova_notification

if TYPE_CHECKING:
    from lifecycle.engine import Engine

__all__ = ["Webhook", "consumer_name", "deliver", "signature"]

log = structlog.get_logger(__name__)


def consumer_name(url: str) -> str:
    """Return the feed consumer a webhook to ``url`` follows as."""
    return f"webhook:{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """Return the ``X-Lifecycle-Signature`` value of a request: ``sha256=`` and the HMAC of ``TIMESTAMP.BODY``."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where and how to post the feed: a URL, the shared secret, and the timings of each attempt."""

    url: str
    secret: bytes
    nova: bool = False
    """Post Nova's ``instance.update`` notification instead of the change's own fields."""
    timeout: float = 10.0
    """Seconds one request may take."""
    first_backoff: float = 1.0
    """Seconds before the first retry; each retry waits twice as long as the one before, up to ``max_backoff``."""
    max_backoff: float = 60.0

    def __post_init__(self) -> None:
        validation.name("webhook URL", self.url)
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(f"webhook URL {self.url!r} must be http:// or https:// with a host")
        if not isinstance(self.secret, bytes) or len(self.secret) < 16:
            raise InvalidInput("webhook secret must be at least 16 bytes: it signs every request")
        validation.seconds("webhook timeout", self.timeout, low=0.001)
        validation.seconds("webhook first backoff", self.first_backoff, low=0.001)
        validation.seconds("webhook max backoff", self.max_backoff, low=self.first_backoff)


class _Stopped(Exception):
    """Raised out of the handler when the webhook is told to stop mid-retry: the change stays undelivered."""


def _post(hook: Webhook, change: Change) -> None:
    """Send one change; raise unless the endpoint answered 2xx."""
    body = json.dumps(nova_notification(change) if hook.nova else change_data(change), sort_keys=True).encode()
    stamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-Lifecycle-Position": str(change.position),
        "X-Lifecycle-Timestamp": stamp,
        "X-Lifecycle-Signature": signature(hook.secret, stamp, body),
    }
    request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=hook.timeout) as answer:  # http(s) only: checked by Webhook
        answer.read()


def _sender(hook: Webhook, stop: threading.Event) -> Callable[[Change], None]:
    """Return the feed handler of a webhook: post a change until the endpoint takes it, or raise on stop."""

    def send(change: Change) -> None:
        backoff = hook.first_backoff
        while True:
            try:
                _post(hook, change)
                return
            except (urllib.error.URLError, OSError, ValueError) as exc:  # HTTPError is a URLError
                log.warning("webhook_failed", url=hook.url, position=str(change.position), error=str(exc))
            if stop.wait(backoff):
                raise _Stopped
            backoff = min(backoff * 2, hook.max_backoff)

    return send


def deliver(engine: Engine, hook: Webhook, *, stop: threading.Event, batch: int = 100) -> int:
    """Post the feed to ``hook`` until ``stop`` is set; return how many changes were delivered.

    The webhook's consumer is registered at the newest change on its first
    run (a new endpoint gets what happens from then on), and resumes at its
    position afterwards.
    """
    send, delivered = _sender(hook, stop), [0]

    def counted(change: Change) -> None:
        send(change)
        delivered[0] += 1

    log.info("webhook_started", url=hook.url, consumer=consumer_name(hook.url))
    with suppress(_Stopped):  # told to stop mid-retry: that change stays undelivered, its position unstored
        engine.follow(consumer_name(hook.url), counted, stop=stop, batch=batch, after="end")
    log.info("webhook_stopped", url=hook.url, delivered=delivered[0])
    return delivered[0]
