"""Logging: every line of an operation carries its ids; one summary line per operation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lifecycle import Engine, TaskFailed
from tests.conftest import Fakes, all_logs


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Capture the library's log events (contextvars merged by its own chain), as the CLI's handler gets them."""
    with all_logs() as captured:
        yield captured


def test_every_operation_line_carries_instance_task_and_request_ids(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str], events: list[dict[str, Any]]
) -> None:
    """Step lines and summary lines of an operation all name the instance, the task and the request."""
    uuid = new_instance()
    engine.reboot(uuid, request_id="req-abc")
    fakes["h1"].faults.fail_next("pause")
    with pytest.raises(TaskFailed):
        engine.pause(uuid)
    for event in events:
        assert {"instance_uuid", "task_id", "request_id"} <= event.keys(), event
    reboot_lines = [e for e in events if e["request_id"] == "req-abc"]
    assert [e["event"] for e in reboot_lines] == ["task_step", "task_step", "operation_finished"]


def test_one_summary_line_per_operation(
    engine: Engine, new_instance: Callable[..., str], events: list[dict[str, Any]]
) -> None:
    """Each finished operation logs exactly one operation_finished line with its outcome."""
    uuid = new_instance()
    engine.stop(uuid)
    engine.start(uuid)
    summaries = [e for e in events if e["event"] == "operation_finished"]
    assert [(e["operation"], e["outcome"]) for e in summaries] == [
        ("create", "succeeded"),
        ("stop", "succeeded"),
        ("start", "succeeded"),
    ]
