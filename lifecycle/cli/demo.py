"""Showing the engine: ``graph`` (the state graph, no database) and ``demo`` (a story on a scratch database)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lifecycle import graph
from lifecycle.cli.startup import command
from lifecycle.errors import InvalidInput

if TYPE_CHECKING:
    import argparse

    from lifecycle.cli.args import Commands, Parser

__all__ = ["add_parsers"]


def add_parsers(commands: Commands, common: Parser) -> None:
    """Add ``graph`` and ``demo``: neither reads the settings; ``graph`` logs nothing, for a fast start."""
    gr = commands.add_parser("graph", help="print the state graph", parents=[common])
    gr.add_argument("--format", choices=("mermaid", "json"), default="mermaid")
    gr.set_defaults(handler=command(_graph), logs=False, reads_settings=False)
    demo = commands.add_parser("demo", help="run a demonstration on a scratch database", parents=[common])
    demo.add_argument("--keep", help="directory to keep the demo's database and hypervisor state in")
    demo.add_argument("--uri", help="libvirt URI for compute-1 (e.g. qemu:///system); without it, a fake host")
    demo.add_argument("--remote-uri", help="libvirt URI of a second hypervisor to resize onto (qemu+tcp://...)")
    demo.add_argument(
        "--remote-instances", default="/var/lib/libvirt/lifecycle/demo", help="instances path on that hypervisor"
    )
    demo.set_defaults(handler=command(_demo), reads_settings=False)  # the demo makes its own


def _graph(args: argparse.Namespace) -> None:
    as_json = args.format == "json" or args.json
    print(graph.to_json() if as_json else graph.to_mermaid(), end="\n" if as_json else "")


def _demo(args: argparse.Namespace) -> None:
    from lifecycle import drivers
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
