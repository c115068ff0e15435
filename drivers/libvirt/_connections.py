"""The connections of one libvirt driver to its host: which one a call gets, reopening, growing, events.

The first connection carries the domain events and its loss is a lost host:
a close callback marks it dead, the next call reopens it with backoff, and
calls made while the daemon is away raise :class:`DriverUnavailable`
(transient) instead of crashing. More connections are opened in the
background while every connection is busy, so a call stuck on one hung
guest's monitor never holds the calls behind it. Each connection follows the
discipline of :mod:`lifecycle.drivers._link` (one call in flight, closed only under its
lock).
"""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

from lifecycle.drivers._link import Guarded, Link, Opener
from lifecycle.drivers.base import EventListener, LifecycleEvent
from lifecycle.drivers.libvirt._mapping import EVENTS, alive, link_error, message
from lifecycle.drivers.libvirt._xml import NAME_PREFIX
from lifecycle.errors import DriverUnavailable
from lifecycle.logs import get_logger

try:
    import libvirt
except ImportError:  # pragma: no cover - exercised where libvirt-python is absent
    libvirt = None

__all__ = ["MOST_LINKS", "STUCK_SECONDS", "Connections", "ensure_event_loop", "libvirt_available"]

log = get_logger(__name__)

STUCK_SECONDS = 5.0  # a call in flight this long is stuck, for choosing a connection (a hung guest's monitor)
MOST_LINKS = 16  # connections per host at most, stuck ones included

_event_loop_lock = threading.Lock()
_event_loop_started = False


def libvirt_available() -> bool:
    """Return whether libvirt-python can be imported."""
    return libvirt is not None


