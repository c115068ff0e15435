"""Instance operations on the command line: one command per operation of the table, ``create`` included.

Every operation of :data:`lifecycle.graph.OPERATIONS` is a command named
after it (``force_stop`` as ``force-stop``) that takes the instance's uuid
and the task options (``--request-id``, ``--idempotency-key``, ``--no-wait``,
``--force``), runs through :meth:`Engine.run` and prints the task's outcome
with the instance. The operations that take more, or that go through an
engine method of their own, have a row in :data:`_OWN`, keyed by
:class:`~lifecycle.graph.Op`: this module's only per-operation wiring. What
the table says is read from it: the commands and their order, and the
data-loss note of an operation whose row carries it (evacuate).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from lifecycle import graph, validation
from lifecycle.cli import render
from lifecycle.cli.args import number, pairs, text
from lifecycle.cli.startup import engine_command
from lifecycle.errors import InvalidInput
from lifecycle.graph import DATA_LOSS, Op

if TYPE_CHECKING:
    import argparse
    from typing import TypeAlias

    from lifecycle.cli.args import Commands, Parser
    from lifecycle.engine import Engine
    from lifecycle.records import Task

    Option: TypeAlias = tuple[tuple[str, ...], dict[str, Any]]
    """One ``add_argument`` call: its name or flags, and its keywords."""
    Call: TypeAlias = Callable[[Engine, argparse.Namespace, dict[str, Any]], Task]
    """Start the operation, given the parsed arguments and the task options as the engine's keywords."""

__all__ = ["add_evacuate", "add_parsers"]


class Command(NamedTuple):
    """How one operation is offered on the command line (a named tuple: a dataclass would cost ``--help``)."""

    help: str
    options: tuple[Option, ...]
    """The command's own arguments, after the task options: the instance's uuid (create: its name) first."""
    call: Call
    note: str = ""
    """A line printed after the result, in text output."""


def _option(*flags: str, **keywords: Any) -> Option:
    return flags, keywords


def _create(engine: Engine, args: argparse.Namespace, kw: dict[str, Any]) -> Task:
    import dataclasses

    from lifecycle.records import Flavor

    specs = tuple(sorted(pairs(args.extra_spec, "--extra-spec").items()))
    flavor = dataclasses.replace(Flavor.parse(args.flavor), extra_specs=specs)
    kw.pop("idempotency_key")
    if kw.pop("override_lock"):
        raise InvalidInput("create does not take --force: a new instance has no lock to override")
    if args.idempotency_key:
        raise InvalidInput("create does not take --idempotency-key; pass --uuid to make it repeat-safe")
    kw |= {"project_id": args.project, "user_id": args.user, "metadata": pairs(args.meta, "--meta") or None}
    return engine.create(
        args.name, host=args.host, availability_zone=args.zone, flavor=flavor, image=args.image, uuid=args.uuid, **kw
    )


def _resize(engine: Engine, args: argparse.Namespace, kw: dict[str, Any]) -> Task:
    from lifecycle.records import Flavor

    return engine.resize(args.uuid, Flavor.parse(args.flavor), **kw)


_UUID = _option("uuid")
_FLAVOR = _option("--flavor", required=True, help="vcpus=N,ram=MiB,disk=GiB")

