"""The ``lifecycle`` command line; the only place that configures logging.

Every command accepts ``--json`` and then prints machine-readable output with
the library's field names. Errors print one line naming what was wrong and
what is allowed, and exit non-zero: 2 for input refused before anything
changed, 1 for an operation that ran and failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import structlog

from lifecycle import graph
from lifecycle.audit import format_history
from lifecycle.config import Settings
from lifecycle.daemon import Daemon
from lifecycle.engine import Engine
from lifecycle.errors import InvalidInput, InvalidState, LifecycleError, TaskFailed
from lifecycle.operations import STEPS
from lifecycle.records import Flavor, Host, Instance, Task, to_plain
from lifecycle.recovery import vars_of
from lifecycle.store import DEFAULT_DB_URL, head_revision, upgrade
from lifecycle.store.db import connect, current_revision, downgrade

__all__ = ["configure_logging", "main"]

# Commands with their own options; every other implemented operation takes only a uuid.
_OWN_OPTIONS = frozenset({"create", "stop", "reboot", "reboot_hard", "rebuild", "resize", "migrate"})
_SIMPLE_OPS = tuple(
    op.name.replace("_", "-") for op in graph.OPERATIONS if op.name in STEPS and op.name not in _OWN_OPTIONS
)


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog: readable on a terminal, JSON lines otherwise, to stderr."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    # Looked up per logger, not captured once: whoever swaps sys.stderr later
    # (a test runner, a daemon manager) still gets the log lines.
    return structlog.PrintLogger(sys.stderr)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    task_opts = argparse.ArgumentParser(add_help=False, parents=[common])
    task_opts.add_argument("--request-id", help="request id recorded on the task and audit rows")
    task_opts.add_argument("--idempotency-key", help="a repeat with the same key returns the first task")
    task_opts.add_argument("--no-wait", action="store_true", help="return the started task at once")

    p = argparse.ArgumentParser(prog="lifecycle", description="Manage virtual machine instance lifecycles.")
    p.add_argument("--db", default=os.environ.get("LIFECYCLE_DB_URL", DEFAULT_DB_URL), help="database URL")
    p.add_argument("--json", action="store_true", default=False, help="machine-readable output")
    p.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="schema migrations", parents=[common]).add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("upgrade", help="upgrade the schema to head", parents=[common])
    db.add_parser("current", help="print the schema revision", parents=[common])
    down = db.add_parser("downgrade", help="downgrade the schema", parents=[common])
    down.add_argument("revision", nargs="?", default="base")

    host = sub.add_parser("host", help="hypervisor hosts", parents=[common]).add_subparsers(
        dest="host_command", required=True
    )
    add = host.add_parser("add", help="register a host", parents=[common])
    add.add_argument("name")
    add.add_argument("--uri", required=True, help="driver URI, e.g. fake:///var/lib/lifecycle/h1.json")
    add.add_argument("--instances-path", default="/var/lib/lifecycle/instances")
    add.add_argument("--zone", default="nova", help="availability zone")
    add.add_argument("--vcpus", type=int, help="physical vCPUs (omit: resources not tracked)")
    add.add_argument("--memory-mb", type=int)
    add.add_argument("--disk-gb", type=int)
    add.add_argument("--capability", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    add.add_argument("--hypervisor-type", default="qemu")
    add.add_argument("--architecture", default="x86_64")
    host.add_parser("list", help="list hosts", parents=[common])
    for verb in ("show", "enable", "disable", "heartbeat"):
        host.add_parser(verb, help=f"{verb} a host", parents=[common]).add_argument("name")

    image = sub.add_parser("image", help="images", parents=[common]).add_subparsers(dest="image_command", required=True)
    add = image.add_parser("add", help="register an image file", parents=[common])
    add.add_argument("name")
    add.add_argument("--path", required=True)
    add.add_argument("--format", default="qcow2", dest="disk_format", help="qcow2 or raw")
    add.add_argument("--min-disk", type=int, default=0, help="minimum root disk in GiB")
    add.add_argument(
        "--property", action="append", default=[], metavar="KEY=VALUE", help="architecture=..., repeatable"
    )
    image.add_parser("list", help="list images", parents=[common])
    clean = image.add_parser("cleanup", help="remove a host's unused cached base images", parents=[common])
    clean.add_argument("--host", required=True)
    clean.add_argument("--max-age", type=float, help="seconds (default: the setting, 86400)")

    create = sub.add_parser("create", help="build an instance", parents=[task_opts])
    create.add_argument("name")
    create.add_argument("--host", help="build here (default: let the scheduler choose)")
    create.add_argument("--zone", help="availability zone for the scheduler")
    create.add_argument("--flavor", required=True, help="vcpus=N,ram=MiB,disk=GiB")
    create.add_argument(
        "--extra-spec", action="append", default=[], metavar="KEY=VALUE", help="e.g. capabilities:ssd=true"
    )
    create.add_argument("--image", required=True)
    create.add_argument("--uuid")

    for name in _SIMPLE_OPS:
        sub.add_parser(name, help=f"{name} an instance", parents=[task_opts]).add_argument("uuid")
    stop = sub.add_parser("stop", help="power an instance off", parents=[task_opts])
    stop.add_argument("uuid")
    stop.add_argument("--timeout", type=float, help="seconds for a clean shutdown before a hard stop")
    reboot = sub.add_parser("reboot", help="reboot an instance", parents=[task_opts])
    reboot.add_argument("uuid")
    reboot.add_argument("--hard", action="store_true")
    resize = sub.add_parser("resize", help="move to a host with room for a new flavor", parents=[task_opts])
    resize.add_argument("uuid")
    resize.add_argument("--flavor", required=True, help="vcpus=N,ram=MiB,disk=GiB")
    migrate = sub.add_parser("migrate", help="cold-migrate to another host", parents=[task_opts])
    migrate.add_argument("uuid")
    migrate.add_argument("--host", help="destination (default: let the scheduler choose)")
    rebuild = sub.add_parser("rebuild", help="rebuild an instance on a fresh disk", parents=[task_opts])
    rebuild.add_argument("uuid")
    rebuild.add_argument("--image")

    sub.add_parser("console", help="issue a VNC console URL", parents=[common]).add_argument("uuid")
    recover = sub.add_parser("recover", help="finish tasks whose owner died", parents=[common])
    recover.add_argument("--owner", help="the owner name a crashed engine used (its tasks are taken at once)")
    sync = sub.add_parser("sync", help="run one power-sync pass", parents=[common])
    sync.add_argument("--once", action="store_true", required=True, help="one pass, then exit (the daemon loops)")
    sync.add_argument("--host", help="only this host (default: every enabled host)")
    daemon = sub.add_parser("daemon", help="periodic sync, events and image cache cleanup", parents=[common])
    daemon.add_argument("--host", action="append", dest="hosts", help="only these hosts (repeatable)")
    daemon.add_argument("--interval", type=float, help="seconds between sync passes per host (default 600)")
    daemon.add_argument("--claim-interval", type=float, default=10.0, help="seconds between host claim rounds")
    daemon.add_argument("--event-delay", type=float, help="seconds a STOPPED event is held (default 15)")
    sub.add_parser("show", help="show an instance", parents=[common]).add_argument("uuid")
    lst = sub.add_parser("list", help="list instances", parents=[common])
    lst.add_argument("--host")
    lst.add_argument("--all", action="store_true", help="include deleted instances")
    sub.add_parser("history", help="an instance's audit log", parents=[common]).add_argument("uuid")
    sub.add_parser("tasks", help="an instance's tasks and their step logs", parents=[common]).add_argument("uuid")
    gr = sub.add_parser("graph", help="print the state graph", parents=[common])
    gr.add_argument("--format", choices=("mermaid", "json"), default="mermaid")
    demo = sub.add_parser("demo", help="run a demonstration on a scratch database", parents=[common])
    demo.add_argument("--keep", help="directory to keep the demo's database and hypervisor state in")
    return p


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


def _instance_line(i: Instance) -> str:
    task = i.task_state.value if i.task_state else "-"
    states = f"vm={i.vm_state.value} task={task} power={int(i.power_state)}"
    return f"{i.uuid}  {i.name:<20} {i.host or '-':<12} {i.status:<14} {states}"


def _task_result(engine: Engine, args: argparse.Namespace, task: Task) -> None:
    instance = engine.get(task.instance_uuid)
    data = {**to_plain(instance), "task": to_plain(task)}
    _emit(args, data, f"task {task.id} {task.operation} {task.outcome.value}\n{_instance_line(instance)}")


def _run_op(engine: Engine, args: argparse.Namespace) -> None:
    kw: dict[str, Any] = {
        "request_id": args.request_id,
        "idempotency_key": args.idempotency_key,
        "wait": not args.no_wait,
    }
    command = args.command
    if command == "create":
        specs = tuple(sorted(_pairs(args.extra_spec, "--extra-spec").items()))
        flavor = replace(Flavor.parse(args.flavor), extra_specs=specs)
        kw.pop("idempotency_key")
        if args.idempotency_key:
            raise InvalidInput("create does not take --idempotency-key; pass --uuid to make it repeat-safe")
        task = engine.create(
            args.name,
            host=args.host,
            availability_zone=args.zone,
            flavor=flavor,
            image=args.image,
            uuid=args.uuid,
            **kw,
        )
    elif command == "stop":
        task = engine.stop(args.uuid, timeout=args.timeout, **kw)
    elif command == "reboot":
        task = engine.reboot(args.uuid, hard=args.hard, **kw)
    elif command == "rebuild":
        task = engine.rebuild(args.uuid, image=args.image, **kw)
    elif command == "resize":
        task = engine.resize(args.uuid, Flavor.parse(args.flavor), **kw)
    elif command == "migrate":
        task = engine.migrate(args.uuid, host=args.host, **kw)
    else:
        task = engine.run(command.replace("-", "_"), args.uuid, **kw)
    _task_result(engine, args, task)


def _read(engine: Engine, args: argparse.Namespace) -> None:
    if args.command == "show":
        i = engine.get(args.uuid)
        _emit(args, to_plain(i), _instance_line(i))
    elif args.command == "list":
        rows = engine.list(args.host, include_deleted=args.all)
        _emit(args, to_plain(rows), "\n".join(_instance_line(i) for i in rows) or "no instances")
    elif args.command == "console":
        access = engine.get_vnc_console(args.uuid)
        _emit(args, to_plain(access), f"{access.url}\n(valid until {access.expires_at.isoformat(timespec='seconds')})")
    elif args.command == "history":
        entries = engine.history(args.uuid)
        _emit(args, to_plain(entries), format_history(entries))
    elif args.command == "tasks":
        tasks = engine.tasks(args.uuid)
        data = [{**to_plain(t), "steps": to_plain(engine.steps(t.id))} for t in tasks]
        lines = []
        for t in tasks:
            lines.append(f"{t.id} {t.operation} {t.outcome.value} by {t.actor} ({t.request_id})")
            lines += [f"    {s.seq}. {s.name} {s.result or 'running'}" for s in engine.steps(t.id)]
        _emit(args, data, "\n".join(lines))


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{flag} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _host_line(h: Host) -> str:
    if h.vcpus is None:
        usage = "resources untracked"
    else:
        usage = f"vcpus {h.vcpus_used}/{h.vcpus} ram {h.memory_mb_used}/{h.memory_mb} MiB"
        usage += f" disk {h.disk_gb_used}/{h.disk_gb} GiB"
    state = "enabled" if h.enabled else "disabled"
    beat = h.last_heartbeat.isoformat(timespec="seconds") if h.last_heartbeat else "never"
    return f"{h.name}  {h.driver_uri}  zone={h.availability_zone}  {state}  {usage}  heartbeat={beat}"


def _hosts(engine: Engine, args: argparse.Namespace) -> None:
    command = args.host_command
    if command == "add":
        h = engine.add_host(
            args.name,
            args.uri,
            args.instances_path,
            availability_zone=args.zone,
            vcpus=args.vcpus,
            memory_mb=args.memory_mb,
            disk_gb=args.disk_gb,
            capabilities=_pairs(args.capability, "--capability"),
            hypervisor_type=args.hypervisor_type,
            architecture=args.architecture,
        )
    elif command == "list":
        hosts = engine.hosts()
        _emit(args, to_plain(hosts), "\n".join(_host_line(h) for h in hosts) or "no hosts")
        return
    elif command in ("enable", "disable"):
        h = engine.set_host_enabled(args.name, command == "enable")
    elif command == "heartbeat":
        h = engine.heartbeat(args.name)
    else:
        h = engine.host(args.name)
    _emit(args, to_plain(h), _host_line(h))


def _admin(engine: Engine, args: argparse.Namespace) -> None:
    if args.command == "host":
        _hosts(engine, args)
    elif args.image_command == "cleanup":
        removed = engine.clean_image_cache(args.host, args.max_age)
        _emit(args, {"removed": removed}, "\n".join(f"removed {p}" for p in removed) or "nothing to remove")
    elif args.image_command == "add":
        im = engine.add_image(
            args.name, args.path, args.disk_format, args.min_disk, _pairs(args.property, "--property")
        )
        _emit(args, to_plain(im), f"image {im.name} added ({im.path})")
    else:
        images = engine.images()
        _emit(args, to_plain(images), "\n".join(f"{i.name}  {i.disk_format}  {i.path}" for i in images) or "no images")


def _sync(engine: Engine, args: argparse.Namespace) -> None:
    summaries = engine.sync(args.host)
    lines = [
        f"{s.host}: {s.instances} instances, {s.in_sync} in sync, {s.drifted} drifted, {s.acted} acted,"
        f" {s.skipped} skipped, {s.missing_unconfirmed} missing (unconfirmed), {s.lost_races} lost races,"
        f" {s.errors} errors, unknown domains: "
        f"{', '.join(s.unknown_domains) or 'none'}"
        for s in summaries
    ]
    _emit(args, [asdict(s) for s in summaries], "\n".join(lines) or "no hosts")


def _recover(args: argparse.Namespace) -> None:
    with Engine(args.db, owner=args.owner) as engine:
        results = engine.recover()
    lines = [
        f"{r.task_id} {r.operation} on {r.instance_uuid} at {r.task_state}: {r.plan} -> {r.outcome}" for r in results
    ]
    _emit(args, [vars_of(r) for r in results], "\n".join(lines) or "no task to recover")


def _daemon(args: argparse.Namespace) -> None:
    overrides: dict[str, float] = {}
    if args.interval is not None:
        overrides["sync_interval"] = args.interval
    if args.event_delay is not None:
        overrides["stopped_event_delay"] = args.event_delay
    with Engine(args.db, settings=Settings(**overrides)) as engine:  # type: ignore[arg-type]
        daemon = Daemon(engine, hosts=args.hosts, claim_interval=args.claim_interval)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: daemon.stop.set())
        daemon.run()


def _db(args: argparse.Namespace) -> None:
    if args.db_command == "upgrade":
        upgrade(args.db)
    elif args.db_command == "downgrade":
        downgrade(args.db, args.revision)
    engine = connect(args.db)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    _emit(
        args, {"revision": current, "head": head_revision()}, f"schema at {current or 'base'} (head {head_revision()})"
    )


def _graph(args: argparse.Namespace) -> None:
    as_json = args.format == "json" or args.json
    print(graph.to_json() if as_json else graph.to_mermaid(), end="\n" if as_json else "")


def _error(args: argparse.Namespace, exc: LifecycleError) -> int:
    code = 1 if isinstance(exc, TaskFailed) else 2
    if getattr(args, "json", False):
        data: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, InvalidState):
            data |= {"allowed_vm_states": exc.allowed_vm_states, "allowed_task_states": exc.allowed_task_states}
        print(json.dumps(data, indent=2, sort_keys=True))
    print(f"error: {exc}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    handlers: dict[str, Callable[[Engine, argparse.Namespace], None]] = {
        "show": _read,
        "console": _read,
        "sync": _sync,
        "list": _read,
        "history": _read,
        "tasks": _read,
        "host": _admin,
        "image": _admin,
    }
    try:
        if args.command == "db":
            _db(args)
        elif args.command == "graph":
            _graph(args)
        elif args.command == "recover":
            _recover(args)
        elif args.command == "daemon":
            _daemon(args)
        elif args.command == "demo":
            from lifecycle.demo import run_demo

            run_demo(args.keep, as_json=args.json)
        else:
            with Engine(args.db) as engine:
                handlers.get(args.command, _run_op)(engine, args)
    except LifecycleError as exc:
        return _error(args, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
