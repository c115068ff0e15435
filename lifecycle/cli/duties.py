"""Operator duties: ``lock``, ``unlock``, ``reset-state``, and one run of what the daemon does on a timer.

``reclaim``, ``build-timeout`` and ``offload-shelved`` act once on what is
older than ``--older-than`` seconds; the daemon runs the same duties with the
settings' ages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from lifecycle import validation
from lifecycle.cli.args import actor, number, text
from lifecycle.cli.render import emit, instance_line, safe
from lifecycle.cli.startup import engine_command
from lifecycle.states import VmState

if TYPE_CHECKING:
    import argparse

    from lifecycle.cli.args import Commands, Parser
    from lifecycle.duties import DutyResult
    from lifecycle.engine import Engine
    from lifecycle.records import Instance

__all__ = ["add_parsers"]

_TIMED: tuple[tuple[str, str, str, Callable[[Engine, float], list[DutyResult]]], ...] = (
    (
        "reclaim",
        "delete for good what was soft-deleted longer ago than",
        "reclaim_instance_interval",
        lambda engine, age: engine.duties.reclaim_queued_deletes(age),
    ),
    (
        "build-timeout",
        "put in error the builds running longer than",
        "instance_build_timeout",
        lambda engine, age: engine.duties.check_build_timeouts(age),
    ),
    (
        "offload-shelved",
        "offload what was shelved on its host longer ago than",
        "shelved_offload_time",
        lambda engine, age: engine.duties.offload_shelved_instances(age),
    ),
)
"""The one-shot duties: command, what it does, the setting the daemon uses instead, and the run."""


def add_parsers(commands: Commands, common: Parser) -> None:
    """Add ``lock``, ``unlock``, ``reset-state``, ``reclaim``, ``build-timeout`` and ``offload-shelved``."""
    lock = commands.add_parser("lock", help="lock an instance: operations but reads are refused", parents=[common])
    lock.add_argument("uuid")
    lock.add_argument("--reason", required=True, type=text("--reason", 1000))
    lock.add_argument("--actor", **actor("audited"))
    lock.set_defaults(handler=engine_command(_lock))
    unlock = commands.add_parser("unlock", help="unlock an instance (its locker, or --force)", parents=[common])
    unlock.add_argument("uuid")
    unlock.add_argument("--actor", **actor("audited"))
    unlock.add_argument("--force", action="store_true", help="unlock another's lock (an admin's override)")
    unlock.set_defaults(handler=engine_command(_unlock))
    reset = commands.add_parser(
        "reset-state", help="admin: end a stuck task and set the vm_state (error or active)", parents=[common]
    )
    reset.add_argument("uuid")
    reset.add_argument("--state", choices=[VmState.ERROR.value, VmState.ACTIVE.value], default="error")
    reset.add_argument("--reason", required=True, type=text("--reason", 1000))
    reset.add_argument("--actor", **actor("audited"))
    reset.set_defaults(handler=engine_command(_reset_state))
    for name, what, setting, run in _TIMED:
        duty = commands.add_parser(name, help=f"once: {what} --older-than seconds", parents=[common])
        duty.add_argument(
            "--older-than",
            required=True,
            type=number("--older-than", validation.seconds),
            help=f"seconds (the daemon uses the {setting} setting)",
        )
        duty.set_defaults(handler=engine_command(functools.partial(_timed, run)))


def _timed(run: Callable[[Engine, float], list[DutyResult]], engine: Engine, args: argparse.Namespace) -> None:
    import dataclasses

    results = run(engine, args.older_than)
    lines = [f"{r.uuid} {r.outcome}" + (f" ({safe(r.detail)})" if r.detail else "") for r in results]
    emit(args, [dataclasses.asdict(r) for r in results], "\n".join(lines) or "nothing to do")


def _print(args: argparse.Namespace, i: Instance) -> None:
    from lifecycle.records import to_plain

    lock = f"  locked by {safe(i.locked_by)}: {safe(i.locked_reason)}" if i.locked_by else ""
    emit(args, to_plain(i), instance_line(i) + lock)


def _lock(engine: Engine, args: argparse.Namespace) -> None:
    _print(args, engine.lock(args.uuid, reason=args.reason, actor=args.actor))


def _unlock(engine: Engine, args: argparse.Namespace) -> None:
    _print(args, engine.unlock(args.uuid, actor=args.actor, override_lock=args.force))


def _reset_state(engine: Engine, args: argparse.Namespace) -> None:
    _print(args, engine.reset_state(args.uuid, state=VmState(args.state), reason=args.reason, actor=args.actor))
