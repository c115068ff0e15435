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

The package, whose modules are all internal: :mod:`~lifecycle.cli.app` builds
the parser from the command groups and dispatches once, to the handler each
command's parser names; :mod:`~lifecycle.cli.args` holds the argument types,
:mod:`~lifecycle.cli.render` everything printed, :mod:`~lifecycle.cli.startup`
how a command starts (the collector paused, the engine opened) and
:mod:`~lifecycle.cli.logs` the logging set-up. One module per command group:
:mod:`~lifecycle.cli.operations` (create and every operation, from one
table), :mod:`~lifecycle.cli.instances`, :mod:`~lifecycle.cli.hosts`,
:mod:`~lifecycle.cli.images`, :mod:`~lifecycle.cli.duties`,
:mod:`~lifecycle.cli.feed` (changes and audit), :mod:`~lifecycle.cli.services`
(daemon, console proxy, sync, recover), :mod:`~lifecycle.cli.config` (db and
config) and :mod:`~lifecycle.cli.demo` (graph and demo). Each module imports
at its top only what ``--help`` needs; a command's handler imports the rest.
"""

from __future__ import annotations

from lifecycle.cli.app import main
from lifecycle.cli.logs import configure_logging

__all__ = ["configure_logging", "main"]
