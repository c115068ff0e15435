"""The CLI imports only what each command needs, so that it starts fast (issue 15 part 3).

Each case runs the command in a fresh interpreter, as ``lifecycle ...`` is
run, and then looks at ``sys.modules``: a module a command must not need is
a module it must not have loaded, whoever pulled it in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle import Engine, Flavor, upgrade

_PROBE = """
import json, sys
from lifecycle.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
sys.stdout.flush()
print("\\n" + json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""

_DATABASE = ("sqlalchemy", "sqlmodel", "alembic", "lifecycle.store", "lifecycle.engine")
"""Modules of the database layer: ``--help`` and ``graph`` need none of them."""
_NEVER_FOR_READS = (
    "alembic",  # schema migrations: only ``db``
    "sqlmodel",  # the tables are SQLAlchemy Core; sqlmodel is for lifecycle.models (embedders) and migrations
    "lifecycle.models",
    "pydantic_settings",  # no config file, no setting in the environment: the defaults need no parsing
    "lifecycle.drivers.libvirt",  # a read opens no driver
    "lifecycle.drivers.fake",
    "prometheus_client",  # the metrics are made when first used
    "rich",  # structlog's console renderer's tracebacks; JSON log lines never use them
)


def _modules(*argv: str, env: dict[str, str] | None = None) -> set[str]:
    """Run ``lifecycle ARGV`` in a fresh interpreter (stderr not a terminal); return the modules it loaded."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")} | (env or {})
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=environ, check=False, timeout=120
    )
    report = json.loads(done.stderr.rstrip().rsplit("\n", 1)[-1])
    assert report["code"] == 0, done.stderr
    return set(report["modules"])


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Return the modules of ``modules`` that are one of ``names`` or inside one of them."""
    return sorted(m for m in modules if any(m == n or m.startswith(f"{n}.") for n in names))


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A migrated SQLite database with a fake host and one instance; return (url, the instance's uuid)."""
    scratch = tmp_path_factory.mktemp("cli-imports")
    url = f"sqlite:///{scratch / 'cli.db'}"
    upgrade(url)
    image = scratch / "base.img"
    image.write_bytes(b"\0" * 512)
    with Engine(url) as engine:
        engine.hosts.add("h1", f"fake://{scratch / 'h1.json'}")
        engine.images.add("base", str(image))
        uuid = engine.create("vm1", host="h1", flavor=Flavor(1, 64, 1), image="base").instance_uuid
    return url, uuid


@pytest.mark.parametrize("argv", [("--help",), ("graph",), ("graph", "--format", "json")])
def test_help_and_graph_import_no_database_layer_and_no_logging(argv: tuple[str, ...]) -> None:
    """--help and graph load no SQLAlchemy, store, engine, structlog, transitions, nor dataclasses (inspect, ast)."""
    modules = _modules(*argv)
    heavy = ("structlog", "transitions", "pydantic", "prometheus_client", "lifecycle.drivers", "dataclasses", "inspect")
    assert _loaded(modules, (*_DATABASE, *heavy)) == []


@pytest.mark.parametrize("command", ["show", "list", "show-json", "list-json"])
def test_reads_import_no_migrations_drivers_metrics_or_settings_parser(database: tuple[str, str], command: str) -> None:
    """show and list (text or --json) load no alembic, sqlmodel, pydantic-settings, driver, prometheus or rich."""
    url, uuid = database
    verb, _, as_json = command.partition("-")
    argv = ["--db", url, verb, *([uuid] if verb == "show" else []), *(["--json"] if as_json else [])]
    assert _loaded(_modules(*argv), _NEVER_FOR_READS) == []


def test_operations_import_no_sqlmodel(database: tuple[str, str]) -> None:
    """Commands running operations through the engine (the hot path: stop, then start) load no sqlmodel, no lifecycle.models."""
    url, uuid = database
    for verb in ("stop", "start"):
        assert _loaded(_modules("--db", url, verb, uuid), ("sqlmodel", "lifecycle.models")) == [], verb


def test_a_setting_in_the_environment_is_still_read(database: tuple[str, str]) -> None:
    """With a setting in the environment the CLI parses it (pydantic-settings loaded): the shortcut is not blind."""
    url, _ = database
    modules = _modules("--db", url, "list", env={"LIFECYCLE_WORKERS": "2"})
    assert "pydantic_settings" in modules


def test_the_probe_sees_what_a_command_loads(tmp_path: Path) -> None:
    """db current loads alembic's neighbour, the store: the probe reports modules a command does load."""
    url = f"sqlite:///{tmp_path / 'probe.db'}"
    upgrade(url)
    assert _loaded(_modules("--db", url, "db", "current"), ("lifecycle.store", "sqlalchemy")) != []


def test_rich_stays_importable_after_structlog_was_loaded_without_it(database: tuple[str, str]) -> None:
    """Hiding rich while structlog loads for JSON log lines leaves it importable for anyone after."""
    pytest.importorskip("rich")
    url, _ = database
    script = f"from lifecycle.cli import main\nassert main(['--db', {url!r}, 'list']) == 0\nimport rich\nprint(rich.__name__)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120)
    assert done.stdout.splitlines()[-1:] == ["rich"], done.stderr


def test_the_script_pauses_the_collector_only_while_the_command_starts(database: tuple[str, str]) -> None:
    """`lifecycle` (main without argv) runs each command's work with the collector on, the start frozen."""
    url, _ = database
    script = f"""
import gc, sys
import lifecycle.cli as cli
from lifecycle.cli import demo, instances
seen = []
instances._list = lambda engine, args: seen.append(("list", gc.isenabled()))
demo._graph = lambda args: seen.append(("graph", gc.isenabled()))
for argv in (["--db", {url!r}, "list"], ["graph"]):
    sys.argv = ["lifecycle", *argv]
    assert cli.main() == 0
print(seen, gc.isenabled(), gc.get_freeze_count() > 0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120)
    assert done.stdout.strip() == "[('list', True), ('graph', True)] True True", done.stderr


def test_a_caller_of_main_keeps_its_collector_as_it_was(database: tuple[str, str]) -> None:
    """main(argv) called in-process (tests, embedders) neither pauses nor freezes the caller's collector."""
    url, _ = database
    script = f"""
import gc
from lifecycle.cli import main
assert main(["--db", {url!r}, "list"]) == 0
print(gc.isenabled(), gc.get_freeze_count())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120)
    assert done.stdout.split()[-2:] == ["True", "0"], done.stderr
