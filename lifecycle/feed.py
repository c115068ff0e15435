"""The change feed: every committed change of an instance's states, in commit order, never lost; audit queries.

Each audit row is a :class:`~lifecycle.audit.Change` at a
:class:`~lifecycle.audit.Position` that grows in commit order, so a reader
paging by position never passes over a change that commits later (how each
database makes sure: :mod:`lifecycle.store.feed`). :func:`follow` delivers the
feed to a handler:

- **at least once**: a consumer's position is stored only after the
  handler returned for every change up to it: when the follower catches up,
  at most every :data:`SAVE_EVERY` seconds while it works through a backlog,
  when it stops, and before an exception from the handler propagates. A
  consumer killed meanwhile gets the changes after its stored position again
  when it restarts (at most a second's worth, or the unfinished batch), and
  nothing after a stored position is ever skipped;
- **in order**: changes come in feed order, which keeps each instance's
  changes in the order they committed;
- **woken by commits** on PostgreSQL (LISTEN/NOTIFY; a read every
  ``feed_poll_interval`` while a committed change waits for an older
  transaction, and every :data:`IDLE_RECHECK` seconds regardless), **polling**
  every ``feed_poll_interval`` on SQLite.

A consumer is registered by its first :func:`follow`, at ``after``; from then
on it resumes where it stopped and ``after`` is ignored (as Kafka's
``auto.offset.reset`` applies only to a group without an offset). Retention
(:meth:`Engine.feed.prune`) never removes a change a registered consumer
has not passed, so a consumer that is gone for good must be forgotten.

**One follower per name.** A follower of a named consumer holds the
consumer's lock while it follows (two followers would each store the other's
position over its own), so a second one, in this process or another, is
refused with :class:`ConsumerInUse` naming the holder when the database can
tell. It checks it still holds the lock before each batch; a webhook sender
(``confirm_each``) before it hands each change to its handler (a handler that
retries calls :func:`confirm_claim` before each retry). A lock lost (its
PostgreSQL session gone) ends the batch at once, as a lost database does.
Anonymous followers (consumer None) store nothing and take no lock.

**A database that is away when a follower starts** is waited for the same
way, before anything is read (:func:`wait_for_database`, what the CLI's
relays call first).

**A database that goes away** (a restart, a dropped link: the store raises
:class:`DatabaseUnavailable` with ``transient`` set) does not end a follow:
it logs ``feed_database_lost`` with the database's own message, reconnects
after a backoff that doubles from :data:`RECONNECT_FIRST` to
:data:`RECONNECT_MAX` seconds, LISTENs again, takes its lock again, and goes
on after the last change its handler returned from (never behind the stored
position), so nothing is lost and nothing comes twice that had not come
twice anyway. It raises :class:`DatabaseUnavailable` only when told to stop
while the database is away, or for an error a reconnect cannot cure.

:func:`query_audit` answers questions across instances ("what happened in
this request", "what did sync change on this host last night", "which
instances went to error today"), each from one index range.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from lifecycle import graph, validation
from lifecycle.audit import START, Activity, AuditEntry, Change, Consumer, Position, audit_query
from lifecycle.errors import ConsumerInUse, DatabaseUnavailable, InvalidInput
from lifecycle.feed_shapes import as_change, change_data, change_line, nova_notification
from lifecycle.logs import get_logger

if TYPE_CHECKING:
    from lifecycle.store import Store
    from lifecycle.store.feed import Reader

__all__ = [
    "IDLE_RECHECK",
    "RECONNECT_FIRST",
    "RECONNECT_MAX",
    "SAVE_EVERY",
    "Change",
    "Consumer",
    "ConsumerInUse",
    "DatabaseUnavailable",
    "Position",
    "as_change",
    "change_data",
    "change_line",
    "check_batch",
    "confirm_claim",
    "follow",
    "nova_notification",
    "prune",
    "query_audit",
    "resolve",
    "wait_for_database",
]

log = get_logger(__name__)

SAVE_EVERY = 1.0
"""Seconds between position writes while a backlog streams (each write waits for a writer's lock on
SQLite); a follower also stores its position whenever it catches up, stops, or its handler raises."""
IDLE_RECHECK = 30.0
"""Seconds a PostgreSQL follower waits for a notification before it reads anyway (a lost connection's
notifications, say, must not stall it)."""

RECONNECT_FIRST = 0.5
"""Seconds a follower waits before its first reconnect to a database that went away."""
RECONNECT_MAX = 10.0
"""Longest wait between two reconnects: the wait doubles from :data:`RECONNECT_FIRST` up to this."""

Handler = Callable[[Change], object]

_CLAIMED: ContextVar[Reader | None] = ContextVar("lifecycle_feed_claimed", default=None)
"""The reader of the exclusive follow whose handler runs in this context, if any."""


def confirm_claim() -> None:
    """Return if the exclusive follow running this handler still holds its consumer's lock (or none runs).

    Raises :class:`DatabaseUnavailable` (transient) when the lock is lost or
    cannot be checked: the handler must then deliver nothing more, and the
    follow reconnects and takes the lock again, or stops with :class:`ConsumerInUse`.
    """
    reader = _CLAIMED.get()
    if reader is not None:
        reader.confirm()


@contextmanager
def _claimed(reader: Reader | None) -> Iterator[None]:
    token = _CLAIMED.set(reader)
    try:
        yield
    finally:
        _CLAIMED.reset(token)


def resolve(store: Store, after: Position | str | None) -> Position:
    """Return the position ``after`` names: START for None, the newest readable change for ``"end"``."""
    if after is None:
        return START
    if after == "end":
        return store.feed.newest() or START
    return Position.parse(after)


class _Cursor:
    """Where delivery got to (the last change the handler returned from), what the database holds, and how many."""

    def __init__(self, store: Store, consumer: str | None, at: Position, url: str | None) -> None:
        self.store, self.consumer, self.url = store, consumer, url
        self.at = self.stored = at
        self.registered = consumer is None
        self.delivered = 0
        self.saved = time.monotonic()

    def register(self) -> None:
        """Register the consumer at ``at`` on its first run, or resume at its stored position (once per follow)."""
        if self.registered or self.consumer is None:
            return
        found, new = self.store.consumers.register(self.consumer, self.at, url=self.url)
        self.at = self.stored = found.position
        self.registered = True
        event = "feed_consumer_registered" if new else "feed_consumer_resumed"
        log.info(event, consumer=self.consumer, position=str(found.position))

    def save(self) -> None:
        """Store the position delivery got to, if it moved (an anonymous follower stores nothing)."""
        if self.consumer is not None and self.at != self.stored:
            self.store.consumers.save_position(self.consumer, self.at)
            self.stored = self.at  # only once written: a write lost with the database is made again
        self.saved = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.saved >= SAVE_EVERY

    def deliver(self, handler: Handler, changes: Sequence[Change], confirm: Callable[[], None]) -> None:
        """Hand each change to ``handler`` once ``confirm`` passed; move past those it returned from, even on raise."""
        done = 0
        try:
            for change in changes:
                confirm()
                handler(change)
                done += 1
        finally:
            if done:
                self.at = changes[done - 1].position
                self.delivered += done

    def where(self) -> str:
        """Say where delivery got to, and where a follow started again resumes."""
        if self.consumer is None:
            return f"delivered up to {self.at}: follow again with --after {self.at}"
        return f"delivered up to {self.at}; consumer {self.consumer!r} resumes after its stored position {self.stored}"


class _Backoff:
    """The waits between reconnects: doubling from RECONNECT_FIRST to RECONNECT_MAX, reset once connected."""

    def __init__(self) -> None:
        self.next = RECONNECT_FIRST
        self.lost: DatabaseUnavailable | None = None

    def failed(self, exc: DatabaseUnavailable) -> float:
        wait, self.next, self.lost = self.next, min(self.next * 2, RECONNECT_MAX), exc
        return wait

    def connected(self, cursor: _Cursor) -> None:
        if self.lost is not None:
            log.info("feed_database_back", consumer=cursor.consumer, position=str(cursor.at))
        self.next, self.lost = RECONNECT_FIRST, None


def wait_for_database(url: str, consumer: str | None, *, stop: threading.Event) -> None:
    """Return once the database at ``url`` accepts a connection, waiting as a follow does while it is away.

    For a follower started while its database is down: each failed try logs
    ``feed_database_lost`` and waits, the wait doubling from
    :data:`RECONNECT_FIRST` to :data:`RECONNECT_MAX` seconds.
    :class:`DatabaseUnavailable` when told to stop meanwhile; an error waiting
    cannot cure returns at once, for opening the database to report it.
    """
    from lifecycle.store._follower import probe

    backoff = _Backoff()
    while True:
        try:
            probe(url)
            return
        except DatabaseUnavailable as exc:
            if not exc.transient:
                return
            wait = backoff.failed(exc)
            log.warning("feed_database_lost", consumer=consumer, position=None, error=exc.reason, retry_in=wait)
            if stop.wait(wait):
                raise DatabaseUnavailable(exc.reason, transient=True, stopped="nothing delivered") from exc


def follow(
    store: Store,
    consumer: str | None,
    handler: Handler,
    *,
    stop: threading.Event,
    batch: int,
    poll: float,
    after: Position,
    confirm_each: bool = False,
    url: str | None = None,
) -> int:
    """Deliver the feed to ``handler`` until ``stop`` is set; return how many changes were delivered.

    ``consumer`` None follows anonymously from ``after``: no position is
    stored and retention does not wait for it. A ``stop`` already set
    delivers one batch, what is there now, and returns. A named consumer's
    lock is held while following (:class:`ConsumerInUse` if another holds it),
    confirmed before each batch, or before each change with ``confirm_each``;
    ``url`` is stored with a consumer it registers. A database
    that goes away is waited for (see the module docstring):
    :class:`DatabaseUnavailable` if told to stop meanwhile.
    """
    if not callable(handler):
        raise InvalidInput(f"handler must be callable with a Change, got {type(handler).__name__}")
    cursor, backoff = _Cursor(store, consumer, after, url), _Backoff()
    log.info("feed_follow_started", consumer=consumer, after=str(after))
    while True:
        try:
            _session(store, cursor, handler, backoff, stop=stop, batch=batch, poll=poll, confirm_each=confirm_each)
            break
        except DatabaseUnavailable as exc:
            if not exc.transient:
                _save_quietly(cursor)  # the database answers, but not this: keep what was delivered
                raise
            wait = backoff.failed(exc)
            log.warning(
                "feed_database_lost", consumer=consumer, position=str(cursor.at), error=exc.reason, retry_in=wait
            )
            if stop.wait(wait):
                raise DatabaseUnavailable(exc.reason, transient=True, stopped=cursor.where()) from exc
    log.info("feed_follow_stopped", consumer=consumer, position=str(cursor.at), delivered=cursor.delivered)
    return cursor.delivered


def _session(
    store: Store,
    cursor: _Cursor,
    handler: Handler,
    backoff: _Backoff,
    *,
    stop: threading.Event,
    batch: int,
    poll: float,
    confirm_each: bool,
) -> None:
    """Follow on one connection until ``stop``; the database going away raises, the position left to store later."""
    claim = cursor.consumer
    with store.feed.reader(claim=claim) as reader:  # listening before the first read: a commit after it wakes the wait
        cursor.register()
        backoff.connected(cursor)
        try:
            with _claimed(reader if claim else None):
                _pages(reader, cursor, handler, stop=stop, batch=batch, poll=poll, confirm_each=confirm_each)
        except DatabaseUnavailable:
            raise  # nothing to store it in: stored once the database is back
        except BaseException:
            _save_quietly(cursor)  # what the handler returned from, before its error propagates
            raise
        cursor.save()


def _pages(
    reader: Reader,
    cursor: _Cursor,
    handler: Handler,
    *,
    stop: threading.Event,
    batch: int,
    poll: float,
    confirm_each: bool,
) -> None:
    while True:
        changes = reader.read(cursor.at, batch)
        if changes and not confirm_each:
            reader.confirm()  # one round trip a batch: a follower that lost its lock delivers none of it
        cursor.deliver(handler, changes, confirm_claim if confirm_each else _held)
        caught_up = len(changes) < batch
        if caught_up or stop.is_set() or cursor.due():
            cursor.save()
        if stop.is_set():
            return
        if caught_up:
            held = not reader.notified or reader.held_back()
            reader.wait(stop, poll if held else IDLE_RECHECK)
            if stop.is_set():
                return


def _held() -> None:
    """Confirm nothing: the batch's lock was confirmed before it (see :func:`_pages`)."""


