"""The ``lifecycle`` command line; the only place that configures logging.

Every command accepts ``--json`` and then prints machine-readable output with
the library's field names (strict JSON: never NaN). Errors print one line
naming what was wrong and what is allowed, and exit non-zero: 2 for input
refused before anything changed (the parser's refusals and unusable databases
included, and a second webhook sender to one URL), 1 for an operation that
ran and failed, a sync pass that failed on a host, or a feed follower told
to stop while its database was unreachable, 141 when the reader of stdout
went away. Text output escapes control and format characters in names, as
older databases may hold them.
"""

from __future__ import annotations

import argparse
import functools
import gc
import ipaddress
import json
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lifecycle import graph, validation
from lifecycle.errors import (
    DatabaseUnavailable,
    DriverError,
    InvalidInput,
    InvalidState,
    LifecycleError,
    Preempted,
    TaskFailed,
)
from lifecycle.states import VmState

if TYPE_CHECKING:
    import threading

    from lifecycle.audit import AuditEntry
    from lifecycle.configfile import Loaded
    from lifecycle.engine import Engine
    from lifecycle.feed import Change, Position
    from lifecycle.records import Host, Image, Instance, Migration, Task
    from lifecycle.sweep import PassSummary

__all__ = ["configure_logging", "main"]

# Commands with their own options; every other implemented operation takes only a uuid.
_OWN_OPTIONS = frozenset(
    {"create", "stop", "reboot", "reboot_hard", "rebuild", "resize", "migrate", "evacuate", "unshelve"}
)
_SIMPLE_OPS = tuple(op.name.replace("_", "-") for op in graph.OPERATIONS if op.name not in _OWN_OPTIONS)


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog: readable on a terminal, JSON lines otherwise, to stderr."""
    import logging

    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    if use_json and "structlog" not in sys.modules and "rich" not in sys.modules:
        _import_structlog_without_rich()
    import structlog

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


def _import_structlog_without_rich() -> None:
    """Import structlog with rich hidden: for JSON lines, which never use it.

    structlog imports its console renderer whenever it is imported, and that
    imports rich when installed (for pretty tracebacks): ~30 ms of a read
    command's start. Hidden while structlog loads, rich stays importable
    afterwards; only the console renderer of this process then formats
    tracebacks without it.
    """
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` raises ImportError, as if absent
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


def _stderr_logger(*_args: Any) -> Any:
    # Looked up per logger, not captured once: whoever swaps sys.stderr later
    # (a test runner, a daemon manager) still gets the log lines.
    import structlog

    return structlog.PrintLogger(sys.stderr)


_RECOVER_HELP = (
    "Take over and finish the running tasks whose owner died. A task is taken only once its owner's"
    " lease has expired (60 s by default; a living owner keeps renewing it). Right after a crash,"
    " recover therefore finds nothing to do until the lease runs out; it then says how many running"
    " tasks are still within their lease and when the first lease ends. --owner NAME --force takes the"
    " live tasks of the engine that used NAME at once: only when you know that engine is dead. Should"
    " it live after all, its workers are fenced (they stop before their next hypervisor call), but a"
    " call already in flight still lands after the takeover."
)
_BROKEN_PIPE = 141
"""Exit status when whoever read stdout went away (``lifecycle list | head -1``): 128 + SIGPIPE, as a
Unix filter killed by the signal reports it, so ``set -o pipefail`` scripts see what they see for ``cat``."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose refusals are :class:`InvalidInput`: one line, exit 2, and the --json error."""

    def error(self, message: str) -> NoReturn:
        raise InvalidInput(f"{self.prog}: {message}")


