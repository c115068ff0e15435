"""One record per operation: a throwaway operation, defined only here, runs end to end, is recovered and is preempted.

The operation ``tune`` is a row of the operations table and a definition
(steps, preparation, roll-back, extra guard, parameter schema), both made
in this file and registered for the test alone: nothing else in the tree
names it. It walks rebuilding -> rebuild_block_device_mapping on an active
or stopped instance, powers the guest on (repeat-safe) and ends active.
That the engine runs it through the same runner, recovery and preemption as
its own operations is the proof that an operation lives in one place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from functools import wraps
from typing import Any

import pytest

from lifecycle import (
    Engine,
    Flavor,
    InvalidInput,
    InvalidState,
    Outcome,
    PowerState,
    Preempted,
    TaskState,
    VmState,
    graph,
    preemption,
)
from lifecycle.drivers.fake import SimulatedCrash
from lifecycle.errors import InstanceLocked
from lifecycle.registry import Call, Definition, registered
from lifecycle.tasks import TaskRun
from tests.conftest import FLAVOR, Fakes
from tests.invariants import check_invariants

T, V = TaskState, VmState

ROW = graph.Operation(
    "tune",
    frozenset({V.ACTIVE, V.STOPPED}),
    (T.REBUILDING, T.REBUILD_BLOCK_DEVICE_MAPPING),
    V.ACTIVE,
    PowerState.RUNNING,
    note="A test's operation: proves an operation is its row and its definition, nothing else.",
)


class Seen:
    """What the tune definition's hooks did, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []


def _definition(seen: Seen) -> Definition:
    def tune(run: TaskRun) -> None:
        run.advance(T.REBUILD_BLOCK_DEVICE_MAPPING, f"tuned to level {run.params['level']}")
        run.driver.power_on(run.spec)
        seen.calls.append(("steps", run.instance.uuid))

    def prepare(run: TaskRun) -> None:
        seen.calls.append(("prepare", "recovering" if run.recovering else "starting"))

    def roll_back(run: TaskRun) -> None:
        seen.calls.append(("roll_back", run.instance.uuid))

    def guard(call: Call) -> None:
        if call.params["level"] > 4 * call.instance.flavor.vcpus:
            raise InvalidInput(f"level {call.params['level']} is beyond {4 * call.instance.flavor.vcpus} vCPUs' reach")

    def params(given: Mapping[str, Any]) -> dict[str, Any]:
        level = given.get("level")
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 10:
            raise InvalidInput(f"level must be an integer from 1 to 10, got {level!r}")
        return {"level": level}

    return Definition(
        ROW,
        tune,
        prepare=prepare,
        roll_back=roll_back,
        roll_back_in={T.REBUILDING: "crashed before tuning began: nothing to resume"},
        guard=guard,
        params=params,
    )


@pytest.fixture
def seen() -> Iterator[Seen]:
    """The tune operation registered for the test (row and definition), and what its hooks did; gone afterwards."""
    record = Seen()
    with registered(_definition(record)):
        yield record
    assert all(op.name != "tune" for op in graph.rows()), "the test's row outlived the test"