def ensure_event_loop() -> None:
    """Register libvirt's default event loop once per process and run it on a thread."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors become exceptions, not stderr noise

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


class Connections:
    """The connections of one driver to ``uri``: at most ``size`` that are not stuck, ``MOST_LINKS`` in all."""

    def __init__(self, uri: str, *, size: int, reconnect_seconds: float, call_seconds: float) -> None:
        self.uri = uri
        self.size = size
        self.reconnect_seconds = reconnect_seconds
        self.call_seconds = call_seconds
        self.lock = threading.RLock()
        self.first: Link | None = None
        """The first connection: it carries the domain events, and its loss is a lost host."""
        self.spare: list[Link] = []
        """More connections, opened in the background while every connection is busy."""
        self._growing = False
        self._grown = threading.Condition(self.lock)
        """Told when a background open ended (a connection added, or not)."""
        self._opened: dict[int, Link] = {}
        """Every connection opened, by the identity of its raw object, kept until :meth:`close`."""
        self._opener = Opener(uri)
        self._listener: EventListener | None = None
        self._callback_id: int | None = None
        self.closed = threading.Event()
        """Set by :meth:`close`; waits of the driver's calls wait on it, so closing ends them at once."""

    def get(self, call: str) -> Any:
        """Return a live connection (guarded: each call on it holds its lock), opening one when needed.

        The first connection is opened here, and again when it is lost
        (bounded by ``reconnect_seconds``). The caller gets the least busy
        connection whose call in flight (if any) is not stuck, one that has
        not returned for ``STUCK_SECONDS`` (a call waiting on one hung guest's
        monitor, while libvirtd answers everything else). While no connection
        is free of a call, one more is opened on a thread of its own (up to
        ``size`` that are not stuck, and ``MOST_LINKS`` in all); when
        every one is stuck, the caller waits up to ``STUCK_SECONDS`` for it
        rather than queueing behind a stuck call. Everything made through a
        connection (a domain, a volume, a stream) keeps using that connection.
        """
        with self.lock:
            waited_until: float | None = None
            while True:
                link = self.first
                if link is None or link.dead:
                    link = self._reopen(call)
                self.spare = [spare for spare in self.spare if not spare.dead and not spare.closed]
                links = [link, *self.spare]
                flowing = [one for one in links if one.stuck_for() < STUCK_SECONDS]
                best = min(flowing, key=lambda one: one.load) if flowing else min(links, key=Link.stuck_for)
                if (best.load or not flowing) and len(flowing) < self.size and len(links) < MOST_LINKS:
                    self._start_growing()
                if flowing or not self._growing or self.closed.is_set():
                    return Guarded(best.raw, best)
                waited_until = waited_until or time.monotonic() + STUCK_SECONDS
                if waited_until <= time.monotonic():
                    return Guarded(best.raw, best)
                self._grown.wait(waited_until - time.monotonic())

    def lost(self, exc: Any, conn: Any) -> bool:
        """Return whether ``exc`` means ``conn`` is gone; if so, mark it dead so the next call reconnects."""
        link = conn._link
        lost = link.dead or (self.first is not link and link not in self.spare) or link_error(exc) or not alive(conn)
        if lost:
            link.dead = True
        return lost

    def _start_growing(self) -> None:
        if not self._growing and not self.closed.is_set():
            self._growing = True
            threading.Thread(target=self._grow, name=f"libvirt-grow-{self.uri}", daemon=True).start()

    def _reopen(self, call: str) -> Link:
        """Open the first connection anew (keepalive, events); DriverUnavailable when it cannot."""
        if self.closed.is_set():
            raise DriverUnavailable(f"{call}: the driver for {self.uri} is closed", call=call)
        self.first = None
        deadline = time.monotonic() + self.reconnect_seconds
        delay = 0.1
        while True:
            try:
                raw = self._opener.open(max(1.0, deadline - time.monotonic()), call)
                break
            except libvirt.libvirtError as exc:
                if time.monotonic() + delay > deadline:
                    raise DriverUnavailable(f"{call}: cannot connect to {self.uri}: {message(exc)}", call=call) from exc
                self.closed.wait(delay)
                delay = min(delay * 2, 1.0)
        link = self._adopt(raw)
        self.first = link
        if self._listener is not None:
            self._subscribe(Guarded(raw, link))
        return link

    def _adopt(self, raw: Any) -> Link:
        """Keep a new raw connection as a link: referenced until close, its close callback and keepalive set."""
        link = Link(raw, self.uri, self.call_seconds)
        self._opened[id(raw)] = link  # referenced until close: never freed under a libvirt callback
        conn = Guarded(raw, link)
        conn.registerCloseCallback(self.on_close, None)
        with suppress(libvirt.libvirtError):  # drivers without keepalive (test:///) refuse it: harmless
            # A peer silent for 5 s x 3 probes closes the connection: a dead host is noticed in seconds.
            conn.setKeepAlive(5, 3)
        return link

    def _grow(self) -> None:
        """Open one more connection (on its own thread: an open has no time limit) and add it to the spares."""
        try:
            raw = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            log.debug("libvirt_connection_not_added", uri=self.uri, error=message(exc))
            with self.lock:
                self._growing = False
                self._grown.notify_all()
            return
        with self.lock:
            self._growing = False
            try:
                if self.closed.is_set():
                    with suppress(libvirt.libvirtError):
                        raw.close()  # nobody else has it: no call can be in flight on it
                    return
                self.spare.append(self._adopt(raw))
            except (libvirt.libvirtError, DriverUnavailable) as exc:
                log.debug("libvirt_connection_not_added", uri=self.uri, error=str(exc))
            finally:
                self._grown.notify_all()

    def on_close(self, conn: Any, _reason: int, _opaque: Any) -> None:
        """Libvirt's close callback: mark the link dead and nothing more; the next call opens a new connection.

        It runs on libvirt's event loop, or on a thread inside a call: it takes
        no lock a call may hold and makes no call.
        """
        link = self._opened.get(id(conn))
        if link is not None:
            link.dead = True

    def close(self) -> None:
        """Close every connection once no call is in flight on it; no connection is opened afterwards."""
        with self.lock:
            self.closed.set()
            current, self.first, self.spare = self.first, None, []
            links, self._opened = list(self._opened.values()), {}
        for link in links:
            callback = self._callback_id if link is current else None

            def unregister(raw: Any, callback: int | None = callback) -> None:
                with suppress(libvirt.libvirtError):
                    if callback is not None:
                        raw.domainEventDeregisterAny(callback)
                    raw.unregisterCloseCallback()

            link.close(before=unregister)

    def listen(self, listener: EventListener | None) -> None:
        """Deliver the host's lifecycle events to ``listener`` (None stops delivery), over the first connection."""
        with self.lock:
            self._listener = listener
            link = self.first
            if link is None or link.dead:
                return
            conn = Guarded(link.raw, link)
            if self._callback_id is not None:
                with suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(self._callback_id)
                self._callback_id = None
            if listener is not None:
                self._subscribe(conn)

    def _subscribe(self, conn: Any) -> None:
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
        )

    def _on_event(self, _conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        transition = EVENTS.get(event)
        listener = self._listener
        if transition is None or listener is None or not dom.name().startswith(NAME_PREFIX):
            return
        listener(LifecycleEvent(dom.UUIDString(), transition, datetime.now(UTC)))
