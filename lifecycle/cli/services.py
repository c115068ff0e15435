"""The engine's background work, run from the command line: ``daemon``, ``console-proxy``, ``sync --once``, ``recover``.

The daemon and the console proxy run until SIGTERM or SIGINT; their process
wiring lives with them (:func:`lifecycle.daemon.serve`,
:func:`lifecycle.console_proxy.serve`). ``sync --once`` and ``recover`` run
once what the daemon does on a timer.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from lifecycle import validation
from lifecycle.cli.args import listen, number, text
from lifecycle.cli.render import emit, pass_line, safe
from lifecycle.cli.startup import command, engine_command
from lifecycle.errors import InvalidInput

if TYPE_CHECKING:
    import argparse

    from lifecycle.cli.args import Commands, Parser
    from lifecycle.engine import Engine

__all__ = ["add_console_proxy", "add_parsers"]

_RECOVER_HELP = (
    "Take over and finish the running tasks whose owner died. A task is taken only once its owner's"
    " lease has expired (60 s by default; a living owner keeps renewing it). Right after a crash,"
    " recover therefore finds nothing to do until the lease runs out; it then says how many running"
    " tasks are still within their lease and when the first lease ends. --owner NAME --force takes the"
    " live tasks of the engine that used NAME at once: only when you know that engine is dead. Should"
    " it live after all, its workers are fenced (they stop before their next hypervisor call), but a"
    " call already in flight still lands after the takeover."
)
_DAEMON_SETTINGS = (
    ("interval", "sync_interval"),
    ("event_delay", "stopped_event_delay"),
    ("reclaim_instance_interval", "reclaim_instance_interval"),
    ("instance_build_timeout", "instance_build_timeout"),
)
"""The daemon's options that set a setting (they win over the environment and the file): option, setting."""


def add_parsers(commands: Commands, common: Parser) -> None:
    """Add ``recover``, ``sync`` and ``daemon``."""
    recover = commands.add_parser(
        "recover", help="finish tasks whose owner died", description=_RECOVER_HELP, parents=[common]
    )
    recover.add_argument(
        "--owner",
        type=text("--owner"),
        help="recover under the owner name a crashed engine used (with --force: take its live tasks at once)",
    )
    recover.add_argument(
        "--force",
        action="store_true",
        help="with --owner: take that owner's tasks although their lease is live (its workers are fenced)",
    )
    recover.set_defaults(handler=engine_command(_recover, before=_force_names_an_owner))
    sync = commands.add_parser("sync", help="run one power-sync pass", parents=[common])
    sync.add_argument("--once", action="store_true", required=True, help="one pass, then exit (the daemon loops)")
    sync.add_argument("--host", help="only this host (default: every enabled host)")
    sync.set_defaults(handler=engine_command(_sync))
    _add_daemon(commands, common)


def _add_daemon(commands: Commands, common: Parser) -> None:
    daemon = commands.add_parser("daemon", help="periodic sync, events and image cache cleanup", parents=[common])
    daemon.add_argument("--host", action="append", dest="hosts", help="only these hosts (repeatable)")
    daemon.add_argument(
        "--interval",
        type=number("--interval", validation.period),
        help="seconds between sync passes per host (default 600; at least 0.1)",
    )
    daemon.add_argument(
        "--claim-interval",
        type=number("--claim-interval", validation.period),
        default=10.0,
        help="seconds between host claim rounds (at least 0.1)",
    )
    daemon.add_argument(
        "--event-delay",
        type=number("--event-delay", validation.seconds),
        help="seconds a STOPPED event is held (default 15)",
    )
    daemon.add_argument(
        "--metrics-listen",
        type=listen,
        help="serve Prometheus metrics over HTTP at ADDR:PORT (e.g. 127.0.0.1:9464)",
    )
    daemon.add_argument(
        "--reclaim-instance-interval",
        type=number("--reclaim-instance-interval", validation.seconds),
        help="seconds a soft-deleted instance is kept before the daemon deletes it (default 0: off)",
    )
    daemon.add_argument(
        "--instance-build-timeout",
        type=number("--instance-build-timeout", validation.seconds),
        help="seconds a build may run before it is put in error (default 0: off)",
    )
    daemon.set_defaults(handler=command(_daemon), settings_from_options=_DAEMON_SETTINGS)


def add_console_proxy(commands: Commands, common: Parser) -> None:
    """Add ``console-proxy``."""
    proxy = commands.add_parser(
        "console-proxy",
        help="serve the console page and bridge browsers to guests' VNC servers, token-checked",
        parents=[common],
    )
    proxy.add_argument(
        "--listen", type=listen, default=None, help="ADDR:PORT to listen on (default: setting console_proxy_listen)"
    )
    proxy.set_defaults(handler=command(_console_proxy))


def _daemon(args: argparse.Namespace) -> None:
    from lifecycle.daemon import serve

    serve(
        args.db,
        args.settings,
        hosts=args.hosts,
        claim_interval=args.claim_interval,
        metrics_listen=args.metrics_listen,
    )  # until SIGTERM or SIGINT


def _console_proxy(args: argparse.Namespace) -> None:
    from lifecycle.console_proxy import serve

    serve(args.db, args.settings, listen=args.listen)  # until SIGTERM or SIGINT


def _sync(engine: Engine, args: argparse.Namespace) -> int:
    """Print every host's pass, failed ones included; exit 1 when any host's pass failed."""
    import dataclasses

    summaries = engine.hosts.sync(args.host)
    lines = [pass_line(s) for s in summaries]
    emit(args, [dataclasses.asdict(s) for s in summaries], "\n".join(lines) or "no hosts")
    return 1 if any(s.error is not None for s in summaries) else 0


def _force_names_an_owner(args: argparse.Namespace) -> None:
    if args.force and args.owner is None:
        raise InvalidInput("recover --force needs --owner NAME: it takes only that owner's live tasks")


def _recover(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.recovery import vars_of

    # Under a name of its own: the tasks it takes are then never taken again by a second `recover --force`
    # of the dead engine's name while this one still runs them.
    results = engine.recover(force=args.force, owner=args.owner)
    waiting = engine.waiting_for_lease()
    lines = [
        safe(f"{r.task_id} {r.operation} on {r.instance_uuid} at {r.task_state}: {r.plan} -> {r.outcome}")
        for r in results
    ] or ["no task to recover"]
    if waiting:
        first = min(t.lease_expires_at for t in waiting)
        left = max(0.0, (first - engine.clock.now()).total_seconds())
        note = (
            f"{len(waiting)} running task(s) still within their owner's lease, the first until"
            f" {first.isoformat(timespec='seconds')} (in {left:.0f} s):"
            " recover takes a task once its lease has expired, or at once with --owner NAME --force when"
            " the engine that used NAME is known to be dead"
        )
        if args.json:
            print(note, file=sys.stderr)  # stdout stays the JSON list of recovered tasks
        else:
            lines.append(note)
    emit(args, [vars_of(r) for r in results], "\n".join(lines))
