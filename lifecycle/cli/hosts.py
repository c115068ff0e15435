"""``lifecycle host ...``: register, list, enable and remove hypervisor hosts; fence, unfence and evacuate them."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from lifecycle.cli.args import actor, count, pairs, text
from lifecycle.cli.render import emit, host_line, safe
from lifecycle.cli.startup import engine_command
from lifecycle.graph import DATA_LOSS, Op

if TYPE_CHECKING:
    import argparse

    from lifecycle.cli.args import Commands, Parser
    from lifecycle.engine import Engine
    from lifecycle.records import Host

__all__ = ["add_parsers"]

_BEAT = "record a host as up; the copies of instances evacuated away from it are destroyed first (exit 1 if not)"


def add_parsers(commands: Commands, common: Parser) -> None:
    """Add ``host`` and its commands."""
    host = commands.add_parser("host", help="hypervisor hosts", parents=[common]).add_subparsers(
        dest="host_command", required=True
    )
    add = host.add_parser("add", help="register a host", parents=[common])
    add.add_argument("name")
    add.add_argument("--uri", required=True, help="driver URI, e.g. fake:///var/lib/lifecycle/h1.json")
    add.add_argument("--instances-path", default="/var/lib/lifecycle/instances")
    add.add_argument("--zone", default="nova", help="availability zone")
    add.add_argument("--vcpus", type=count("--vcpus"), help="physical vCPUs (omit: resources not tracked)")
    add.add_argument("--memory-mb", type=count("--memory-mb"))
    add.add_argument("--disk-gb", type=count("--disk-gb"))
    add.add_argument("--capability", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    add.add_argument("--hypervisor-type", default="qemu")
    add.add_argument("--architecture", default="x86_64")
    add.add_argument(
        "--console-address", help="the host's management address: its guests' VNC listens there (remote hosts)"
    )
    add.set_defaults(handler=engine_command(_add))
    host.add_parser("list", help="list hosts", parents=[common]).set_defaults(handler=engine_command(_list))
    for verb, run in (("show", _show), ("enable", _enable), ("disable", _disable), ("heartbeat", _heartbeat)):
        one = host.add_parser(verb, help=_BEAT if verb == "heartbeat" else f"{verb} a host", parents=[common])
        one.add_argument("name")
        one.set_defaults(handler=engine_command(run))
    remove = host.add_parser("remove", help="forget a host (refused while instances live there)", parents=[common])
    remove.add_argument("name")
    remove.add_argument(
        "--force", action="store_true", help="remove anyway: its idle instances go to error with no host"
    )
    remove.set_defaults(handler=engine_command(_remove))
    _add_failure_parsers(host, common)


def _add_failure_parsers(host: Commands, common: Parser) -> None:
    """Add ``host fence``, ``host unfence`` and ``host evacuate``."""
    fence = host.add_parser(
        "fence", help="declare a host dead: never scheduled to, evacuable once down", parents=[common]
    )
    fence.add_argument("name")
    fence.add_argument("--reason", required=True, type=text("--reason", 1000))
    fence.add_argument("--actor", **actor("recorded"))
    fence.set_defaults(handler=engine_command(_fence))
    unfence = host.add_parser("unfence", help="lift a host's fence", parents=[common])
    unfence.add_argument("name")
    unfence.add_argument("--actor", **actor("recorded"))
    unfence.set_defaults(handler=engine_command(_unfence))
    evacuate = host.add_parser(
        Op.EVACUATE.value, help=f"evacuate every instance of a down, fenced host ({DATA_LOSS})", parents=[common]
    )
    evacuate.add_argument("name")
    evacuate.add_argument("--actor", **actor("recorded"))
    evacuate.set_defaults(handler=engine_command(_evacuate))


def _print(args: argparse.Namespace, h: Host) -> None:
    from lifecycle.records import to_plain

    emit(args, to_plain(h), host_line(h))


def _add(engine: Engine, args: argparse.Namespace) -> None:
    h = engine.hosts.add(
        args.name,
        args.uri,
        args.instances_path,
        availability_zone=args.zone,
        vcpus=args.vcpus,
        memory_mb=args.memory_mb,
        disk_gb=args.disk_gb,
        capabilities=pairs(args.capability, "--capability"),
        hypervisor_type=args.hypervisor_type,
        architecture=args.architecture,
        console_address=args.console_address,
    )
    _print(args, h)


def _list(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    hosts = engine.hosts.list()
    emit(args, to_plain(hosts), "\n".join(host_line(h) for h in hosts) or "no hosts")


def _show(engine: Engine, args: argparse.Namespace) -> None:
    _print(args, engine.hosts.get(args.name))


def _set_enabled(enabled: bool, engine: Engine, args: argparse.Namespace) -> None:
    _print(args, engine.hosts.set_enabled(args.name, enabled))


_enable = functools.partial(_set_enabled, True)
_disable = functools.partial(_set_enabled, False)


def _heartbeat(engine: Engine, args: argparse.Namespace) -> None:
    _print(args, engine.hosts.heartbeat(args.name))


def _remove(engine: Engine, args: argparse.Namespace) -> None:
    orphaned = engine.hosts.remove(args.name, force=args.force)
    shown = f"host {safe(args.name)} removed" + "".join(f"\n{u}: error, no host" for u in orphaned)
    emit(args, {"removed": args.name, "orphaned": orphaned}, shown)


def _fence(engine: Engine, args: argparse.Namespace) -> None:
    _print(args, engine.hosts.fence(args.name, reason=args.reason, actor=args.actor))


def _unfence(engine: Engine, args: argparse.Namespace) -> None:
    _print(args, engine.hosts.unfence(args.name, actor=args.actor))


def _evacuate(engine: Engine, args: argparse.Namespace) -> None:
    import dataclasses

    results = engine.hosts.evacuate(args.name, actor=args.actor)
    lines = [
        f"{r.uuid} {r.outcome} now on {safe(r.host or '-')}" + (f" ({safe(r.detail)})" if r.detail else "")
        for r in results
    ]
    note = DATA_LOSS
    shown = "\n".join([*lines, f"note: {note}"]) if lines else f"no instances on {safe(args.name)}"
    emit(args, {"host": args.name, "note": note, "instances": [dataclasses.asdict(r) for r in results]}, shown)