def _number(label: str, check: Callable[[str, float], float]) -> Callable[[str], float]:
    """Return an argparse type for seconds: ASCII text ``float()`` reads, then ``check`` (finite, in range)."""

    def convert(text: str) -> float:
        try:
            if not text.isascii() or "_" in text:
                raise ValueError(text)
            return check(label, float(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{label} must be a number of seconds, got {text!r}") from None
        except InvalidInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _count(label: str, low: int = 0) -> Callable[[str], int]:
    """Return an argparse type for an integer in ASCII digits that every database column holds (32-bit)."""

    def convert(text: str) -> int:
        digits = text.removeprefix("-")
        if not (digits.isascii() and digits.isdigit()):
            raise argparse.ArgumentTypeError(f"{label} must be a whole number in digits 0-9, got {text[:40]!r}")
        if len(digits) > 12:  # past 32 bits; int() of thousands of digits is slow, past 4300 refused
            raise argparse.ArgumentTypeError(
                f"{label} must be an integer from {low} to {validation.MAX_INT}, got {len(digits)} digits"
            )
        try:
            return validation.count(label, int(text), low=low)
        except InvalidInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _text(label: str, limit: int = 255) -> Callable[[str], str]:
    """Return an argparse type for a free-text identifier: 1 to ``limit`` printable characters."""

    def convert(text: str) -> str:
        bad = validation.unsafe_character(text)
        if not 1 <= len(text) <= limit or bad is not None:
            raise argparse.ArgumentTypeError(
                f"{label} must be 1 to {limit} printable characters, got {text[:60]!r}"
                + ("" if bad is None else f" (U+{ord(bad):04X} is a control or format character)")
            )
        return text

    return convert


def _parser() -> argparse.ArgumentParser:
    """Build the parser, with argparse's own messages translated once each rather than once per use.

    argparse passes its messages ("show this help message and exit", ...)
    through gettext for every parser and argument it makes, and gettext looks
    for catalog files anew on each call when it finds none: a few thousand
    stat() calls, two thirds of the time it takes to build this parser.
    """
    translate = argparse._  # type: ignore[attr-defined]
    argparse._ = functools.cache(translate)  # type: ignore[attr-defined]
    try:
        return _build_parser()
    finally:
        argparse._ = translate  # type: ignore[attr-defined]


def _build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    task_opts = _Parser(add_help=False, parents=[common])
    task_opts.add_argument(
        "--request-id", type=_text("--request-id", 64), help="request id recorded on the task and audit rows"
    )
    task_opts.add_argument(
        "--idempotency-key", type=_text("--idempotency-key"), help="a repeat with the same key returns the first task"
    )
    task_opts.add_argument("--no-wait", action="store_true", help="return the started task at once")
    task_opts.add_argument(
        "--force", action="store_true", help="override the instance's lock (an admin's override, audited)"
    )

    p = _Parser(prog="lifecycle", description="Manage virtual machine instance lifecycles.")
    p.add_argument(
        "--db", help="database URL (default: $LIFECYCLE_DB_URL, else the config file's database_url, else SQLite)"
    )
    p.add_argument(
        "--config",
        help="settings file (TOML; default: $LIFECYCLE_CONFIG, else /etc/lifecycle/lifecycle.toml if it exists)",
    )
    p.add_argument("--json", action="store_true", default=False, help="machine-readable output")
    p.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="schema migrations", parents=[common]).add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("upgrade", help="upgrade the schema", parents=[common]).add_argument(
        "revision", nargs="?", default="head"
    )
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
    add.add_argument("--vcpus", type=_count("--vcpus"), help="physical vCPUs (omit: resources not tracked)")
    add.add_argument("--memory-mb", type=_count("--memory-mb"))
    add.add_argument("--disk-gb", type=_count("--disk-gb"))
    add.add_argument("--capability", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    add.add_argument("--hypervisor-type", default="qemu")
    add.add_argument("--architecture", default="x86_64")
    add.add_argument(
        "--console-address", help="the host's management address: its guests' VNC listens there (remote hosts)"
    )
    host.add_parser("list", help="list hosts", parents=[common])
    beat = "record a host as up; the copies of instances evacuated away from it are destroyed first (exit 1 if not)"
    for verb in ("show", "enable", "disable", "heartbeat"):
        verb_help = beat if verb == "heartbeat" else f"{verb} a host"
        host.add_parser(verb, help=verb_help, parents=[common]).add_argument("name")
    remove = host.add_parser("remove", help="forget a host (refused while instances live there)", parents=[common])
    remove.add_argument("name")
    remove.add_argument(
        "--force", action="store_true", help="remove anyway: its idle instances go to error with no host"
    )
    _evacuate_parsers(sub, host, common, task_opts)

    image = sub.add_parser("image", help="images", parents=[common]).add_subparsers(dest="image_command", required=True)
    add = image.add_parser("add", help="register an image file", parents=[common])
    add.add_argument("name")
    add.add_argument("--path", required=True, help="absolute path of an existing image file")
    add.add_argument("--format", default="qcow2", dest="disk_format", choices=("qcow2", "raw"))
    add.add_argument("--min-disk", type=_count("--min-disk"), default=0, help="minimum root disk in GiB")
    add.add_argument(
        "--property", action="append", default=[], metavar="KEY=VALUE", help="architecture=..., repeatable"
    )
    image.add_parser("list", help="list images", parents=[common])
    clean = image.add_parser("cleanup", help="remove a host's unused cached base images", parents=[common])
    clean.add_argument("--host", required=True)
    clean.add_argument(
        "--max-age", type=_number("--max-age", validation.seconds), help="seconds (default: the setting, 86400)"
    )

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
    stop.add_argument(
        "--timeout",
        type=_number("--timeout", validation.seconds),
        help="seconds for a clean shutdown before a hard stop",
    )
    reboot = sub.add_parser("reboot", help="reboot an instance", parents=[task_opts])
    reboot.add_argument("uuid")
    reboot.add_argument("--hard", action="store_true")
    resize = sub.add_parser("resize", help="move to a host with room for a new flavor", parents=[task_opts])
    resize.add_argument("uuid")
    resize.add_argument("--flavor", required=True, help="vcpus=N,ram=MiB,disk=GiB")
    migrate = sub.add_parser("migrate", help="cold-migrate to another host", parents=[task_opts])
    migrate.add_argument("uuid")
    migrate.add_argument("--host", help="destination (default: let the scheduler choose)")
    unshelve = sub.add_parser("unshelve", help="bring a shelved instance back on a host", parents=[task_opts])
    unshelve.add_argument("uuid")
    unshelve.add_argument("--host", help="for an offloaded instance: where (default: let the scheduler choose)")
    rebuild = sub.add_parser("rebuild", help="rebuild an instance on a fresh disk", parents=[task_opts])
    rebuild.add_argument("uuid")
    rebuild.add_argument("--image")

    sub.add_parser("console", help="issue a VNC console URL", parents=[common]).add_argument("uuid")
    recover = sub.add_parser(
        "recover", help="finish tasks whose owner died", description=_RECOVER_HELP, parents=[common]
    )
    recover.add_argument(
        "--owner",
        type=_text("--owner"),
        help="recover under the owner name a crashed engine used (with --force: take its live tasks at once)",
    )
    recover.add_argument(
        "--force",
        action="store_true",
        help="with --owner: take that owner's tasks although their lease is live (its workers are fenced)",
    )
    sync = sub.add_parser("sync", help="run one power-sync pass", parents=[common])
    sync.add_argument("--once", action="store_true", required=True, help="one pass, then exit (the daemon loops)")
    sync.add_argument("--host", help="only this host (default: every enabled host)")
    daemon = sub.add_parser("daemon", help="periodic sync, events and image cache cleanup", parents=[common])
    daemon.add_argument("--host", action="append", dest="hosts", help="only these hosts (repeatable)")
    daemon.add_argument(
        "--interval",
        type=_number("--interval", validation.period),
        help="seconds between sync passes per host (default 600; at least 0.1)",
    )
    daemon.add_argument(
        "--claim-interval",
        type=_number("--claim-interval", validation.period),
        default=10.0,
        help="seconds between host claim rounds (at least 0.1)",
    )
    daemon.add_argument(
        "--event-delay",
        type=_number("--event-delay", validation.seconds),
        help="seconds a STOPPED event is held (default 15)",
    )
    daemon.add_argument(
        "--metrics-listen",
        type=_listen,
        help="serve Prometheus metrics over HTTP at ADDR:PORT (e.g. 127.0.0.1:9464)",
    )
    daemon.add_argument(
        "--reclaim-instance-interval",
        type=_number("--reclaim-instance-interval", validation.seconds),
        help="seconds a soft-deleted instance is kept before the daemon deletes it (default 0: off)",
    )
    daemon.add_argument(
        "--instance-build-timeout",
        type=_number("--instance-build-timeout", validation.seconds),
        help="seconds a build may run before it is put in error (default 0: off)",
    )
    _duty_parsers(sub, common)
    config = sub.add_parser("config", help="the effective settings", parents=[common]).add_subparsers(
        dest="config_command", required=True
    )
    config.add_parser("show", help="print every setting, its value and where it came from", parents=[common])
    sub.add_parser("show", help="show an instance", parents=[common]).add_argument("uuid")
    lst = sub.add_parser("list", help="list instances", parents=[common])
    lst.add_argument("--host")
    lst.add_argument("--all", action="store_true", help="include deleted instances")
    sub.add_parser("history", help="an instance's audit log", parents=[common]).add_argument("uuid")
    _feed_parsers(sub, common)
    sub.add_parser("tasks", help="an instance's tasks and their step logs", parents=[common]).add_argument("uuid")
    migration = sub.add_parser("migration", help="cold migrations and resizes", parents=[common]).add_subparsers(
        dest="migration_command", required=True
    )
    mlist = migration.add_parser("list", help="list migrations, newest first", parents=[common])
    mlist.add_argument("--host", help="only those from or to this host")
    migration.add_parser("show", help="show a migration", parents=[common]).add_argument("id")
    proxy = sub.add_parser(
        "console-proxy",
        help="serve the console page and bridge browsers to guests' VNC servers, token-checked",
        parents=[common],
    )
    proxy.add_argument(
        "--listen", type=_listen, default=None, help="ADDR:PORT to listen on (default: setting console_proxy_listen)"
    )
    gr = sub.add_parser("graph", help="print the state graph", parents=[common])
    gr.add_argument("--format", choices=("mermaid", "json"), default="mermaid")
    demo = sub.add_parser("demo", help="run a demonstration on a scratch database", parents=[common])
    demo.add_argument("--keep", help="directory to keep the demo's database and hypervisor state in")
    demo.add_argument("--uri", help="libvirt URI for compute-1 (e.g. qemu:///system); without it, a fake host")
    demo.add_argument("--remote-uri", help="libvirt URI of a second hypervisor to resize onto (qemu+tcp://...)")
    demo.add_argument(
        "--remote-instances", default="/var/lib/libvirt/lifecycle/demo", help="instances path on that hypervisor"
    )
    return p


def _safe(text: object) -> str:
    """Return ``text`` with the characters a terminal would act on escaped as ``repr`` escapes them.

    Controls, format characters (bidirectional overrides...), line and
    paragraph separators: names written before the engine refused them may
    still hold them, and printed raw they could rewrite what the reader sees.
    """
    value = str(text)
    if validation.unsafe_character(value) is None:
        return value
    return "".join(repr(c)[1:-1] if validation.unsafe_character(c) else c for c in value)


def _finite(data: Any) -> Any:
    """Return ``data`` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if not args.json:
        print(text)
        return
    try:
        out = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except ValueError:  # a NaN read back from an older database: print null rather than invalid JSON
        out = json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False)
    print(out)


def _instance_line(i: Instance) -> str:
    task = i.task_state.value if i.task_state else "-"
    states = f"vm={i.vm_state.value} task={task} power={int(i.power_state)}"
    return f"{i.uuid}  {_safe(i.name):<20} {_safe(i.host or '-'):<12} {i.status:<14} {states}"


def _task_result(engine: Engine, args: argparse.Namespace, task: Task) -> None:
    from lifecycle.records import to_plain

    instance = engine.get(task.instance_uuid)
    data = {**to_plain(instance), "task": to_plain(task)}
    _emit(args, data, f"task {task.id} {task.operation} {task.outcome.value}\n{_instance_line(instance)}")


def _run_op(engine: Engine, args: argparse.Namespace) -> None:
    import dataclasses

    from lifecycle.records import Flavor

    kw: dict[str, Any] = {
        "request_id": args.request_id,
        "idempotency_key": args.idempotency_key,
        "wait": not args.no_wait,
        "override_lock": args.force,
    }
    command = args.command
    if command == "create":
        specs = tuple(sorted(_pairs(args.extra_spec, "--extra-spec").items()))
        flavor = dataclasses.replace(Flavor.parse(args.flavor), extra_specs=specs)
        kw.pop("idempotency_key")
        if kw.pop("override_lock"):
            raise InvalidInput("create does not take --force: a new instance has no lock to override")
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
    elif command == "unshelve":
        task = engine.unshelve(args.uuid, host=args.host, **kw)
    elif command == "delete":
        task = engine.delete(args.uuid, **kw)  # a soft delete while reclaim_instance_interval is set
    else:
        task = engine.run(command.replace("-", "_"), args.uuid, **kw)
    _task_result(engine, args, task)


def _duty_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the operator duties: lock, unlock, reset-state, and one-shot reclaim, build-timeout, offload runs."""
    actor = {"type": _text("--actor"), "default": os.environ.get("USER") or "cli", "help": "who does it (audited)"}
    lock = sub.add_parser("lock", help="lock an instance: operations but reads are refused", parents=[common])
    lock.add_argument("uuid")
    lock.add_argument("--reason", required=True, type=_text("--reason", 1000))
    lock.add_argument("--actor", **actor)
    unlock = sub.add_parser("unlock", help="unlock an instance (its locker, or --force)", parents=[common])
    unlock.add_argument("uuid")
    unlock.add_argument("--actor", **actor)
    unlock.add_argument("--force", action="store_true", help="unlock another's lock (an admin's override)")
    reset = sub.add_parser(
        "reset-state", help="admin: end a stuck task and set the vm_state (error or active)", parents=[common]
    )
    reset.add_argument("uuid")
    reset.add_argument("--state", choices=[VmState.ERROR.value, VmState.ACTIVE.value], default="error")
    reset.add_argument("--reason", required=True, type=_text("--reason", 1000))
    reset.add_argument("--actor", **actor)
    for name, what, setting in (
        ("reclaim", "delete for good what was soft-deleted longer ago than", "reclaim_instance_interval"),
        ("build-timeout", "put in error the builds running longer than", "instance_build_timeout"),
        ("offload-shelved", "offload what was shelved on its host longer ago than", "shelved_offload_time"),
    ):
        duty = sub.add_parser(name, help=f"once: {what} --older-than seconds", parents=[common])
        duty.add_argument(
            "--older-than",
            required=True,
            type=_number("--older-than", validation.seconds),
            help=f"seconds (the daemon uses the {setting} setting)",
        )


def _duty(engine: Engine, args: argparse.Namespace) -> None:
    import dataclasses

    from lifecycle.records import to_plain

    duties = {
        "reclaim": engine.reclaim_queued_deletes,
        "build-timeout": engine.check_build_timeouts,
        "offload-shelved": engine.offload_shelved_instances,
    }
    if args.command in duties:
        results = duties[args.command](args.older_than)
        lines = [f"{r.uuid} {r.outcome}" + (f" ({_safe(r.detail)})" if r.detail else "") for r in results]
        _emit(args, [dataclasses.asdict(r) for r in results], "\n".join(lines) or "nothing to do")
        return
    if args.command == "lock":
        i = engine.lock(args.uuid, reason=args.reason, actor=args.actor)
    elif args.command == "unlock":
        i = engine.unlock(args.uuid, actor=args.actor, override_lock=args.force)
    else:
        i = engine.reset_state(args.uuid, state=VmState(args.state), reason=args.reason, actor=args.actor)
    lock = f"  locked by {_safe(i.locked_by)}: {_safe(i.locked_reason)}" if i.locked_by else ""
    _emit(args, to_plain(i), _instance_line(i) + lock)


def _history_line(entry: AuditEntry) -> AuditEntry:
    import dataclasses

    # The message is printed with repr() by format_history, so it is already escaped.
    texts: dict[str, Any] = {
        f.name: _safe(v)
        for f in dataclasses.fields(entry)
        if f.name != "message" and isinstance(v := getattr(entry, f.name), str)
    }
    return dataclasses.replace(entry, **texts)


def _read(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.audit import format_history
    from lifecycle.records import to_plain

    if args.command == "show":
        i = engine.get(args.uuid)
        _emit(args, to_plain(i) if args.json else None, _instance_line(i))  # JSON data only when printed
    elif args.command == "list":
        if args.host is not None:
            engine.host(args.host)  # an unknown host is a typo to report, not an empty list
        rows = engine.list(args.host, include_deleted=args.all)
        text = "\n".join(_instance_line(i) for i in rows) if not args.json else ""
        _emit(args, to_plain(rows) if args.json else None, text or "no instances")
    elif args.command == "console":
        access = engine.get_vnc_console(args.uuid)
        _emit(args, to_plain(access), f"{access.url}\n(valid until {access.expires_at.isoformat(timespec='seconds')})")
    elif args.command == "history":
        entries = engine.history(args.uuid)
        _emit(args, to_plain(entries), format_history(_history_line(e) for e in entries))
    elif args.command == "tasks":
        engine.get(args.uuid)  # an unknown uuid is refused as `show` refuses it, not an empty list
        tasks = engine.tasks(args.uuid)
        data = [{**to_plain(t), "steps": to_plain(engine.steps(t.id))} for t in tasks]
        lines = []
        for t in tasks:
            lines.append(_safe(f"{t.id} {t.operation} {t.outcome.value} by {t.actor} ({t.request_id})"))
            lines += [
                _safe(
                    f"    {s.seq}. {s.name} {s.result or 'running'}{_progress(s.bytes_done, s.bytes_total)}"
                    + (f": {s.detail}" if s.result is None and s.detail else "")  # a queued build: where, behind what
                )
                for s in engine.steps(t.id)
            ]
        _emit(args, data, "\n".join(lines))


def _progress(done: int | None, total: int | None) -> str:
    """Render a disk copy's progress: `` (copied 12.0 of 512.0 MiB, 2%)``, or nothing before it began."""
    if done is None or total is None:
        return ""
    share = f", {100 * done // total}%" if total else ""
    return f" (copied {done / 2**20:.1f} of {total / 2**20:.1f} MiB{share})"


def _migration_line(m: Migration) -> str:
    done = m.finished_at.isoformat(timespec="seconds") if m.finished_at else "-"
    return _safe(
        f"{m.id}  {m.instance_uuid}  {m.kind:<9} {m.status.value:<14} {m.source_host} -> {m.dest_host or '-'}"
        f"  {m.old_flavor} -> {m.new_flavor}  started {m.created_at.isoformat(timespec='seconds')} finished {done}"
        + _progress(m.bytes_done, m.bytes_total)
    )


def _migrations(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    if args.migration_command == "show":
        m = engine.migration(args.id)
        _emit(args, to_plain(m), _migration_line(m))
        return
    rows = engine.migrations(args.host)
    _emit(args, to_plain(rows), "\n".join(_migration_line(m) for m in rows) or "no migrations")


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{flag} takes KEY=VALUE, got {item!r}")
        if key in pairs:
            raise InvalidInput(f"{flag} {key!r} given twice")
        pairs[key] = value
    return pairs


_AGE = re.compile(r"([0-9]{1,9})([smhd])", re.ASCII)
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _when(label: str) -> Callable[[str], datetime]:
    """Return an argparse type for a time: ISO 8601 (UTC unless it names a zone), or an age (90m, 12h, 7d)."""

    def convert(text: str) -> datetime:
        try:
            if age := _AGE.fullmatch(text):
                return datetime.now(UTC) - timedelta(seconds=int(age[1]) * _AGE_UNITS[age[2]])
            value = datetime.fromisoformat(text) if text.isascii() else None
        except (ValueError, OverflowError):  # not a time; an age before year 1
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(
                f"{label} must be an ISO 8601 time (2026-11-27T22:00, UTC unless it names a zone)"
                f" or an age such as 90m, 12h or 7d, got {text[:60]!r}"
            )
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    return convert


def _limit(label: str, high: int) -> Callable[[str], int]:
    """Return an argparse type for a count from 1 to ``high`` in ASCII digits."""

    def convert(text: str) -> int:
        if not (text.isascii() and text.isdigit() and len(text) <= 12 and 1 <= int(text) <= high):
            raise argparse.ArgumentTypeError(f"{label} must be an integer from 1 to {high}, got {text[:40]!r}")
        return int(text)

    return convert


def _position(text: str) -> Position | str:
    from lifecycle.feed import Position

    if text == "end":
        return text
    try:
        return Position.parse(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _feed_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``changes`` (the feed; its prune, consumers and forget) and ``audit`` (queries across instances)."""
    changes = sub.add_parser(
        "changes", help="the change feed: every committed state change, in commit order", parents=[common]
    )
    changes.add_argument(
        "--after", type=_position, help="a position TX:ID as printed (default: the start; end: only changes to come)"
    )
    changes.add_argument(
        "--follow",
        action="store_true",
        help="keep printing changes as they commit, until SIGINT or SIGTERM (a database restart is waited for)",
    )
    changes.add_argument(
        "--consumer",
        type=_text("--consumer"),
        help="as this named consumer: resume at its stored position, store it after printing (first run: --after);"
        " names starting with webhook: are the webhook senders'",
    )
    changes.add_argument("--limit", type=_limit("--limit", 10_000), help="changes per read, 1 to 10000 (default 100)")
    changes.add_argument(
        "--format", choices=("plain", "json", "nova"), help="nova: Nova's instance.update notifications (JSON lines)"
    )
    admin = changes.add_subparsers(dest="changes_command", metavar="{prune,consumers,forget,webhook}")
    prune = admin.add_parser(
        "prune", help="delete changes older than the retention that every consumer has passed", parents=[common]
    )
    prune.add_argument(
        "--older-than",
        type=_number("--older-than", validation.seconds),
        help="seconds (default: the change_retention setting; 0 keeps every change)",
    )
    admin.add_parser(
        "consumers", help="the registered consumers, their positions, and each webhook's URL", parents=[common]
    )
    forget = admin.add_parser("forget", help="unregister a consumer: retention stops waiting for it", parents=[common])
    forget.add_argument("name", type=_text("consumer"))
    hook = admin.add_parser(
        "webhook",
        help="post each change to URL until SIGINT or SIGTERM, signed with $LIFECYCLE_WEBHOOK_SECRET and, while"
        " receivers move to a new secret, also with the old one in $LIFECYCLE_WEBHOOK_SECRET_PREVIOUS"
        " (one sha256= signature per secret); one sender per URL",
        parents=[common],
    )
    hook.add_argument("url", help="http:// or https://, without user or password (checked before anything is stored)")
    hook.add_argument("--nova", action="store_true", help="post Nova's instance.update notifications")

    audit = sub.add_parser(
        "audit", help="audit rows across instances, oldest first (each filter reads one index range)", parents=[common]
    )
    for flag, what in (("--since", "from this time"), ("--until", "before this time")):
        audit.add_argument(flag, type=_when(flag), help=f"{what}: ISO 8601 (UTC unless zoned) or an age: 90m, 12h, 7d")
    audit.add_argument("--request-id", type=_text("--request-id", 64), help="the changes of one request")
    audit.add_argument("--host", type=_text("--host"), help="changes on this host")
    audit.add_argument("--operation", type=_text("--operation", 64), help="e.g. stop, delete, sync")
    audit.add_argument("--cause", help="api, sync, event, recovery, timer, ...")
    audit.add_argument("--vm-state", help="changes into this vm_state, e.g. error")
    audit.add_argument(
        "--limit", type=_limit("--limit", 100_000), default=1000, help="at most this many (default 1000)"
    )


def _changes(engine: Engine, args: argparse.Namespace) -> None:
    """Print the feed: one line (or one JSON object) per change; with --consumer or --follow as a follower."""
    from lifecycle.feed import change_data, change_line, nova_notification

    if args.changes_command is not None:
        _feed_admin(engine, args)
        return
    fmt = args.format or ("json" if args.json else "plain")
    renders: dict[str, Callable[[Change], str]] = {
        "plain": lambda c: _safe(change_line(c)),
        "json": lambda c: json.dumps(change_data(c), sort_keys=True, allow_nan=False),
        "nova": lambda c: json.dumps(nova_notification(c), sort_keys=True, allow_nan=False),
    }
    render = renders[fmt]
    limit = 100 if args.limit is None else args.limit
    if not args.follow and args.consumer is None:
        batch = engine.changes(args.after, limit)
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
        engine.follow(args.consumer, lambda c: print(render(c), flush=True), stop=stop, batch=limit, after=args.after)
    finally:
        restore()


def _relays(args: argparse.Namespace) -> bool:
    """Whether the command follows the feed until told to stop: ``changes --follow`` or ``changes webhook``."""
    if args.command != "changes":
        return False
    return args.changes_command == "webhook" or (args.changes_command is None and args.follow)


def _await_database(args: argparse.Namespace) -> None:
    """Wait for a database that is down when a relay starts, as the relay would once running; stop on a signal.

    Its input is checked first: bad input exits 2 at once, whatever the database's state.
    """
    import threading

    from lifecycle.feed import wait_for_database

    consumer = args.consumer if args.changes_command is None else None
    if args.changes_command == "webhook":
        from lifecycle.webhooks import check_url, consumer_name

        check_url(args.url)
        if not _secret(_SECRET):
            raise InvalidInput(f"changes webhook signs every request: set {_SECRET} (16 bytes or more)")
        consumer = consumer_name(args.url)
    stop = threading.Event()
    restore = _stop_on_signals(stop)
    try:
        wait_for_database(args.db, consumer, stop=stop)
    finally:
        restore()


def _stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """Make SIGTERM and SIGINT set ``stop``; return what puts the previous handlers back."""
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _feed_admin(engine: Engine, args: argparse.Namespace) -> None:
    given = [flag for flag in ("after", "consumer", "limit", "format") if getattr(args, flag) is not None]
    if given or args.follow:
        flags = ", ".join(f"--{flag}" for flag in [*given, *(["follow"] if args.follow else [])])
        raise InvalidInput(f"changes {args.changes_command} takes none of {flags}")
    if args.changes_command == "prune":
        pruned = engine.prune_changes(args.older_than)
        off = args.older_than is None and engine.settings.change_retention == 0
        note = " (change_retention is 0: every change is kept)" if off else ""
        _emit(args, {"pruned": pruned}, f"pruned {pruned} changes{note}")
    elif args.changes_command == "forget":
        engine.forget_consumer(args.name)
        _emit(args, {"forgotten": args.name}, f"consumer {_safe(args.name)} forgotten")
    elif args.changes_command == "webhook":
        _webhook(engine, args)
    else:
        _consumers(engine, args)


def _consumers(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    rows, urls = engine.consumers(), engine.webhook_urls()
    data = [{**to_plain(c), "position": str(c.position), "url": urls.get(c.name)} for c in rows]
    lines = [
        _safe(f"{c.name}  {c.position}  updated {c.updated_at.isoformat(timespec='seconds')}")
        + (f"  {_safe(urls[c.name])}" if c.name in urls else "")
        for c in rows
    ]
    _emit(args, data, "\n".join(lines) or "no consumers")


_SECRET = "LIFECYCLE_WEBHOOK_SECRET"
_PREVIOUS_SECRET = "LIFECYCLE_WEBHOOK_SECRET_PREVIOUS"


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
        delivered = engine.deliver_webhook(
            args.url, secret, stop=stop, nova=args.nova, previous_secrets=(previous,) if previous else ()
        )
    finally:
        restore()
    _emit(args, {"delivered": delivered}, f"delivered {delivered} changes to {_safe(args.url)}")


def _audit(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.feed import as_change, change_line
    from lifecycle.records import to_plain

    entries = engine.audit(
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
    _emit(args, data, "\n".join(_safe(change_line(as_change(e))) for e in entries) or "no audit rows")


def _host_line(h: Host) -> str:
    if h.vcpus is None:
        usage = "resources untracked"
    else:
        usage = f"vcpus {h.vcpus_used}/{h.vcpus} ram {h.memory_mb_used}/{h.memory_mb} MiB"
        usage += f" disk {h.disk_gb_used}/{h.disk_gb} GiB"
    state = "enabled" if h.enabled else "disabled"
    beat = h.last_heartbeat.isoformat(timespec="seconds") if h.last_heartbeat else "never"
    where = f"{_safe(h.name)}  {_safe(h.driver_uri)}  zone={_safe(h.availability_zone)}"
    fenced = ""
    if h.fenced_at is not None:
        at = h.fenced_at.isoformat(timespec="seconds")
        fenced = f"  FENCED by {_safe(h.fenced_by)} at {at}: {_safe(h.fenced_reason)}"
    return f"{where}  {state}  {usage}  heartbeat={beat}{fenced}"


def _image_line(i: Image) -> str:
    return f"{_safe(i.name)}  {i.disk_format}  {_safe(i.path)}"


def _hosts(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    command = args.host_command
    if command in _HOST_FAILURE_COMMANDS:
        _host_failure(engine, args)
        return
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
            console_address=args.console_address,
        )
    elif command == "list":
        hosts = engine.hosts()
        _emit(args, to_plain(hosts), "\n".join(_host_line(h) for h in hosts) or "no hosts")
        return
    elif command == "remove":
        orphaned = engine.remove_host(args.name, force=args.force)
        text = f"host {_safe(args.name)} removed" + "".join(f"\n{u}: error, no host" for u in orphaned)
        _emit(args, {"removed": args.name, "orphaned": orphaned}, text)
        return
    elif command in ("enable", "disable"):
        h = engine.set_host_enabled(args.name, command == "enable")
    elif command == "heartbeat":
        h = engine.heartbeat(args.name)
    else:
        h = engine.host(args.name)
    _emit(args, to_plain(h), _host_line(h))


def _admin(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    if args.command == "host":
        _hosts(engine, args)
    elif args.image_command == "cleanup":
        removed = engine.clean_image_cache(args.host, args.max_age)
        _emit(args, {"removed": removed}, "\n".join(f"removed {_safe(p)}" for p in removed) or "nothing to remove")
    elif args.image_command == "add":
        im = engine.add_image(
            args.name, args.path, args.disk_format, args.min_disk, _pairs(args.property, "--property")
        )
        _emit(args, to_plain(im), f"image {_safe(im.name)} added ({_safe(im.path)})")
    else:
        images = engine.images()
        _emit(args, to_plain(images), "\n".join(_image_line(i) for i in images) or "no images")


def _sync(engine: Engine, args: argparse.Namespace) -> int:
    """Print every host's pass, failed ones included; exit 1 when any host's pass failed."""
    import dataclasses

    summaries = engine.sync(args.host)
    lines = [_pass_line(s) for s in summaries]
    _emit(args, [dataclasses.asdict(s) for s in summaries], "\n".join(lines) or "no hosts")
    return 1 if any(s.error is not None for s in summaries) else 0


def _pass_line(s: PassSummary) -> str:
    if s.error is not None:
        return f"{_safe(s.host)}: pass failed: {_safe(s.error)}"
    return (
        f"{_safe(s.host)}: {s.instances} instances, {s.in_sync} in sync, {s.drifted} drifted, {s.acted} acted,"
        f" {s.skipped} skipped, {s.missing_unconfirmed} missing (unconfirmed), {s.lost_races} lost races,"
        f" {s.errors} errors, reaped: {', '.join(s.reaped) or 'none'},"
        f" unknown domains: {_safe(', '.join(s.unknown_domains) or 'none')}"
    )


def _recover(args: argparse.Namespace) -> None:
    from lifecycle.engine import Engine
    from lifecycle.recovery import vars_of
    from lifecycle.store.db import now

    if args.force and args.owner is None:
        raise InvalidInput("recover --force needs --owner NAME: it takes only that owner's live tasks")
    # Under a name of its own: the tasks it takes are then never taken again by a second `recover --force`
    # of the dead engine's name while this one still runs them.
    with Engine(args.db, settings=args.settings) as engine:
        results = engine.recover(force=args.force, owner=args.owner)
        waiting = engine.waiting_for_lease()
    lines = [
        _safe(f"{r.task_id} {r.operation} on {r.instance_uuid} at {r.task_state}: {r.plan} -> {r.outcome}")
        for r in results
    ] or ["no task to recover"]
    if waiting:
        first = min(t.lease_expires_at for t in waiting)
        note = (
            f"{len(waiting)} running task(s) still within their owner's lease, the first until"
            f" {first.isoformat(timespec='seconds')} (in {max(0.0, (first - now()).total_seconds()):.0f} s):"
            " recover takes a task once its lease has expired, or at once with --owner NAME --force when"
            " the engine that used NAME is known to be dead"
        )
        if args.json:
            print(note, file=sys.stderr)  # stdout stays the JSON list of recovered tasks
        else:
            lines.append(note)
    _emit(args, [vars_of(r) for r in results], "\n".join(lines))


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """Return the settings a command's own flags set (they win over the environment and the file)."""
    if args.command != "daemon":
        return {}
    named = {
        "interval": "sync_interval",
        "event_delay": "stopped_event_delay",
        "reclaim_instance_interval": "reclaim_instance_interval",
        "instance_build_timeout": "instance_build_timeout",
    }
    return {setting: getattr(args, flag) for flag, setting in named.items() if getattr(args, flag) is not None}


def _configure(args: argparse.Namespace) -> None:
    """Resolve the settings and the database URL: flags > environment > config file > defaults."""
    from lifecycle.configfile import load_settings
    from lifecycle.store import DEFAULT_DB_URL

    loaded = load_settings(args.config, overrides=_flags(args))
    args.settings = loaded.settings
    args.loaded = loaded
    if args.db is None:
        args.db = loaded.database_url or DEFAULT_DB_URL


def _config(args: argparse.Namespace) -> None:
    import dataclasses

    loaded: Loaded = args.loaded
    from lifecycle.store.db import shown_url

    shown = shown_url(args.db)  # never print a password
    values = _flat(dataclasses.asdict(loaded.settings)) | {"database_url": shown}
    sources = dict(loaded.sources)
    if args.db_from_flag:
        sources["database_url"] = "flag"
    rows = [{"key": k, "value": values[k], "source": sources.get(k, "default")} for k in sorted(values)]
    text = [f"# config file: {loaded.path or 'none'}"]
    text += [_safe(f"{r['key']} = {r['value']!r}  ({r['source']})") for r in rows]
    _emit(args, rows, "\n".join(text))


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = _plain(value)
    return flat


def _plain(value: Any) -> Any:
    """Return a setting's value as the config file would write it (enums as their values, tuples as lists)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return getattr(value, "value", value)


def _listen(text: str) -> tuple[str, int]:
    """Parse ``ADDR:PORT`` (``[v6addr]:PORT`` for IPv6) for --metrics-listen and --listen."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port) if port.isascii() and port.isdigit() else -1
    except ValueError:
        number = -1
    if not sep or not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be ADDR:PORT with an IP address, got {text[:60]!r}")
    return host, number


def _daemon(args: argparse.Namespace) -> None:
    from lifecycle.daemon import Daemon
    from lifecycle.engine import Engine

    with Engine(args.db, settings=args.settings) as engine:
        for name in args.hosts or ():
            engine.host(name)  # refuse a typo before claiming anything
        server = None
        if args.metrics_listen is not None:
            from prometheus_client import start_wsgi_server

            addr, port = args.metrics_listen
            try:
                server, _ = start_wsgi_server(port, addr=addr, registry=engine.metrics.registry)
            except OSError as exc:
                raise InvalidInput(f"--metrics-listen {addr}:{port}: {exc.strerror or exc}") from None
        daemon = Daemon(engine, hosts=args.hosts, claim_interval=args.claim_interval)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: daemon.stop.set())
        try:
            daemon.run()
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()


def _console_proxy(args: argparse.Namespace) -> None:
    from lifecycle.console_proxy import serve

    serve(args.db, args.settings, listen=args.listen)  # until SIGTERM or SIGINT


def _db(args: argparse.Namespace) -> None:
    from lifecycle.store import head_revision, upgrade
    from lifecycle.store.db import connect, current_revision, downgrade

    if args.db_command == "upgrade":
        upgrade(args.db, args.revision)
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


def _demo(args: argparse.Namespace) -> None:
    import drivers
    from lifecycle.demo import DemoHosts, run_demo

    for uri in (args.uri, args.remote_uri):
        if uri is not None:
            drivers.validate_uri(uri)
    if args.keep:
        try:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidInput(f"--keep {args.keep!r} cannot be used as a directory: {exc.strerror}") from None
    hosts = DemoHosts(args.uri, args.remote_uri, args.remote_instances)
    run_demo(args.keep, as_json=args.json, hosts=hosts)


def _graph(args: argparse.Namespace) -> None:
    as_json = args.format == "json" or args.json
    print(graph.to_json() if as_json else graph.to_mermaid(), end="\n" if as_json else "")


def _error(as_json: bool, exc: LifecycleError) -> int:
    # 1: the operation ran (or the hypervisor failed or did not answer, or a follower's database went away while
    # it ran): not input refused before anything changed.
    code = 1 if isinstance(exc, TaskFailed | Preempted | DriverError | DatabaseUnavailable) else 2
    message = _safe(exc)  # escapes newlines too: one line, whatever the message holds
    print(f"error: {message}", file=sys.stderr)  # first: it still reaches the user if stdout is gone
    if as_json:
        data: dict[str, Any] = {"error": type(exc).__name__, "message": message}
        if isinstance(exc, InvalidState):
            data |= {"allowed_vm_states": exc.allowed_vm_states, "allowed_task_states": exc.allowed_task_states}
        print(json.dumps(data, indent=2, sort_keys=True))
    return code


# -- host failure: fence, unfence, evacuate (issue 13) ---------------------------------

_HOST_FAILURE_COMMANDS = frozenset({"fence", "unfence", "evacuate"})
_DATA_LOSS = "rebuilt from its image: data on the dead host's disk is lost"


def _evacuate_parsers(sub: Any, host: Any, common: argparse.ArgumentParser, task_opts: argparse.ArgumentParser) -> None:
    """Add ``host fence``, ``host unfence``, ``host evacuate`` and ``evacuate``."""
    actor = {"type": _text("--actor"), "default": os.environ.get("USER") or "cli", "help": "who does it (recorded)"}
    fence = host.add_parser(
        "fence", help="declare a host dead: never scheduled to, evacuable once down", parents=[common]
    )
    fence.add_argument("name")
    fence.add_argument("--reason", required=True, type=_text("--reason", 1000))
    fence.add_argument("--actor", **actor)
    unfence = host.add_parser("unfence", help="lift a host's fence", parents=[common])
    unfence.add_argument("name")
    unfence.add_argument("--actor", **actor)
    evacuate_all = host.add_parser(
        "evacuate", help=f"evacuate every instance of a down, fenced host ({_DATA_LOSS})", parents=[common]
    )
    evacuate_all.add_argument("name")
    evacuate_all.add_argument("--actor", **actor)
    one = sub.add_parser(
        "evacuate", help=f"rebuild an instance of a down, fenced host elsewhere ({_DATA_LOSS})", parents=[task_opts]
    )
    one.add_argument("uuid")
    one.add_argument("--host", type=_text("--host"), help="destination (default: the scheduler picks)")


def _host_failure(engine: Engine, args: argparse.Namespace) -> None:
    import dataclasses

    from lifecycle.records import to_plain

    if args.host_command == "evacuate":
        results = engine.evacuate_host(args.name, actor=args.actor)
        lines = [
            f"{r.uuid} {r.outcome} now on {_safe(r.host or '-')}" + (f" ({_safe(r.detail)})" if r.detail else "")
            for r in results
        ]
        text = "\n".join([*lines, f"note: {_DATA_LOSS}"]) if lines else f"no instances on {_safe(args.name)}"
        _emit(
            args, {"host": args.name, "note": _DATA_LOSS, "instances": [dataclasses.asdict(r) for r in results]}, text
        )
        return
    if args.host_command == "fence":
        h = engine.fence_host(args.name, reason=args.reason, actor=args.actor)
    else:
        h = engine.unfence_host(args.name, actor=args.actor)
    _emit(args, to_plain(h), _host_line(h))


def _evacuate(engine: Engine, args: argparse.Namespace) -> None:
    task = engine.evacuate(
        args.uuid,
        host=args.host,
        request_id=args.request_id,
        idempotency_key=args.idempotency_key,
        wait=not args.no_wait,
        override_lock=args.force,
    )
    _task_result(engine, args, task)
    if not args.json:
        print(f"note: {_DATA_LOSS}")


_HANDLERS: dict[str, Callable[[Engine, argparse.Namespace], int | None]] = {
    "show": _read,
    "console": _read,
    "sync": _sync,
    "list": _read,
    "history": _read,
    "tasks": _read,
    "migration": _migrations,
    "host": _admin,
    "image": _admin,
    "lock": _duty,
    "unlock": _duty,
    "reset-state": _duty,
    "evacuate": _evacuate,
    "reclaim": _duty,
    "build-timeout": _duty,
    "offload-shelved": _duty,
    "changes": _changes,
    "audit": _audit,
}
_NO_LOGGING = frozenset({"graph"})
"""Commands that log nothing: they skip importing structlog, for a fast start."""
_NO_CONFIG = frozenset({"graph", "demo"})
"""Commands that read no settings (the demo makes its own)."""
_STANDALONE: dict[str, Callable[[argparse.Namespace], None]] = {
    "config": _config,
    "db": _db,
    "graph": _graph,
    "recover": _recover,
    "daemon": _daemon,
    "console-proxy": _console_proxy,
    "demo": _demo,
}


def _run(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except InvalidInput as exc:  # refused by the parser: --json may not have been read yet
        return _error("--json" in argv, exc)
    if args.command not in _NO_LOGGING:
        configure_logging(args.log_format, args.log_level)
    try:
        args.db_from_flag = args.db is not None
        if args.db_from_flag:  # the checks the environment's and the config file's URL get
            args.db = validation.database_url("--db", args.db)
        if args.command not in _NO_CONFIG:
            _configure(args)
        if args.command in _STANDALONE:
            _resume_gc()
            _STANDALONE[args.command](args)
            return 0
        from lifecycle.engine import Engine  # here: --help, graph and config show never import the engine

        if _relays(args):
            _await_database(args)
        with Engine(args.db, settings=args.settings) as engine:
            _resume_gc()
            return _HANDLERS.get(args.command, _run_op)(engine, args) or 0
    except LifecycleError as exc:
        return _error(args.json, exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    0 done, 1 an operation ran and failed or was taken over by another (or a sync pass failed on a host),
    2 input refused before anything changed, 141 the reader of stdout went
    away (see ``_BROKEN_PIPE``).
    """
    if argv is None:  # a process of its own (the ``lifecycle`` script), not a caller's
        _pause_gc()
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a closed pipe shows up here when the output fit the buffer
    except BrokenPipeError:
        _stdout_to_devnull()
        return _BROKEN_PIPE
    finally:
        _resume_gc()
    return code


_gc_paused = False
"""Whether :func:`_pause_gc` paused the collector and :func:`_resume_gc` has yet to resume it."""


def _pause_gc() -> None:
    """Pause the cyclic garbage collector while the command starts: imports, settings, the engine.

    They create a few hundred thousand objects that live as long as the
    process (modules, classes, SQLAlchemy's tables and compiled caches), and
    the collector walked them again and again as they piled up: about a
    sixth of ``lifecycle show``. Only a process of its own does this.
    """
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def _resume_gc() -> None:
    """Freeze what the start created (the collector never walks it again) and resume collecting."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


def _stdout_to_devnull() -> None:
    # Python's documented recipe (signal module, "Note on SIGPIPE"): point stdout at devnull so the
    # interpreter's final flush cannot fail again and print "Exception ignored ... BrokenPipeError".
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout has no descriptor: an in-process caller captured it
        pass


if __name__ == "__main__":
    sys.exit(main())