_OWN: dict[str, Command | None] = {
    Op.CREATE: Command(
        "build an instance",
        (
            _option("name"),
            _option("--host", help="build here (default: let the scheduler choose)"),
            _option("--zone", help="availability zone for the scheduler"),
            _FLAVOR,
            _option(
                "--extra-spec", action="append", default=[], metavar="KEY=VALUE", help="e.g. capabilities:ssd=true"
            ),
            _option("--image", required=True),
            _option("--uuid"),
            _option("--project", help="the project the instance is for (its project_id)"),
            _option("--user", help="the user the instance is for (its user_id)"),
            _option("--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata, repeatable"),
        ),
        _create,
    ),
    Op.REBOOT_HARD: None,  # not a command: reboot --hard
    Op.DELETE: Command(  # a soft delete while reclaim_instance_interval is set
        "delete an instance", (_UUID,), lambda engine, args, kw: engine.delete(args.uuid, **kw)
    ),
    Op.STOP: Command(
        "power an instance off",
        (
            _UUID,
            _option(
                "--timeout",
                type=number("--timeout", validation.seconds),
                help="seconds for a clean shutdown before a hard stop",
            ),
        ),
        lambda engine, args, kw: engine.stop(args.uuid, timeout=args.timeout, **kw),
    ),
    Op.REBOOT: Command(
        "reboot an instance",
        (_UUID, _option("--hard", action="store_true")),
        lambda engine, args, kw: engine.reboot(args.uuid, hard=args.hard, **kw),
    ),
    Op.RESIZE: Command("move to a host with room for a new flavor", (_UUID, _FLAVOR), _resize),
    Op.MIGRATE: Command(
        "cold-migrate to another host",
        (_UUID, _option("--host", help="destination (default: let the scheduler choose)")),
        lambda engine, args, kw: engine.migrate(args.uuid, host=args.host, **kw),
    ),
    Op.UNSHELVE: Command(
        "bring a shelved instance back on a host",
        (_UUID, _option("--host", help="for an offloaded instance: where (default: let the scheduler choose)")),
        lambda engine, args, kw: engine.unshelve(args.uuid, host=args.host, **kw),
    ),
    Op.REBUILD: Command(
        "rebuild an instance on a fresh disk",
        (_UUID, _option("--image")),
        lambda engine, args, kw: engine.rebuild(args.uuid, image=args.image, **kw),
    ),
    Op.EVACUATE: Command(
        "rebuild an instance of a down, fenced host elsewhere",
        (_UUID, _option("--host", type=text("--host"), help="destination (default: the scheduler picks)")),
        lambda engine, args, kw: engine.evacuate(args.uuid, host=args.host, **kw),
    ),
}
"""The operations offered otherwise than as ``COMMAND UUID`` through :meth:`Engine.run`; None: not a command."""

_APART = (Op.CREATE, Op.EVACUATE)
"""Added apart from the others, where ``lifecycle --help`` has always listed them."""


def _command(operation: str) -> Command | None:
    """Return how ``operation`` is offered: its row in :data:`_OWN`, else a uuid and :meth:`Engine.run`.

    An operation whose table row says its guest's disk is lost (:data:`~lifecycle.graph.DATA_LOSS`)
    says so in its help and after its result.
    """
    command = (
        _OWN[operation]
        if operation in _OWN
        else Command(
            f"{operation.replace('_', '-')} an instance",
            (_UUID,),
            lambda engine, args, kw: engine.run(operation, args.uuid, **kw),
        )
    )
    if command is not None and DATA_LOSS in graph.operation(operation).note:
        return command._replace(help=f"{command.help} ({DATA_LOSS})", note=f"note: {DATA_LOSS}")
    return command


def _add(commands: Commands, task: Parser, operation: str) -> None:
    command = _command(operation)
    if command is None:
        return
    parser = commands.add_parser(operation.replace("_", "-"), help=command.help, parents=[task])
    for flags, keywords in command.options:
        parser.add_argument(*flags, **keywords)
    parser.set_defaults(handler=engine_command(functools.partial(_perform, command)))


def add_parsers(commands: Commands, task: Parser) -> None:
    """Add ``create``, then the operations taking only a uuid in the table's order, then those with options."""
    uuid_only = [op.name for op in graph.OPERATIONS if (c := _command(op.name)) is not None and c.options == (_UUID,)]
    with_options = [name for name in _OWN if name not in uuid_only and name not in _APART]
    for operation in (Op.CREATE, *uuid_only, *with_options):
        _add(commands, task, operation)


def add_evacuate(commands: Commands, task: Parser) -> None:
    """Add ``evacuate``, which ``lifecycle --help`` lists beside the host commands."""
    _add(commands, task, Op.EVACUATE)


def _perform(command: Command, engine: Engine, args: argparse.Namespace) -> None:
    kw: dict[str, Any] = {
        "request_id": args.request_id,
        "idempotency_key": args.idempotency_key,
        "wait": not args.no_wait,
        "override_lock": args.force,
    }
    task = command.call(engine, args, kw)
    render.task_result(args, task, engine.get(task.instance_uuid))
    if command.note and not args.json:
        print(command.note)
