"""``engine.feed``: the change feed, its consumers and webhooks, its retention, and audit queries."""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable
from datetime import datetime

import lifecycle.feed as feed
import lifecycle.webhooks as webhooks
from lifecycle import validation
from lifecycle.audit import AuditEntry
from lifecycle.context import Services
from lifecycle.errors import InvalidInput
from lifecycle.records import Cause
from lifecycle.states import VmState

__all__ = ["Feed"]


class Feed:
    """The change feed and audit log of one engine's database (``engine.feed``)."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def changes(self, after: feed.Position | str | None = None, limit: int = 100) -> builtins.list[feed.Change]:
        """Return up to ``limit`` (1 to 10000) committed changes after ``after``, in feed order.

        ``after`` is a position or its ``tx:id`` text (None: the start; ``"end"``: the newest change
        readable now). Positions grow in commit order: paging with the last change's position never
        passes over a change, not even one that a transaction begun earlier commits later.
        """
        store = self._services.store
        return store.feed.read(feed.resolve(store, after), feed.check_batch(limit, "limit"))

    def follow(
        self,
        consumer: str | None,
        handler: Callable[[feed.Change], object],
        *,
        stop: threading.Event | None = None,
        batch: int = 100,
        after: feed.Position | str | None = None,
    ) -> int:
        """Deliver the change feed to ``handler``, change by change, until ``stop`` is set; return how many.

        At least once and in order (see :mod:`lifecycle.feed`): a named ``consumer``'s position is
        stored only once the handler returned from the changes up to it, so a consumer killed
        mid-stream resumes where it stopped (a few changes may come twice); its first run registers
        it at ``after`` (default: the start), later runs ignore ``after``. ``consumer`` None follows
        from ``after`` and stores nothing. A ``stop`` already set delivers one batch (up to
        ``batch``, 1 to 10000) and returns. An exception from the handler stops the follow; the
        position of the changes before it is stored first. A database that goes away is waited for
        (:class:`~lifecycle.errors.DatabaseUnavailable` if ``stop`` is set meanwhile). Names starting with
        ``webhook:`` are the webhook senders' (:class:`InvalidInput`). A named consumer has one
        follower at a time, in any process: a second raises :class:`~lifecycle.errors.ConsumerInUse`
        (naming the holder when the database can tell) before anything is delivered.
        """
        store = self._services.store
        name = None if consumer is None else webhooks.check_consumer(validation.name("consumer", consumer))
        if stop is not None and not isinstance(stop, threading.Event):
            raise InvalidInput(f"stop must be a threading.Event, got {type(stop).__name__}")
        if not callable(handler):
            raise InvalidInput(f"handler must be callable, got {type(handler).__name__}")
        return feed.follow(
            store,
            name,
            handler,
            stop=stop if stop is not None else threading.Event(),
            batch=feed.check_batch(batch),
            poll=self._services.settings.feed_poll_interval,
            after=feed.resolve(store, after),
        )

    def consumers(self) -> builtins.list[feed.Consumer]:
        """Return the registered feed consumers and their positions, by name."""
        return self._services.store.consumers.list()

    def webhook_urls(self) -> dict[str, str]:
        """Return the URL each webhook sender's consumer posts to, by consumer name (never a secret)."""
        return self._services.store.consumers.urls()

    def forget_consumer(self, name: str) -> None:
        """Unregister a feed consumer: retention no longer waits for it (:class:`InvalidInput` if unknown)."""
        store = self._services.store
        if not store.consumers.forget(validation.name("consumer", name)):
            known = ", ".join(c.name for c in store.consumers.list()) or "none"
            raise InvalidInput(f"no feed consumer named {name!r} (consumers: {known})")

    def prune(self, older_than: float | None = None) -> int:
        """Delete the changes every consumer has passed that are older than the retention; return how many.

        The retention is ``older_than`` seconds, by default the ``change_retention`` setting; 0 keeps
        every change. The changes are the audit log: a pruned change is gone from ``history`` too.
        """
        retention = self._services.settings.change_retention if older_than is None else older_than
        return feed.prune(
            self._services.store, validation.seconds("change retention", retention), self._services.clock.now()
        )

    def deliver_webhook(
        self,
        url: str,
        secret: bytes,
        *,
        stop: threading.Event,
        nova: bool = False,
        previous_secrets: tuple[bytes, ...] = (),
    ) -> int:
        """Post each change to ``url`` until ``stop`` is set; return how many were delivered.

        Signed with ``secret`` (and each of ``previous_secrets``, while receivers move to it), retried
        with backoff, at the URL's own feed consumer position (see :mod:`lifecycle.webhooks`); a first
        run starts at the newest change. ``nova`` posts Nova's ``instance.update`` notifications. The
        URL and secrets are checked before anything is registered (:class:`InvalidInput`); a second
        sender to one URL is refused (:class:`~lifecycle.errors.ConsumerInUse`).
        """
        if not isinstance(stop, threading.Event):
            raise InvalidInput(f"stop must be a threading.Event, got {type(stop).__name__}")
        hook = webhooks.Webhook(url, secret, nova=nova, previous_secrets=previous_secrets)
        return webhooks.deliver(self._services, hook, stop=stop)

    def audit(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        request_id: str | None = None,
        host: str | None = None,
        operation: str | None = None,
        cause: Cause | str | None = None,
        vm_state: VmState | str | None = None,
        limit: int = 1000,
    ) -> builtins.list[AuditEntry]:
        """Return the audit rows of every instance that all given filters admit, oldest first, at most ``limit``.

        ``since`` (inclusive) and ``until`` (exclusive) are timezone-aware; ``host`` is where the change
        happened; ``vm_state`` selects changes *into* that state ("which instances went to error").
        Each filter alone reads one index range: only the rows it returns.
        """
        return feed.query_audit(
            self._services.store,
            since=since,
            until=until,
            request_id=request_id,
            host=host,
            operation=operation,
            cause=cause,
            vm_state=vm_state,
            limit=limit,
        )
