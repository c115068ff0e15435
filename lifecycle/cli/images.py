"""``lifecycle image ...``: register and list images, clean a host's image cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lifecycle import validation
from lifecycle.cli.args import count, number, pairs
from lifecycle.cli.render import emit, image_line, safe
from lifecycle.cli.startup import engine_command

if TYPE_CHECKING:
    import argparse

    from lifecycle.cli.args import Commands, Parser
    from lifecycle.engine import Engine

__all__ = ["add_parsers"]


def add_parsers(commands: Commands, common: Parser) -> None:
    """Add ``image`` and its commands."""
    image = commands.add_parser("image", help="images", parents=[common]).add_subparsers(
        dest="image_command", required=True
    )
    add = image.add_parser("add", help="register an image file", parents=[common])
    add.add_argument("name")
    add.add_argument("--path", required=True, help="absolute path of an existing image file")
    add.add_argument("--format", default="qcow2", dest="disk_format", choices=("qcow2", "raw"))
    add.add_argument("--min-disk", type=count("--min-disk"), default=0, help="minimum root disk in GiB")
    add.add_argument(
        "--property", action="append", default=[], metavar="KEY=VALUE", help="architecture=..., repeatable"
    )
    add.set_defaults(handler=engine_command(_add))
    image.add_parser("list", help="list images", parents=[common]).set_defaults(handler=engine_command(_list))
    clean = image.add_parser("cleanup", help="remove a host's unused cached base images", parents=[common])
    clean.add_argument("--host", required=True)
    clean.add_argument(
        "--max-age", type=number("--max-age", validation.seconds), help="seconds (default: the setting, 86400)"
    )
    clean.set_defaults(handler=engine_command(_cleanup))


def _add(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    im = engine.images.add(args.name, args.path, args.disk_format, args.min_disk, pairs(args.property, "--property"))
    emit(args, to_plain(im), f"image {safe(im.name)} added ({safe(im.path)})")


def _list(engine: Engine, args: argparse.Namespace) -> None:
    from lifecycle.records import to_plain

    images = engine.images.list()
    emit(args, to_plain(images), "\n".join(image_line(i) for i in images) or "no images")


def _cleanup(engine: Engine, args: argparse.Namespace) -> None:
    removed = engine.images.clean_cache(args.host, args.max_age)
    emit(args, {"removed": removed}, "\n".join(f"removed {safe(p)}" for p in removed) or "nothing to remove")
