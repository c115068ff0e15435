"""Webhooks: the change feed POSTed to a URL, one change per request, signed, retried, never blocking a write.

Each URL is a feed consumer of its own (``webhook:`` and a digest of the
URL, a prefix no other follower may use), so a webhook gets every change at
least once and in order, resumes after a restart where it stopped, and holds
back retention until it has passed a change. One sender per URL runs at a
time: it holds its consumer's lock while it lives (a second one gets
:class:`~lifecycle.errors.ConsumerInUse`, exit 2 in the CLI, and delivers
nothing), and a sender that dies loses it at once. The URL is stored with
the consumer (``lifecycle changes consumers`` shows it). A database that
goes away is waited for (:func:`lifecycle.feed.follow`).

A request is one change as JSON (:func:`lifecycle.feed.change_data`, or
Nova's ``instance.update`` with ``nova=True``) with headers:

- ``X-Lifecycle-Position``: the change's position (a redelivery has the same:
  receivers drop a position they have already taken);
- ``X-Lifecycle-Timestamp``: seconds since the epoch when it was sent;
- ``X-Lifecycle-Signature``: ``sha256=`` and the hex HMAC-SHA256 of
  ``TIMESTAMP.BODY`` keyed by the secret, then ``, sha256=...`` keyed by each
  previous secret (:func:`signature`). A receiver recomputes it with the
  secret it holds, compares it with each listed one in constant time, and
  refuses old timestamps (replays): :func:`verify`.

**Rotating the secret**, as Stripe does: run the sender with the new secret
and the old one as a previous secret (``LIFECYCLE_WEBHOOK_SECRET`` and
``LIFECYCLE_WEBHOOK_SECRET_PREVIOUS`` in the CLI), so every request carries
both signatures and receivers holding either key verify; move the receivers
to the new secret, then run the sender without the previous one. With one
secret the header is a single ``sha256=`` value, as it always was.

**URLs** are ``http`` or ``https`` with a host and, if given, a port from 1
to 65535, in printable ASCII (hosts in punycode, the rest percent-encoded).
A user or password in the URL (``user:pass@``) is refused, and never
printed: it would travel and be logged in the clear, and the signature is
what authenticates. A URL is checked before anything is registered.

**An attempt** succeeds only on a 2xx answer read in full (up to
:data:`ANSWER_BYTES` of its body). Anything else fails and is retried after
a backoff that doubles from ``first_backoff`` up to ``max_backoff``
seconds, the next change waiting (order is kept): another status, a
redirect above all (never followed: its ``Location`` is only logged), a
malformed answer (bad status line, over 100 headers, a body shorter than
announced), a connection refused or reset, and a timeout. Each attempt has
one deadline, ``timeout`` seconds for all of it (connect, TLS handshake,
request, answer; looking the host name up is left to the resolver's own
timeouts): every read waits only for what is left of it, so an endpoint that
trickles its answer cannot hold an attempt longer, and a sender told to stop
ends within about that deadline. ``https`` checks the endpoint's certificate
and host name against the system's trusted authorities (``SSL_CERT_FILE``). At most
:data:`ANSWER_LIMIT` bytes of an answer are read. A slow or dead endpoint
stalls only its own consumer: it reads committed changes, so no writer ever
waits for it. An endpoint gone for good must be forgotten
(``lifecycle changes forget``) for retention to go on.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import math
import re
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

from lifecycle import feed, validation
from lifecycle._http_post import ANSWER_BYTES, ANSWER_LIMIT, Refused, post
from lifecycle.audit import Change
from lifecycle.errors import ConsumerInUse, InvalidInput
from lifecycle.feed import change_data, nova_notification
from lifecycle.logs import get_logger

if TYPE_CHECKING:
    from lifecycle.context import Context

__all__ = [
    "ANSWER_BYTES",
    "ANSWER_LIMIT",
    "PREFIX",
    "Webhook",
    "check_consumer",
    "check_url",
    "consumer_name",
    "deliver",
    "normal_url",
    "signature",
    "verify",
]

log = get_logger(__name__)

PREFIX = "webhook:"
"""Consumer names starting with this (in any case) are the senders': no other follower may take one."""
_URL_LIMIT = 1024
_PRINTABLE_ASCII = re.compile(r"[!-~]+")
_USERINFO = re.compile(r"//[^/?#]*@")
_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]*))?")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TIMESTAMP = re.compile(r"[0-9]{1,20}")
_SIGNATURES = 16
"""Most values of a signature header :func:`verify` compares: a sender lists one per secret."""
_ERROR_SHOWN = 300
"""Most characters of a failed attempt's error logged."""


def consumer_name(url: str) -> str:
    """Return the feed consumer a webhook to ``url`` follows as: one per endpoint, however its URL is spelled."""
    return f"{PREFIX}{hashlib.sha256(normal_url(url).encode()).hexdigest()[:16]}"


def check_consumer(name: str) -> str:
    """Return ``name`` unless it is a webhook sender's (``webhook:``...): :class:`InvalidInput` then."""
    if name[: len(PREFIX)].lower() == PREFIX:
        raise InvalidInput(
            f"consumer name {name[:60]!r} is reserved: names starting with {PREFIX!r} belong to webhook senders"
            " (lifecycle changes webhook URL); choose another name"
        )
    return name


