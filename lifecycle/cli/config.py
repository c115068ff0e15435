"""Where the engine keeps its state and how it is set: ``db`` (schema migrations) and ``config show``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lifecycle.cli.render import emit, safe
from lifecycle.cli.startup import command

if TYPE_CHECKING:
    import argparse

    from lifecycle.cli.args import Commands, Parser
    from lifecycle.configfile import Loaded

__all__ = ["add_config", "add_db"]


def add_db(commands: Commands, common: Parser) -> None:
    """Add ``db upgrade``, ``db current`` and ``db downgrade``."""
    db = commands.add_parser("db", help="schema migrations", parents=[common]).add_subparsers(
        dest="db_command", required=True
    )
    upgrade = db.add_parser("upgrade", help="upgrade the schema", parents=[common])
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(handler=command(_upgrade))
    db.add_parser("current", help="print the schema revision", parents=[common]).set_defaults(handler=command(_current))
    downgrade = db.add_parser("downgrade", help="downgrade the schema", parents=[common])
    downgrade.add_argument("revision", nargs="?", default="base")
    downgrade.set_defaults(handler=command(_downgrade))


def add_config(commands: Commands, common: Parser) -> None:
    """Add ``config show``."""
    config = commands.add_parser("config", help="the effective settings", parents=[common]).add_subparsers(
        dest="config_command", required=True
    )
    config.add_parser(
        "show", help="print every setting, its value and where it came from", parents=[common]
    ).set_defaults(handler=command(_show))


def _upgrade(args: argparse.Namespace) -> None:
    from lifecycle.store import upgrade

    upgrade(args.db, args.revision)
    _current(args)


def _downgrade(args: argparse.Namespace) -> None:
    from lifecycle.store.db import downgrade

    downgrade(args.db, args.revision)
    _current(args)


def _current(args: argparse.Namespace) -> None:
    from lifecycle.store import head_revision
    from lifecycle.store.db import connect, current_revision

    engine = connect(args.db)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    emit(args, {"revision": current, "head": head}, f"schema at {current or 'base'} (head {head})")


def _show(args: argparse.Namespace) -> None:
    import dataclasses

    from lifecycle.store.db import shown_url

    loaded: Loaded = args.loaded
    shown = shown_url(args.db)  # never print a password
    values = _flat(dataclasses.asdict(loaded.settings)) | {"database_url": shown}
    sources = dict(loaded.sources)
    if args.db_from_flag:
        sources["database_url"] = "flag"
    rows = [{"key": k, "value": values[k], "source": sources.get(k, "default")} for k in sorted(values)]
    text = [f"# config file: {loaded.path or 'none'}"]
    text += [safe(f"{r['key']} = {r['value']!r}  ({r['source']})") for r in rows]
    emit(args, rows, "\n".join(text))


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
