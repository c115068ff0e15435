"""Rebuild: a fresh disk on the same or a new image, same identity and host."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from lifecycle import graph, validation
from lifecycle.graph import Op
from lifecycle.registry import Definition, register
from lifecycle.states import TaskState, VmState
from lifecycle.tasks import TaskRun

__all__ = ["REBUILD"]


def rebuild(run: TaskRun) -> None:
    """Walk rebuilding -> rebuild_block_device_mapping -> rebuild_spawning.

    The old domain and disk are destroyed, then a new one is spawned, as
    Nova's manager does. Destroying is recorded as done once it completes, so
    a run resumed after a crash never destroys the new disk; spawning is
    repeat-safe (an existing domain is left as it is). A stopped instance is
    powered off again afterwards so it ends stopped.
    """
    run.advance(TaskState.REBUILD_BLOCK_DEVICE_MAPPING)  # the new overlay is made by the driver
    run.advance(TaskState.REBUILD_SPAWNING)
    host = run.instance.host
    assert host is not None
    # Everything of the instance there but what this task made (a resumed or stalled run never destroys the new
    # disk of another epoch); recorded done once it completed.
    run.once("old_disk_destroyed", lambda: run.clear_leftovers(host, why="rebuilding from the image"))
    run.ending.fields["disk"] = run.driver.spawn(replace(run.spec, disk=None), power_on=True)
    run.ending.fields["image"] = run.image.name
    if run.source_vm_state is VmState.STOPPED:
        run.power_off(timeout=0)


def params(given: Mapping[str, Any]) -> dict[str, Any]:
    """Check a rebuild's ``image``, if given: the image to rebuild on (default: the instance's own)."""
    checked = dict(given)
    if checked.get("image") is not None:
        checked["image"] = validation.name("image", checked["image"])
    return checked


REBUILD = register(Definition(graph.operation(Op.REBUILD), rebuild, params=params))