def signature(secret: bytes | Sequence[bytes], timestamp: str, body: bytes) -> str:
    """Return the ``X-Lifecycle-Signature`` value of a request: ``sha256=`` and the HMAC of ``TIMESTAMP.BODY``.

    Given several secrets, one such value per secret, in their order, joined by ``", "``.
    """
    secrets = [secret] if isinstance(secret, bytes) else list(secret)
    signed = timestamp.encode() + b"." + body
    return ", ".join("sha256=" + hmac.new(key, signed, hashlib.sha256).hexdigest() for key in secrets)


def verify(secret: bytes, timestamp: str, body: bytes, header: str, *, tolerance: float = 300.0) -> bool:
    """Return whether ``header`` holds a signature of the request by ``secret``, sent at most ``tolerance`` s ago.

    What a receiver does (in any language): recompute the HMAC, compare it in
    constant time with each value the header lists, and refuse a timestamp
    too far from now (a replay). A timestamp that is not 1 to 20 ASCII digits
    is False; only the header's first :data:`_SIGNATURES` values are looked at
    (a sender lists one per secret). :class:`InvalidInput` for a ``tolerance``
    that is not a finite number >= 0.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise InvalidInput(f"tolerance must be a finite number of seconds >= 0, got {tolerance!r}")
    if not isinstance(timestamp, str) or not _TIMESTAMP.fullmatch(timestamp):
        return False  # checked before int(): thousands of digits would exceed its conversion limit
    if abs(time.time() - int(timestamp)) > tolerance:
        return False
    expected = signature(secret, timestamp, body).encode()
    given = [value.strip().encode("utf-8", "replace") for value in header.split(",", _SIGNATURES)[:_SIGNATURES]]
    return any([hmac.compare_digest(expected, value) for value in given])


def _shown(url: str) -> str:
    """Return ``url`` as it may be printed: without a user or password, clipped."""
    return repr(_USERINFO.sub("//***@", url)[:200])


def check_url(url: object) -> SplitResult:
    """Return ``url`` split, if a webhook may post to it (see the module docstring); :class:`InvalidInput` if not."""
    if not isinstance(url, str) or not 1 <= len(url) <= _URL_LIMIT:
        raise InvalidInput(f"webhook URL must be a string of 1 to {_URL_LIMIT} characters")
    if not _PRINTABLE_ASCII.fullmatch(url):
        raise InvalidInput(
            f"webhook URL {_shown(url)} must be printable ASCII without spaces (a host in punycode,"
            " the rest percent-encoded)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535", a port not in digits
        raise InvalidInput(f"webhook URL {_shown(url)} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"webhook URL {_shown(url)} must be http:// or https:// with a host")
    if "@" in parts.netloc:
        raise InvalidInput(
            "webhook URL must not carry a user or password (user:pass@): it would travel and be logged in the"
            " clear; receivers authenticate requests by their signature"
        )
    if port == 0:
        raise InvalidInput(f"webhook URL {_shown(url)} has port 0: a port is 1 to 65535")
    _check_host(url, parts.netloc)
    return parts


def _check_host(url: str, netloc: str) -> None:
    """Refuse a host no request can reach: a bracketed one that is not a plain IPv6 address, a bad DNS name."""
    if netloc.startswith("["):
        bracketed = _BRACKETED.fullmatch(netloc)
        try:
            ipaddress.IPv6Address(bracketed[1] if bracketed else "")
        except ValueError:
            raise InvalidInput(
                f"webhook URL {_shown(url)} has a bracketed host that is not a plain IPv6 address (no zone)"
            ) from None
        return
    host = netloc.rpartition(":")[0] if ":" in netloc else netloc
    with suppress(ValueError):
        ipaddress.IPv4Address(host)
        return
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise InvalidInput(
            f"webhook URL {_shown(url)} has host {host[:80]!r}: a host is an IPv4 address, [an IPv6 address] or a"
            " DNS name of labels of 1 to 63 letters, digits and hyphens (not first or last), 253 characters at most"
        )


def normal_url(url: str) -> str:
    """Return ``url`` checked and spelled one way: scheme and host lowercase, no default port, no empty ? or #.

    A URL already spelled so comes back unchanged (its consumer name with it).
    """
    parts = check_url(url)
    host = parts.netloc.rpartition("]")[0] + "]" if parts.netloc.startswith("[") else parts.hostname or ""
    port = "" if parts.port in (None, _DEFAULT_PORTS[parts.scheme]) else f":{parts.port}"
    query = f"?{parts.query}" if parts.query else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{host.lower()}{port}{parts.path}{query}{fragment}"


def _check_secret(label: str, secret: object) -> bytes:
    if not isinstance(secret, bytes):
        raise InvalidInput(f"{label} must be bytes (e.g. text.encode()), got {type(secret).__name__}")
    if len(secret) < 16:
        raise InvalidInput(f"{label} must be at least 16 bytes: it signs every request")
    return secret


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where and how to post the feed: a URL, the secrets that sign, and the timings of each attempt."""

    url: str
    secret: bytes = field(repr=False)
    """Signs every request; its signature comes first."""
    nova: bool = False
    """Post Nova's ``instance.update`` notification instead of the change's own fields."""
    timeout: float = 10.0
    """Seconds one attempt may take in all: connect, handshake, request and answer."""
    first_backoff: float = 1.0
    """Seconds before the first retry; each retry waits twice as long as the one before, up to ``max_backoff``."""
    max_backoff: float = 60.0
    previous_secrets: tuple[bytes, ...] = field(default=(), repr=False)
    """Secrets being rotated out: each request is signed by these too, so receivers still holding one verify."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normal_url(self.url))  # one consumer per endpoint, however spelled
        _check_secret("webhook secret", self.secret)
        if not isinstance(self.nova, bool):
            raise InvalidInput(f"webhook nova must be True or False, got {self.nova!r}")
        if not isinstance(self.previous_secrets, tuple):
            raise InvalidInput("webhook previous secrets must be a tuple of bytes")
        for old in self.previous_secrets:
            _check_secret("a previous webhook secret", old)
        validation.seconds("webhook timeout", self.timeout, low=0.001)
        validation.seconds("webhook first backoff", self.first_backoff, low=0.001)
        validation.seconds("webhook max backoff", self.max_backoff, low=self.first_backoff)

    @property
    def secrets(self) -> tuple[bytes, ...]:
        """The secrets each request is signed by, current first, each once."""
        return tuple(dict.fromkeys((self.secret, *self.previous_secrets)))


class _Stopped(Exception):
    """Raised out of the handler when the webhook is told to stop mid-retry: the change stays undelivered."""


def _post(hook: Webhook, parts: SplitResult, tls: ssl.SSLContext | None, change: Change) -> None:
    """Send one change; raise unless the endpoint answered 2xx within the hook's timeout."""
    body = json.dumps(nova_notification(change) if hook.nova else change_data(change), sort_keys=True).encode()
    stamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
        "User-Agent": "lifecycle-webhooks",
        "X-Lifecycle-Position": str(change.position),
        "X-Lifecycle-Timestamp": stamp,
        "X-Lifecycle-Signature": signature(hook.secrets, stamp, body),
    }
    post(parts, tls, headers, body, deadline=time.monotonic() + hook.timeout)


