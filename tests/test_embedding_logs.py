"""Logging as an embedding application sees it: quiet unless configured, stdlib levels, the ids in every record.

Each case runs a small application in a fresh interpreter (logging is global
state): it configures logging its way, then creates an instance on a fake
host, stops and starts it, and runs a sync pass that fails (one warning). It
writes what its handler kept to ``kept.json``, so stdout and stderr hold only
what logging printed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from lifecycle.logs import LibraryLogger, LogEvent, get_logger

_APP = """
import json, logging, pathlib, sys
folder = pathlib.Path(sys.argv[1])
kept = []


class Kept(logging.Handler):
    def emit(self, record):
        if record.name.startswith("lifecycle."):
            kept.append({**{k: str(v) for k, v in vars(record).items()}, "message": record.getMessage()})


{setup}
from lifecycle import Engine, Flavor, upgrade

url = f"sqlite:///{folder / 'app.db'}"
upgrade(url)
image = folder / "base.img"
image.write_bytes(b"\\0" * 512)
with Engine(url) as engine:
    engine.hosts.add("h1", f"fake://{folder / 'h1.json'}")
    engine.images.add("base", str(image))
    engine.hosts.heartbeat("h1")
    created = engine.create("vm1", host="h1", flavor=Flavor(1, 64, 1), image="base", request_id="req-create")
    engine.stop(created.instance_uuid)
    engine.start(created.instance_uuid)
    engine.hosts.driver("h1").faults.fail_next("list_instances")
    engine.hosts.sync("h1")