def _save_quietly(cursor: _Cursor) -> None:
    """Store the position on the way out of an error; the database being away only means more redelivery."""
    try:
        cursor.save()
    except DatabaseUnavailable as exc:
        log.warning("feed_position_not_saved", consumer=cursor.consumer, position=str(cursor.at), error=exc.reason)


def check_batch(value: object, label: str = "batch") -> int:
    """Return ``value`` if it is a batch size or limit (1 to 10000), else raise :class:`InvalidInput`."""
    return validation.count(label, value, low=1, high=10_000)


def prune(store: Store, retention: float, now: datetime) -> int:
    """Delete the changes older than ``retention`` seconds that every consumer has passed; 0 keeps all."""
    if retention == 0:
        return 0
    pruned = store.feed.prune(now - timedelta(seconds=retention))
    log.info("changes_pruned", pruned=pruned, retention=retention)
    return pruned


def query_audit(store: Store, **filters: object) -> list[AuditEntry]:
    """Return the audit rows the filters of :func:`lifecycle.audit.audit_query` admit, oldest first.

    An ``operation`` must be one the log can hold: an operation of the table or an :class:`~lifecycle.audit.Activity`.
    """
    query = audit_query(**filters)
    if query.operation is not None:
        known = {row.name for row in graph.rows()} | {activity.value for activity in Activity}
        if query.operation not in known:
            raise InvalidInput(f"unknown operation {query.operation!r}: expected one of {', '.join(sorted(known))}")
    return store.feed.audit_rows(query)