def _sender(hook: Webhook, stop: threading.Event) -> Callable[[Change], None]:
    """Return the feed handler of a webhook: post a change until the endpoint takes it, or raise on stop."""
    parts = check_url(hook.url)
    tls = ssl.create_default_context() if parts.scheme == "https" else None  # certificates and host checked

    def send(change: Change) -> None:
        backoff = hook.first_backoff
        while True:
            try:
                _post(hook, parts, tls, change)  # the follow confirmed its lock before this change
                return
            except Refused as exc:
                log.warning(
                    "webhook_failed",
                    url=hook.url,
                    position=str(change.position),
                    error=str(exc),
                    status=exc.status,
                    location=exc.location and exc.location[:300],
                    answer=exc.excerpt,
                )
            except (OSError, http.client.HTTPException, ValueError) as exc:  # timeouts, resets, TLS, garbage
                error = f"{type(exc).__name__}: {exc}"[:_ERROR_SHOWN]  # a BadStatusLine carries the whole line
                log.warning("webhook_failed", url=hook.url, position=str(change.position), error=error)
            if stop.wait(backoff):
                raise _Stopped
            feed.confirm_claim()  # another sender may have taken the URL meanwhile: never two posting
            backoff = min(backoff * 2, hook.max_backoff)

    return send


def deliver(ctx: Context, hook: Webhook, *, stop: threading.Event, batch: int = 100) -> int:
    """Post the feed to ``hook`` until ``stop`` is set; return how many changes were delivered.

    The webhook's consumer is registered at the newest change on its first
    run (a new endpoint gets what happens from then on), and resumes at its
    position afterwards. :class:`ConsumerInUse` when another sender delivers
    to the URL; :class:`~lifecycle.errors.DatabaseUnavailable` when told to
    stop while the database is away.
    """
    name, send, delivered = consumer_name(hook.url), _sender(hook, stop), [0]

    def counted(change: Change) -> None:
        send(change)
        delivered[0] += 1

    log.info("webhook_started", url=hook.url, consumer=name, secrets=len(hook.secrets))
    store = ctx.store
    try:
        with suppress(_Stopped):  # told to stop mid-retry: that change stays undelivered, its position unstored
            feed.follow(
                store,
                name,
                counted,
                stop=stop,
                batch=feed.check_batch(batch),
                poll=ctx.settings.feed_poll_interval,
                after=feed.resolve(store, "end"),
                confirm_each=True,
                url=hook.url,
            )
    except ConsumerInUse:
        raise ConsumerInUse(name, f"another sender delivers to {hook.url}") from None
    log.info("webhook_stopped", url=hook.url, delivered=delivered[0])
    return delivered[0]