report = {"uuid": created.instance_uuid, "task_id": created.id, "kept": kept}
(folder / "kept.json").write_text(json.dumps(report))
"""

_KEEP_EVERYTHING = """
logging.getLogger().addHandler(Kept())
logging.getLogger().setLevel(logging.DEBUG)
"""

_WARNING = (
    'WARNING:lifecycle.facade.hosts:sync_pass_failed host=h1 error="DriverError: injected failure in list_instances"'
)
"""The one line an application at WARNING sees: the failed sync pass."""


@dataclass
class Run:
    """What the application printed and what its handler kept."""

    stdout: str
    stderr: str
    uuid: str
    task_id: str
    kept: list[dict[str, str]]

    def events(self, name: str) -> list[dict[str, str]]:
        """Return the kept records of event ``name``."""
        return [r for r in self.kept if r.get("event") == name]


def run_app(tmp_path: Path, setup: str) -> Run:
    """Run the application with ``setup`` as its logging configuration; it must succeed."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
    done = subprocess.run(
        [sys.executable, "-c", _APP.replace("{setup}", setup), str(tmp_path)],
        capture_output=True,
        text=True,
        env=environ,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads((tmp_path / "kept.json").read_text())
    return Run(done.stdout, done.stderr, report["uuid"], report["task_id"], report["kept"])


def test_nothing_is_printed_without_logging_configured(tmp_path: Path) -> None:
    """With no logging configured, operations and a failed sync pass's warning print nothing on stdout or stderr."""
    run = run_app(tmp_path, "")
    assert (run.stdout, run.stderr) == ("", "")


def test_an_application_at_warning_sees_no_info_or_debug_lines(tmp_path: Path) -> None:
    """With ``logging.basicConfig(level=WARNING)`` only the warning is printed, readable, on stderr."""
    run = run_app(tmp_path, "logging.basicConfig(level=logging.WARNING)")
    assert (run.stdout, run.stderr.splitlines()) == ("", [_WARNING])


def test_a_debug_task_step_record_carries_the_ids_in_its_message_and_attributes(tmp_path: Path) -> None:
    """At DEBUG a task_step record of logger lifecycle.tasks names instance, task and request in text and attributes."""
    setup = 'logging.basicConfig(level=logging.DEBUG, format="%(name)s %(message)s")' + _KEEP_EVERYTHING
    run = run_app(tmp_path, setup)
    ids = {"instance_uuid": run.uuid, "task_id": run.task_id, "request_id": "req-create"}
    steps = run.events("task_step")
    assert steps, run.kept
    step = steps[0]
    assert {key: step[key] for key in ids} == ids
    assert (step["name"], step["module"], step["levelname"]) == ("lifecycle.tasks", "tasks", "DEBUG")
    assert all(f"{key}={value}" in step["message"] for key, value in ids.items()), step["message"]
    printed = [line for line in run.stderr.splitlines() if line.startswith("lifecycle.tasks task_step ")]
    assert printed and all(f"instance_uuid={run.uuid}" in line for line in printed), run.stderr


def test_an_application_structlog_chain_without_merge_contextvars_keeps_the_ids(tmp_path: Path) -> None:
    """An application's ``structlog.configure`` without merge_contextvars neither drops the ids nor prints our lines."""
    setup = (
        "import structlog\n"
        "structlog.configure(processors=[structlog.processors.JSONRenderer()])\n"
        'structlog.get_logger().info("app_line")\n' + _KEEP_EVERYTHING
    )
    run = run_app(tmp_path, setup)
    assert [json.loads(line) for line in run.stdout.splitlines()] == [{"event": "app_line"}]
    finished = run.events("operation_finished")
    assert [(r["operation"], r["instance_uuid"]) for r in finished] == [
        ("create", run.uuid),
        ("stop", run.uuid),
        ("start", run.uuid),
    ]
    assert finished[0]["task_id"] == run.task_id and finished[0]["request_id"] == "req-create"


def test_a_processor_formatter_renders_the_library_events_as_json(tmp_path: Path) -> None:
    """A root handler with structlog's ProcessorFormatter and JSONRenderer prints the library's events as JSON lines."""
    setup = """
import structlog
handler = logging.StreamHandler()
handler.setFormatter(structlog.stdlib.ProcessorFormatter(processors=[
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
    structlog.processors.JSONRenderer(),
]))
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
"""
    run = run_app(tmp_path, setup)
    lines = [line for line in map(json.loads, run.stderr.splitlines()) if line["logger"].startswith("lifecycle.")]
    created = next(line for line in lines if line["event"] == "operation_finished")
    assert created == created | {"logger": "lifecycle.execute", "level": "info", "operation": "create"}
    assert (created["instance_uuid"], created["task_id"], created["request_id"]) == (
        run.uuid,
        run.task_id,
        "req-create",
    )
    assert {line["event"] for line in lines} == {"operation_finished", "sync_pass_failed"}


def test_transitions_lines_are_hidden_from_an_application_at_info(tmp_path: Path) -> None:
    """With the root logger at INFO, the library's info lines show and none of the ``transitions`` package's."""
    run = run_app(tmp_path, 'logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")')
    names = {line.split(" ", 1)[0] for line in run.stderr.splitlines()}
    assert "lifecycle.execute" in names and "transitions.core" not in names, run.stderr


def test_a_level_the_application_set_on_transitions_is_kept(tmp_path: Path) -> None:
    """An application that set the ``transitions`` logger's level itself gets its lines: the library keeps out."""
    setup = (
        'logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")\n'
        'logging.getLogger("transitions").setLevel(logging.INFO)'
    )
    run = run_app(tmp_path, setup)
    assert any(line.startswith("transitions.core ") for line in run.stderr.splitlines()), run.stderr


def test_a_disabled_level_runs_no_processor() -> None:
    """A call at a level the stdlib logger is not enabled for builds no event dict: no processor runs."""
    ran: list[str] = []

    def processor(_logger: Any, _method: str, event_dict: Any) -> Any:
        ran.append(event_dict["event"])
        return (str(event_dict),), {}

    stdlib = logging.getLogger("lifecycle.tests.disabled")
    stdlib.setLevel(logging.WARNING)
    log = LibraryLogger(stdlib, [processor], {})
    with structlog.contextvars.bound_contextvars(request_id="req-1"):
        log.debug("below")
        log.info("below")
        log.warning("above")
    assert ran == ["above"]


def test_an_event_prints_as_its_name_then_key_value_pairs() -> None:
    """An event's message is its name then key=value pairs, values with spaces or quotes quoted and escaped."""
    event = LogEvent(event="sync_pass_failed", host="h1", count=2, error='DriverError: "x"', empty="")
    assert str(event) == 'sync_pass_failed host=h1 count=2 error="DriverError: \\"x\\"" empty=""'


class _Records(logging.Handler):
    """Keep the records it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_key_a_log_record_already_has_is_an_attribute_with_a_trailing_underscore() -> None:
    """A key such as ``message`` or ``thread`` is the record's ``message_`` or ``thread_``; the record's own stay."""
    handler = _Records()
    stdlib = logging.getLogger("lifecycle.tests.clash")
    stdlib.setLevel(logging.INFO)
    stdlib.addHandler(handler)
    try:
        get_logger("lifecycle.tests.clash").info("task_step", message="scheduled to h1", thread="worker-1", seq=2)
    finally:
        stdlib.removeHandler(handler)
    (record,) = handler.records
    assert [getattr(record, key) for key in ("message_", "thread_", "seq")] == ["scheduled to h1", "worker-1", 2]
    assert (
        record.thread != "worker-1"
        and record.getMessage() == 'task_step message="scheduled to h1" thread=worker-1 seq=2'
    )
