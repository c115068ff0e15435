"""Reading instances: ``show``, ``list``, ``history``, ``tasks``, ``migration``, and ``console`` (a VNC URL)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lifecycle.cli.render import emit, history_entry, instance_line, migration_line, progress, safe
from lifecycle.cli.startup import engine_command

if TYPE_CHECKING:
    import argparse

    from lifecycle.cli.args import Commands, Parser
    from lifecycle.engine import Engine

__all__ = ["add_console", "add_reads", "add_tasks_and_migrations"]


def add_console(commands: Commands, common: Parser) -> None:
    """Add ``console``."""
    console = commands.add_parser("console", help="issue a VNC console URL", parents=[common])
    console.add_argument("uuid")
    console.set_defaults(handler=engine_command(_console))


def add_reads(commands: Commands, common: Parser) -> None:
    """Add ``show``, ``list`` and ``history``."""
    show = commands.add_parser("show", help="show an instance", parents=[common])
    show.add_argument("uuid")
    show.set_defaults(handler=engine_command(_show))
    listing = commands.add_parser("list", help="list instances", parents=[common])
    listing.add_argument("--host")
    listing.add_argument("--all", action="store_true", help="include deleted instances")
    listing.set_defaults(handler=engine_command(_list))
    history = commands.add_parser("history", help="an instance's audit log", parents=[common])
    history.add_argument("uuid")
    history.set_defaults(handler=engine_command(_history))


def add_tasks_and_migrations(commands: Commands, common: Parser) -> None:
    """Add ``tasks`` and ``migration``."""
    tasks = commands.add_parser("tasks", help="an instance's tasks and their step logs", parents=[common])
    tasks.add_argument("uuid")
    tasks.set_defaults(handler=engine_command(_tasks))
    migration = commands.add_parser("migration", help="cold migrations and resizes", parents=[common])
    verbs = migration.add_subparsers(dest="migration_command", required=True)
    listing = verbs.add_parser("list", help="list migrations, newest first", parents=[common])
    listing.add_argument("--host", help="only those from or to this host")
    listing.set_defaults(handler=engine_command(_migrations))
    show = verbs.add_parser("show", help="show a migration", parents=[common])
    show.add_argument("id")
    show.set_defaults(handler=engine_command(_migration))


def _show(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    i = engine.get(args.uuid)
    emit(args, to_plain(i) if args.json else None, instance_line(i))  # JSON data only when printed


def _list(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    if args.host is not None:
        engine.hosts.get(args.host)  # an unknown host is a typo to report, not an empty list
    rows = engine.list(args.host, include_deleted=args.all)
    text = "\n".join(instance_line(i) for i in rows) if not args.json else ""
    emit(args, to_plain(rows) if args.json else None, text or "no instances")


def _console(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    access = engine.consoles.get_vnc_console(args.uuid)
    emit(args, to_plain(access), f"{access.url}\n(valid until {access.expires_at.isoformat(timespec='seconds')})")


def _history(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.audit import format_history
    from lifecycle.records import to_plain

    entries = engine.history(args.uuid)
    emit(args, to_plain(entries), format_history(history_entry(e) for e in entries))


def _tasks(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    engine.get(args.uuid)  # an unknown uuid is refused as `show` refuses it, not an empty list
    tasks = engine.tasks(args.uuid)
    data = [{**t.to_dict(internal=True), "steps": to_plain(engine.steps(t.id))} for t in tasks]
    lines = []
    for t in tasks:
        lines.append(safe(f"{t.id} {t.operation} {t.outcome.value} by {t.actor} ({t.request_id})"))
        lines += [
            safe(
                f"    {s.seq}. {s.name} {s.result or 'running'}{progress(s.bytes_done, s.bytes_total)}"
                + (f": {s.detail}" if s.result is None and s.detail else "")  # a queued build: where, behind what
            )
            for s in engine.steps(t.id)
        ]
    emit(args, data, "\n".join(lines))


def _migrations(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    rows = engine.migrations(args.host)
    emit(args, to_plain(rows), "\n".join(migration_line(m) for m in rows) or "no migrations")


def _migration(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    m = engine.migration(args.id)
    emit(args, to_plain(m), migration_line(m))
