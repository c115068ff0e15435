"""Engine.list: filters (host, vm_state, status, project), keyset pages by (created_at, uuid), typed refusals."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lifecycle import Engine, InvalidInput, VmState
from tests.conftest import FLAVOR, Fakes


def _make(engine: Engine, name: str, host: str, project: str | None = None) -> str:
    return engine.create(name, flavor=FLAVOR, image="cirros", host=host, project_id=project).instance_uuid


def test_filters_select_by_host_vm_state_status_and_project(engine: Engine, fakes: Fakes) -> None:
    """Each filter keeps only the matching instances, combined filters all hold, and deleted ones need include_deleted."""
    a = _make(engine, "a", "h1", "p1")
    b = _make(engine, "b", "h2", "p1")
    c = _make(engine, "c", "h1", "p2")
    d = _make(engine, "d", "h2")
    engine.stop(b)
    engine.delete(d)
    gate = fakes["h1"].faults.hold("reboot")
    engine.reboot(c, wait=False)
    assert gate.wait_entered()
    try:
        assert [i.uuid for i in engine.list("h1")] == [a, c]
        assert [i.uuid for i in engine.list(vm_state=VmState.STOPPED)] == [b]
        assert [i.uuid for i in engine.list(vm_state="active")] == [a, c]
        assert [i.uuid for i in engine.list(status="ACTIVE")] == [a]  # c is ACTIVE with a reboot: REBOOT
        assert [i.uuid for i in engine.list(status="REBOOT")] == [c]
        assert [i.uuid for i in engine.list(status="SHUTOFF")] == [b]
        assert [i.uuid for i in engine.list(project_id="p1")] == [a, b]
        assert [i.uuid for i in engine.list("h1", project_id="p1", status="ACTIVE")] == [a]
        assert engine.list(status="DELETED") == []
        assert [i.uuid for i in engine.list(status="DELETED", include_deleted=True)] == [d]
    finally:
        gate.release()
        engine.runner.wait_idle()


def test_pages_walk_every_instance_once_in_creation_order(engine: Engine, new_instance: Callable[..., str]) -> None:
    """Pages of ``limit`` after each page's last uuid give every instance once, oldest first, and an empty last page."""
    made = [new_instance(f"vm{n}") for n in range(5)]
    expected = [i.uuid for i in sorted(engine.list(), key=lambda i: (i.created_at, i.uuid))]
    assert sorted(expected) == sorted(made)
    pages, marker = [], None
    while True:
        page = engine.list(limit=2, marker=marker)
        pages.append([i.uuid for i in page])
        if not page:
            break
        marker = page[-1].uuid
    assert pages == [expected[0:2], expected[2:4], expected[4:5], []]
    engine.delete(expected[1])  # a marker deleted since its page was read still marks the place
    assert [i.uuid for i in engine.list(limit=2, marker=expected[1])] == expected[2:4]


def test_a_marker_of_another_project_is_not_found(engine: Engine) -> None:
    """A project's listing refuses a marker of another project's instance as unknown (no cross-project oracle)."""

    def make(name: str, project: str) -> str:
        return engine.create(name, host="h1", flavor=FLAVOR, image="cirros", project_id=project).instance_uuid

    b0, a, b1 = make("b0", "B"), make("a", "A"), make("b1", "B")
    for other in (b0, b1):  # older and newer than project A's instance
        with pytest.raises(InvalidInput, match=f"marker {other} is not a known instance"):
            engine.list(project_id="A", marker=other)
    assert [i.uuid for i in engine.list(project_id="B", marker=b0)] == [b1]
    assert [i.uuid for i in engine.list(marker=b0)] == [a, b1]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"limit": 0}, "limit must be an integer from 1 to 1000"),
        ({"limit": 1001}, "limit must be an integer from 1 to 1000"),
        ({"limit": True}, "limit must be an integer"),
        ({"marker": "not-a-uuid"}, "invalid marker uuid"),
        ({"marker": "00000000-0000-0000-0000-000000000000"}, "is not a known instance"),
        ({"status": "RUNNING"}, "unknown status 'RUNNING'"),
        ({"vm_state": "on"}, "unknown vm_state 'on'"),
        ({"project_id": ""}, "invalid project_id name"),
        ({"include_deleted": "yes"}, "include_deleted must be True or False"),
    ],
)
def test_bad_filters_and_pages_are_refused(
    engine: Engine, new_instance: Callable[..., str], kwargs: dict[str, object], needle: str
) -> None:
    """A bad limit, marker, status, vm_state, project or flag raises InvalidInput saying which."""
    new_instance()
    with pytest.raises(InvalidInput, match=needle):
        engine.list(**kwargs)  # type: ignore[arg-type]
