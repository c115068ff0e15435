"""The parser, assembled from the command groups, and the one dispatch: ``args.handler(args)``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lifecycle import validation
from lifecycle.cli import config, demo, duties, feed, hosts, images, instances, operations, render, services
from lifecycle.cli.args import Parser, parents
from lifecycle.cli.logs import configure_logging
from lifecycle.cli.startup import pause_gc, resume_gc, with_translations_cached
from lifecycle.errors import DatabaseUnavailable, DriverError, InvalidInput, LifecycleError, Preempted, TaskFailed

if TYPE_CHECKING:
    import argparse

__all__ = ["main"]

_BROKEN_PIPE = 141
"""Exit status when whoever read stdout went away (``lifecycle list | head -1``): 128 + SIGPIPE, as a
Unix filter killed by the signal reports it, so ``set -o pipefail`` scripts see what they see for ``cat``."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    0 done, 1 an operation ran and failed or was taken over by another (or a sync pass failed on a host),
    2 input refused before anything changed, 141 the reader of stdout went
    away (see ``_BROKEN_PIPE``).
    """
    if argv is None:  # a process of its own (the ``lifecycle`` script), not a caller's
        pause_gc()
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a closed pipe shows up here when the output fit the buffer
    except BrokenPipeError:
        _stdout_to_devnull()
        return _BROKEN_PIPE
    finally:
        resume_gc()
    return code


def _run(argv: list[str]) -> int:
    try:
        args = with_translations_cached(_build_parser).parse_args(argv)
    except InvalidInput as exc:  # refused by the parser: --json may not have been read yet
        return _error(exc, as_json="--json" in argv)
    if args.logs:
        configure_logging(args.log_format, args.log_level)
    try:
        args.db_from_flag = args.db is not None
        if args.db_from_flag:  # the checks the environment's and the config file's URL get
            args.db = validation.database_url("--db", args.db)
        if args.reads_settings:
            _configure(args)
        return args.handler(args) or 0
    except LifecycleError as exc:
        return _error(exc, as_json=args.json)


def _build_parser() -> argparse.ArgumentParser:
    """Return the parser: global options, then each group's commands in the order ``--help`` has always listed."""
    common, task = parents()
    p = Parser(prog="lifecycle", description="Manage virtual machine instance lifecycles.")
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
    # What a command's parser may set otherwise: graph logs nothing, graph and demo read no settings,
    # the daemon's options set settings.
    p.set_defaults(logs=True, reads_settings=True, settings_from_options=())
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config.add_db(commands, common)
    hosts.add_parsers(commands, common)
    operations.add_evacuate(commands, task)
    images.add_parsers(commands, common)
    operations.add_parsers(commands, task)
    instances.add_console(commands, common)
    services.add_parsers(commands, common)
    duties.add_parsers(commands, common)
    config.add_config(commands, common)
    instances.add_reads(commands, common)
    feed.add_parsers(commands, common)
    instances.add_tasks_and_migrations(commands, common)
    services.add_console_proxy(commands, common)
    demo.add_parsers(commands, common)
    return p


def _configure(args: argparse.Namespace) -> None:
    """Resolve the settings and the database URL: options > environment > config file > defaults."""
    from lifecycle.configfile import load_settings
    from lifecycle.store import DEFAULT_DB_URL

    overrides: dict[str, Any] = {
        setting: getattr(args, option)
        for option, setting in args.settings_from_options
        if getattr(args, option) is not None
    }
    loaded = load_settings(args.config, overrides=overrides)
    args.settings = loaded.settings
    args.loaded = loaded
    if args.db is None:
        args.db = loaded.database_url or DEFAULT_DB_URL


def _error(exc: LifecycleError, *, as_json: bool) -> int:
    render.error(exc, as_json=as_json)
    # 1: the operation ran (or the hypervisor failed or did not answer, or a follower's database went away while
    # it ran): not input refused before anything changed.
    return 1 if isinstance(exc, TaskFailed | Preempted | DriverError | DatabaseUnavailable) else 2


def _stdout_to_devnull() -> None:
    # Python's documented recipe (signal module, "Note on SIGPIPE"): point stdout at devnull so the
    # interpreter's final flush cannot fail again and print "Exception ignored ... BrokenPipeError".
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout has no descriptor: an in-process caller captured it
        pass