def test_a_registered_operation_runs_end_to_end(engine: Engine, fakes: Fakes, seen: Seen) -> None:
    """The table's guard, the schema, the extra guard, the lock, the preparation and the steps all apply to it."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    engine.stop(uuid)
    for bad, error in (({"level": 0}, "from 1 to 10"), ({"level": 5}, "beyond 4 vCPUs")):
        with pytest.raises(InvalidInput, match=error):
            engine.run("tune", uuid, params=bad)
    engine.lock(uuid, reason="maintenance", actor="ops")
    with pytest.raises(InstanceLocked):
        engine.run("tune", uuid, params={"level": 2})
    engine.unlock(uuid, actor="ops")
    assert [e for e in engine.history(uuid) if e.operation == "tune"] == [] and len(engine.tasks(uuid)) == 2

    task = engine.run("tune", uuid, params={"level": 2})
    after = engine.get(uuid)
    assert (task.operation, task.outcome, task.params) == ("tune", Outcome.SUCCEEDED, {"level": 2})
    assert (after.vm_state, after.task_state, after.power_state) == (V.ACTIVE, None, PowerState.RUNNING)
    assert fakes["h1"].get_info(uuid) is PowerState.RUNNING
    walked = [(e.to_task_state, e.message) for e in engine.history(uuid) if e.task_id == task.id]
    assert walked == [(T.REBUILDING, None), (T.REBUILD_BLOCK_DEVICE_MAPPING, "tuned to level 2"), (None, None)]
    assert seen.calls == [("prepare", "starting"), ("steps", uuid)]
    assert '"operation": "tune"' in graph.to_json()
    engine.pause(uuid)
    with pytest.raises(InvalidState, match="tune"):  # the row's guard: not from paused
        engine.run("tune", uuid, params={"level": 2})


def _crash_after_first(engine: Engine, method: str) -> None:
    """Make the engine's next ``store.writes.<method>`` commit, then die there (a SimulatedCrash nothing catches)."""
    original = getattr(engine.store.writes, method)

    @wraps(original)
    def crash(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        setattr(engine.store.writes, method, original)
        raise SimulatedCrash(f"crash after {method}")

    setattr(engine.store.writes, method, crash)


@pytest.mark.parametrize(("where", "resumed"), [("begin", False), ("advance", True)], ids=["rolled-back", "resumed"])
def test_a_registered_operation_killed_mid_way_is_recovered(
    one_owner: Callable[..., Engine], fakes: Fakes, seen: Seen, where: str, resumed: bool
) -> None:
    """Killed in its first task_state it is rolled back by its own hook; killed later it is resumed to its end."""
    first = one_owner()
    uuid = first.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    first.stop(uuid)
    _crash_after_first(first, where)
    with pytest.raises(SimulatedCrash):
        first.run("tune", uuid, params={"level": 1})
    crashed = first.get(uuid)
    assert crashed.task_state is (T.REBUILD_BLOCK_DEVICE_MAPPING if resumed else T.REBUILDING)
    first.close()

    second = one_owner()
    (result,) = second.recover(force=True)
    instance = second.get(uuid)
    assert (result.operation, result.plan) == ("tune", "resume" if resumed else "roll_back")
    assert (instance.task_state, instance.task_id) == (None, None)
    assert second.task(crashed.task_id).outcome is (Outcome.SUCCEEDED if resumed else Outcome.FAILED)  # type: ignore[arg-type]
    if resumed:
        assert (instance.vm_state, fakes["h1"].get_info(uuid)) == (V.ACTIVE, PowerState.RUNNING)
        assert seen.calls[-2:] == [("prepare", "recovering"), ("steps", uuid)]
    else:  # the guest is as it was: the vm_state is kept, by the row's failure rule
        assert (instance.vm_state, fakes["h1"].get_info(uuid)) == (V.STOPPED, PowerState.SHUTDOWN)
        assert seen.calls[-2:] == [("prepare", "recovering"), ("roll_back", uuid)]
    check_invariants(second.store)
    second.close()


def test_a_registered_operation_is_preempted_by_delete(engine: Engine, fakes: Fakes, seen: Seen) -> None:
    """A delete takes it over mid-call; its late driver call is destroyed again (the delete row's class)."""
    assert preemption.rule("delete", "tune") is preemption.Rule.DESTROY_LATE
    assert ("force_delete", "tune") in preemption.pairs()
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    engine.stop(uuid)
    gate = fakes["h1"].faults.hold("power_on")
    errors: list[BaseException] = []

    def tune() -> None:
        try:
            engine.run("tune", uuid, params={"level": 1})
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=tune)
    worker.start()
    assert gate.wait_entered()
    tuning = engine.get(uuid).task_id
    deleted = engine.delete(uuid)
    gate.release()
    worker.join(10)
    assert not worker.is_alive() and len(errors) == 1 and isinstance(errors[0], Preempted)
    assert engine.task(tuning).outcome is Outcome.PREEMPTED  # type: ignore[arg-type]
    after = engine.get(uuid)
    assert (after.vm_state, after.task_state, deleted.outcome) == (V.DELETED, None, Outcome.SUCCEEDED)
    assert not fakes["h1"].domain_exists(uuid) and engine.store.claims.of(uuid) == []
    check_invariants(engine.store)


def test_a_row_that_breaks_the_table_is_refused() -> None:
    """Registering a row is checked as the table is: one that preempts tasks without a preemption class is refused."""
    greedy = ROW._replace(name="greedy", allowed_task_states=graph.ANY_TASK)
    with pytest.raises(ValueError, match="greedy preempts tasks but has no preemption class"):
        graph.register(greedy)
    assert all(op.name != "greedy" for op in graph.rows())


def test_the_engine_own_operations_all_have_a_definition() -> None:
    """Every row of the table has its definition, registered by its module (a resize's flavor keeps its specs)."""
    from lifecycle import operations, registry

    assert {d.name for d in registry.definitions()} >= {op.name for op in graph.OPERATIONS}
    flavor = Flavor(2, 128, 2, extra_specs=(("capabilities:ssd", "true"),))
    resize = operations.definition("resize")
    assert Flavor.from_dict(resize.params({"flavor": flavor.as_dict()})["flavor"]) == flavor
