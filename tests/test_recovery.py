"""Crash recovery: a crash at every step boundary of every operation, then recovery.

A crash is a SimulatedCrash (a BaseException nothing in the engine catches)
raised right after a committed write or right after a driver call. Then a
restarted engine with the same owner name recovers: every instance ends with
no task in flight, in the state the operation promises (or error for a
create that had no host and disk yet), with its disk and claims consistent.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import pytest

from lifecycle import Engine, Flavor, Outcome, VmState, graph
from lifecycle.clock import ManualClock
from lifecycle.drivers.fake import SimulatedCrash
from lifecycle.recovery import Plan, plan
from tests.conftest import Fakes, make_engine
from tests.invariants import check_invariants

V = VmState
SMALL = Flavor(1, 512, 1)

# operation -> (operations run first, driver call the steps make, vm_state after a resumed success)
OPERATIONS: dict[str, tuple[list[str], str, VmState]] = {
    "create": ([], "spawn", V.ACTIVE),
    "start": (["stop"], "power_on", V.ACTIVE),
    "stop": ([], "power_off", V.STOPPED),
    "force_stop": (["pause"], "power_off", V.STOPPED),
    "reboot": ([], "reboot", V.ACTIVE),
    "reboot_hard": (["stop"], "reboot", V.ACTIVE),
    "pause": ([], "pause", V.PAUSED),
    "unpause": (["pause"], "unpause", V.ACTIVE),
    "suspend": ([], "suspend", V.SUSPENDED),
    "resume": (["suspend"], "resume", V.ACTIVE),
    "rescue": ([], "rescue", V.RESCUED),
    "unrescue": (["rescue"], "unrescue", V.ACTIVE),
    "rebuild": (["stop"], "spawn", V.STOPPED),
    "delete": ([], "destroy", V.DELETED),
    "force_delete": ([], "destroy", V.DELETED),
    "soft_delete": ([], "power_off", V.SOFT_DELETED),
    "restore": (["soft_delete"], "power_on", V.ACTIVE),
    "resize": ([], "finish_migration", V.RESIZED),
    "migrate": (["stop"], "finish_migration", V.RESIZED),
    "confirm_resize": (["migrate"], "confirm_migration", V.ACTIVE),
    "revert_resize": (["migrate"], "finish_revert_migration", V.ACTIVE),
    "evacuate": (["stop"], "spawn", V.STOPPED),
    "shelve": ([], "snapshot", V.SHELVED_OFFLOADED),
    "shelve_offload": (["shelve"], "destroy", V.SHELVED_OFFLOADED),
    "unshelve": (["shelve"], "spawn_from_snapshot", V.ACTIVE),
}
KEEP_SHELVED = {"shelve_offload": 3600.0}
"""Operations that need a shelved instance kept on its host (``shelved_offload_time``) to start from."""
ROLLED_BACK_VM = {"create": V.ERROR}  # a rolled-back move keeps the instance as it was before


def _points(op: str) -> list[str]:
    steps = len(graph.operation(op).walk) - 1
    return ["begin", *(f"step{i}" for i in range(1, steps + 1)), "driver"]


CASES = [(op, point) for op in OPERATIONS for point in _points(op)]


def _crash_after_nth(store: object, method: str, n: int) -> None:
    """Make ``store.method`` (a store repository's) raise a SimulatedCrash right after its ``n``-th call commits."""
    original = getattr(store, method)
    calls = [0]

    @wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            raise SimulatedCrash(f"crash after {method} #{n}")
        return result

    setattr(store, method, wrapper)


@pytest.mark.parametrize(("op", "point"), CASES)
def test_crash_at_every_step_then_recover(one_owner: Callable[..., Engine], fakes: Fakes, op: str, point: str) -> None:
    """Crashing at this point leaves a running task; recovery finishes it consistently and loses no disk."""
    before, call, success = OPERATIONS[op]
    first = one_owner(shelved_offload_time=KEEP_SHELVED.get(op, 0.0))
    uuid = None
    if op != "create":
        uuid = first.create("vm", host="h1", flavor=SMALL, image="cirros").instance_uuid
        for step in before:
            first.run(step, uuid)
    if op == "evacuate":  # its host must be down and fenced
        first.store.hosts.update("h1", last_heartbeat=None)
        first.hosts.fence("h1", reason="dead", actor="test")
    if point == "begin":
        _crash_after_nth(first.store.writes, "create" if op == "create" else "begin", 1)
    elif point.startswith("step"):
        _crash_after_nth(first.store.writes, "advance", int(point[4:]))
    else:
        host = "h2" if call == "finish_migration" or op in ("evacuate", "unshelve") else "h1"  # the destination
        fakes.factory(first.hosts.get(host)).faults.crash_after(call)
    with pytest.raises(SimulatedCrash):
        if op == "create":
            first.create("vm", flavor=SMALL, image="cirros", uuid="00000000-0000-0000-0000-0000000000aa")
        else:
            assert uuid is not None
            if op == "resize":
                first.resize(uuid, Flavor(2, 1024, 2))
            elif op == "unshelve":
                first.unshelve(uuid, host="h2")
            else:
                first.run(op, uuid)
    uuid = uuid or "00000000-0000-0000-0000-0000000000aa"
    crashed = first.get(uuid)
    assert crashed.task_id is not None, "the crash should leave the task running"
    first.close()

    second = one_owner(shelved_offload_time=KEEP_SHELVED.get(op, 0.0))
    results = second.recover(force=True)
    assert [r.task_id for r in results] == [crashed.task_id]
    instance = second.get(uuid)
    assert (instance.task_state, instance.task_id) == (None, None)
    rolled_back = plan(op, crashed.task_state).plan is Plan.ROLL_BACK  # type: ignore[arg-type]
    before_vm = V.STOPPED if "stop" in before else V.ACTIVE
    assert instance.vm_state is (ROLLED_BACK_VM.get(op, before_vm) if rolled_back else success), results
    assert second.task(crashed.task_id).outcome is (Outcome.FAILED if rolled_back else Outcome.SUCCEEDED)
    fake = fakes.factory(second.hosts.get("h1"))
    if instance.vm_state in (V.DELETED, V.ERROR):
        assert not fake.domain_exists(uuid) and second.store.claims.of(uuid) == []
    elif instance.vm_state is V.SHELVED_OFFLOADED:  # on no host, its disk only in the snapshot image
        assert instance.host is None and second.store.claims.of(uuid) == []
        assert not any(fakes.factory(second.hosts.get(h)).domain_exists(uuid) for h in ("h1", "h2"))
        assert Path(second.store.images.get(f"shelved-{uuid}").path).read_text().startswith("image:")
    else:
        assert instance.host is not None
        here = fakes.factory(second.hosts.get(instance.host))
        assert here.domain_exists(uuid) and instance.host in second.store.claims.of(uuid)
        assert instance.power_state == here.get_info(uuid)
        held = sorted(second.store.claims.of(uuid))
        assert held == (["h1", "h2"] if instance.vm_state is V.RESIZED else [instance.host]), held
    assert any(r.cause == "recovery" for r in second.history(uuid))
    assert second.recover(force=True) == []
    check_invariants(second.store)
    second.close()


@pytest.mark.parametrize("call", ["remove", "spawn"])
def test_rebuild_resumed_after_a_crash_never_wipes_the_new_disk(
    one_owner: Callable[..., Engine], fakes: Fakes, call: str
) -> None:
    """A crash after the old disk went, or after the new one came: recovery ends with one new disk, kept."""
    first = one_owner()
    uuid = first.create("vm", flavor=SMALL, image="cirros").instance_uuid
    old_disk = fakes["h1"].disk_of(uuid)
    fakes["h1"].faults.crash_after(call)
    with pytest.raises(SimulatedCrash):
        first.rebuild(uuid)
    new_disk = fakes["h1"].disk_of(uuid) if call == "spawn" else None
    first.close()
    second = one_owner()
    second.recover(force=True)
    assert fakes["h1"].disk_of(uuid) != old_disk and second.get(uuid).vm_state is V.ACTIVE
    if new_disk is not None:
        assert fakes["h1"].disk_of(uuid) == new_disk
    second.close()


def test_an_expired_lease_is_recovered_by_another_engine(sqlite_url: str, fakes: Fakes, clock: ManualClock) -> None:
    """A task whose owner stopped renewing its lease is taken over by an engine with another name once the lease ran out."""
    first = make_engine(sqlite_url, fakes, clock=clock, lease_seconds=60.0, heartbeat_seconds=3600.0)
    uuid = first.create("vm", host="h1", flavor=SMALL, image="cirros").instance_uuid
    fakes["h1"].faults.crash_after("pause")
    with pytest.raises(SimulatedCrash):
        first.pause(uuid)
    other = make_engine(sqlite_url, fakes, clock=clock)
    assert other.recover() == []  # the lease still runs
    clock.advance(61)
    assert [r.outcome for r in other.recover()] == ["succeeded"]
    assert other.get(uuid).vm_state is V.PAUSED
    first.close()
    other.close()


def test_a_live_lease_is_left_alone(sqlite_url: str, fakes: Fakes) -> None:
    """A slow task whose owner still holds its lease is not touched by another engine."""
    first = make_engine(sqlite_url, fakes)
    uuid = first.create("vm", host="h1", flavor=SMALL, image="cirros").instance_uuid
    gate = fakes["h1"].faults.hold("pause")
    first.pause(uuid, wait=False)
    assert gate.wait_entered()
    other = make_engine(sqlite_url, fakes)
    assert other.recover() == []
    gate.release()
    first.runner.wait_idle()
    assert first.get(uuid).vm_state is V.PAUSED
    first.close()
    other.close()


@pytest.mark.parametrize("op", sorted(o.name for o in graph.OPERATIONS))
def test_every_task_state_has_a_recovery_plan(op: str) -> None:
    """Unlike Nova's fifteen unhandled states, every task_state of every operation has a verdict."""
    for state in graph.operation(op).walk:
        assert plan(op, state).plan in (Plan.RESUME, Plan.ROLL_BACK)


def test_a_build_resumed_after_its_worker_died_between_volume_and_domain_keeps_one_volume(
    one_owner: Callable[..., Engine], fakes: Fakes
) -> None:
    """A lost build that made its volume but no domain: the resumed build removes that volume and keeps only its own."""
    first = one_owner()
    fakes.factory(first.hosts.get("h1")).faults.crash_after("spawn")
    uuid = "00000000-0000-0000-0000-0000000000ab"
    with pytest.raises(SimulatedCrash):
        first.create("vm", host="h1", flavor=SMALL, image="cirros", uuid=uuid)
    fakes["h1"].undefine(uuid)  # as if the worker died after the volume was made, before the define
    lost = sorted(n for n in fakes["h1"].volumes() if n.startswith(uuid))
    assert len(lost) == 1
    first.close()
    second = one_owner()
    second.recover(force=True)
    instance = second.get(uuid)
    assert instance.vm_state is V.ACTIVE
    assert sorted(n for n in fakes["h1"].volumes() if n.startswith(uuid)) == [instance.disk]
    assert instance.disk not in lost
    assert any("resuming the build" in (e.message or "") for e in second.history(uuid))
    second.close()
