"""The change feed and the audit log across instances: ``changes`` (its followers, relays and admin) and ``audit``.

``changes --follow`` and ``changes webhook`` are relays: they run until
SIGINT or SIGTERM and wait for a database that is down, at start as while
they run.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from lifecycle import validation
from lifecycle.cli.args import number, one_to, position, text, when
from lifecycle.cli.render import emit, safe
from lifecycle.cli.startup import engine_command
from lifecycle.errors import InvalidInput

if TYPE_CHECKING:
    import argparse
    import threading

    from lifecycle.cli.args import Commands, Parser
    from lifecycle.engine import Engine
    from lifecycle.feed import Change

__all__ = ["add_parsers"]

_SECRET = "LIFECYCLE_WEBHOOK_SECRET"
_PREVIOUS_SECRET = "LIFECYCLE_WEBHOOK_SECRET_PREVIOUS"
_FOLLOWER_FLAGS = ("after", "consumer", "limit", "format")
"""The options of ``changes`` itself, which its subcommands refuse (with ``--follow``)."""


def add_parsers(commands: Commands, common: Parser) -> None:
    """Add ``changes`` (the feed; its prune, consumers, forget and webhook) and ``audit``."""
    changes = commands.add_parser(
        "changes", help="the change feed: every committed state change, in commit order", parents=[common]
    )
    changes.add_argument(
        "--after", type=position, help="a position TX:ID as printed (default: the start; end: only changes to come)"
    )
    changes.add_argument(
        "--follow",
        action="store_true",
        help="keep printing changes as they commit, until SIGINT or SIGTERM (a database restart is waited for)",
    )
    changes.add_argument(
        "--consumer",
        type=text("--consumer"),
        help="as this named consumer: resume at its stored position, store it after printing (first run: --after);"
        " names starting with webhook: are the webhook senders'",
    )
    changes.add_argument("--limit", type=one_to("--limit", 10_000), help="changes per read, 1 to 10000 (default 100)")
    changes.add_argument(
        "--format", choices=("plain", "json", "nova"), help="nova: Nova's instance.update notifications (JSON lines)"
    )
    changes.set_defaults(handler=engine_command(_changes, before=_await_follower))
    _add_admin_parsers(
        changes.add_subparsers(dest="changes_command", metavar="{prune,consumers,forget,webhook}"), common
    )
    _add_audit_parser(commands, common)


def _add_admin_parsers(admin: Commands, common: Parser) -> None:
    prune = admin.add_parser(
        "prune", help="delete changes older than the retention that every consumer has passed", parents=[common]
    )
    prune.add_argument(
        "--older-than",
        type=number("--older-than", validation.seconds),
        help="seconds (default: the change_retention setting; 0 keeps every change)",
    )
    prune.set_defaults(handler=engine_command(_admin(_prune)))
    admin.add_parser(
        "consumers", help="the registered consumers, their positions, and each webhook's URL", parents=[common]
    ).set_defaults(handler=engine_command(_admin(_consumers)))
    forget = admin.add_parser("forget", help="unregister a consumer: retention stops waiting for it", parents=[common])
    forget.add_argument("name", type=text("consumer"))
    forget.set_defaults(handler=engine_command(_admin(_forget)))
    hook = admin.add_parser(
        "webhook",
        help="post each change to URL until SIGINT or SIGTERM, signed with $LIFECYCLE_WEBHOOK_SECRET and, while"
        " receivers move to a new secret, also with the old one in $LIFECYCLE_WEBHOOK_SECRET_PREVIOUS"
        " (one sha256= signature per secret); one sender per URL",
        parents=[common],
    )
    hook.add_argument("url", help="http:// or https://, without user or password (checked before anything is stored)")
    hook.add_argument("--nova", action="store_true", help="post Nova's instance.update notifications")
    hook.set_defaults(handler=engine_command(_admin(_webhook), before=_await_webhook))


def _add_audit_parser(commands: Commands, common: Parser) -> None:
    audit = commands.add_parser(
        "audit", help="audit rows across instances, oldest first (each filter reads one index range)", parents=[common]
    )
    for flag, what in (("--since", "from this time"), ("--until", "before this time")):
        audit.add_argument(flag, type=when(flag), help=f"{what}: ISO 8601 (UTC unless zoned) or an age: 90m, 12h, 7d")
    audit.add_argument("--request-id", type=text("--request-id", 64), help="the changes of one request")
    audit.add_argument("--host", type=text("--host"), help="changes on this host")
    audit.add_argument("--operation", type=text("--operation", 64), help="e.g. stop, delete, sync")
    audit.add_argument("--cause", help="api, sync, event, recovery, timer, ...")
    audit.add_argument("--vm-state", help="changes into this vm_state, e.g. error")
    audit.add_argument(
        "--limit", type=one_to("--limit", 100_000), default=1000, help="at most this many (default 1000)"
    )
    audit.set_defaults(handler=engine_command(_audit))


def _changes(engine: Engine, args: argparse.Namespace) -> None:
    """Print the feed: one line (or one JSON object) per change; with --consumer or --follow as a follower."""
    from lifecycle.feed import change_data, change_line, nova_notification

    fmt = args.format or ("json" if args.json else "plain")
    renders: dict[str, Callable[[Change], str]] = {
        "plain": lambda c: safe(change_line(c)),
        "json": lambda c: json.dumps(change_data(c), sort_keys=True, allow_nan=False),
        "nova": lambda c: json.dumps(nova_notification(c), sort_keys=True, allow_nan=False),
    }
    render = renders[fmt]
    limit = 100 if args.limit is None else args.limit
    if not args.follow and args.consumer is None:
        batch = engine.feed.changes(args.after, limit)
        if batch:
            print("\n".join(render(c) for c in batch))
        elif fmt == "plain":
            print("no changes")
        return
    import threading

    stop = threading.Event()
    if not args.follow:
        stop.set()  # one batch, its position stored
    restore = _stop_on_signals(stop)
    try:
        engine.feed.follow(
            args.consumer, lambda c: print(render(c), flush=True), stop=stop, batch=limit, after=args.after
        )
    finally:
        restore()


def _await_follower(args: argparse.Namespace) -> None:
    """Before ``changes --follow`` opens the engine: wait for its database (see :func:`_await_database`)."""
    if args.follow:
        _await_database(args, args.consumer)


def _await_webhook(args: argparse.Namespace) -> None:
    """Before ``changes webhook`` opens the engine: check its URL and secret, then wait for its database."""
    from lifecycle.webhooks import check_url, consumer_name

    check_url(args.url)
    if not _secret(_SECRET):
        raise InvalidInput(f"changes webhook signs every request: set {_SECRET} (16 bytes or more)")
    _await_database(args, consumer_name(args.url))


def _await_database(args: argparse.Namespace, consumer: str | None) -> None:
    """Wait for a database that is down when a relay starts, as the relay would once running; stop on a signal.

    Its input is checked first: bad input exits 2 at once, whatever the database's state.
    """
    import threading

    from lifecycle.feed import wait_for_database

    stop = threading.Event()
    restore = _stop_on_signals(stop)
    try:
        wait_for_database(args.db, consumer, stop=stop)
    finally:
        restore()


def _stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """Make SIGTERM and SIGINT set ``stop``; return what puts the previous handlers back."""
    import signal  # here: only the relays and followers wait for a signal

    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _admin(run: Callable[[Engine, argparse.Namespace], None]) -> Callable[[Engine, argparse.Namespace], None]:
    """Return ``run`` for a subcommand of ``changes``, refusing the options of ``changes`` itself first."""
    return functools.partial(_refusing_follower_flags, run)


def _refusing_follower_flags(
    run: Callable[[Engine, argparse.Namespace], None], engine: Engine, args: argparse.Namespace
) -> None:
    given = [flag for flag in _FOLLOWER_FLAGS if getattr(args, flag) is not None]
    if given or args.follow:
        flags = ", ".join(f"--{flag}" for flag in [*given, *(["follow"] if args.follow else [])])
        raise InvalidInput(f"changes {args.changes_command} takes none of {flags}")
    run(engine, args)


def _prune(engine: Engine, args: argparse.Namespace) -> None:
    pruned = engine.feed.prune(args.older_than)
    off = args.older_than is None and engine.settings.change_retention == 0
    note = " (change_retention is 0: every change is kept)" if off else ""
    emit(args, {"pruned": pruned}, f"pruned {pruned} changes{note}")


def _forget(engine: Engine, args: argparse.Namespace) -> None:
    engine.feed.forget_consumer(args.name)
    emit(args, {"forgotten": args.name}, f"consumer {safe(args.name)} forgotten")


def _consumers(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    rows, urls = engine.feed.consumers(), engine.feed.webhook_urls()
    data = [{**to_plain(c), "position": str(c.position), "url": urls.get(c.name)} for c in rows]
    lines = [
        safe(f"{c.name}  {c.position}  updated {c.updated_at.isoformat(timespec='seconds')}")
        + (f"  {safe(urls[c.name])}" if c.name in urls else "")
        for c in rows
    ]
    emit(args, data, "\n".join(lines) or "no consumers")


def _secret(variable: str) -> bytes:
    """Return the secret in ``variable`` as UTF-8 bytes (empty when unset); a value that is not UTF-8 is refused."""
    raw = os.fsencode(os.environ.get(variable, ""))  # the bytes as the environment holds them
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # receivers would each read such a key in their own way
        raise InvalidInput(f"{variable} must be UTF-8 text: its byte {exc.start} is not UTF-8") from None
    return raw


def _webhook(engine: Engine, args: argparse.Namespace) -> None:
    import threading

    from lifecycle.webhooks import check_url

    check_url(args.url)  # the argument first, before what the environment holds
    secret, previous = _secret(_SECRET), _secret(_PREVIOUS_SECRET)
    if not secret:
        raise InvalidInput(f"changes webhook signs every request: set {_SECRET} (16 bytes or more)")
    stop = threading.Event()
    restore = _stop_on_signals(stop)
    try:
        delivered = engine.feed.deliver_webhook(
            args.url, secret, stop=stop, nova=args.nova, previous_secrets=(previous,) if previous else ()
        )
    finally:
        restore()
    emit(args, {"delivered": delivered}, f"delivered {delivered} changes to {safe(args.url)}")


def _audit(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.feed import as_change, change_line
    from lifecycle.records import to_plain

    entries = engine.feed.audit(
        since=args.since,
        until=args.until,
        request_id=args.request_id,
        host=args.host,
        operation=args.operation,
        cause=args.cause,
        vm_state=args.vm_state,
        limit=args.limit,
    )
    data = [{**to_plain(e), "position": str(e.position)} for e in entries]
    emit(args, data, "\n".join(safe(change_line(as_change(e))) for e in entries) or "no audit rows")
