"""Ways out that keep the data (issue 23 items 4/5) and claims held by revived instances (item 6), on fake hosts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from lifecycle import Engine, Flavor, InvalidInput, InvalidState, PowerState, TaskFailed, VmState
from lifecycle.errors import DriverError, NoValidHost, Preempted
from lifecycle.states import MigrationStatus
from tests.conftest import FLAVOR, Fakes
from tests.images import fake_image
from tests.invariants import check_claims, check_invariants

V, P, MS = VmState, PowerState, MigrationStatus
SMALL, BIG = Flavor(1, 512, 1, name="small"), Flavor(2, 1024, 2, name="big")


@pytest.fixture
def cloud(db_url: str, fakes: Fakes) -> Iterator[Engine]:
    """Two fake hosts a and b with resources and heartbeats; instances start on a."""
    engine = Engine(db_url, driver_factory=fakes.factory)
    for name in ("a", "b"):
        engine.hosts.add(name, "fake://", vcpus=8, memory_mb=8192, disk_gb=80)
        engine.hosts.heartbeat(name)
    engine.images.add("cirros", fake_image("cirros"))
    yield engine
    check_invariants(engine.store)
    check_claims(engine.store)
    engine.close()


def _vm(cloud: Engine, host: str = "a") -> str:
    return cloud.create("vm", host=host, flavor=SMALL, image="cirros").instance_uuid


def _used(cloud: Engine) -> dict[str, int]:
    return {h.name: h.memory_mb_used for h in cloud.hosts.list()}


def _failed_move(cloud: Engine, fakes: Fakes, uuid: str) -> None:
    """Resize onto b, where the disk arrives but the guest does not start: the instance ends in error, move open."""
    b = fakes.factory(cloud.hosts.get("b"))
    b.faults.fail_after("finish_migration", DriverError("b could not start the guest", call="finish_migration"))
    with pytest.raises(TaskFailed):
        cloud.resize(uuid, BIG)
    if b.domain_exists(uuid):
        b.set_power(uuid, P.SHUTDOWN, event=False)  # defined there, never running
    assert cloud.get(uuid).vm_state is V.ERROR and fakes["a"].kept_disks() == [uuid]


# -- (a) revert_resize from error -----------------------------------------------------------


def test_a_move_that_failed_after_the_copy_is_reverted_onto_the_source(cloud: Engine, fakes: Fakes) -> None:
    """revert_resize of an error instance whose move failed after the copy puts it back on a, running, old flavor."""
    uuid = _vm(cloud)
    _failed_move(cloud, fakes, uuid)
    migration = cloud.store.moves.open_of(uuid)
    assert migration is not None
    cloud.revert_resize(uuid)
    i = cloud.get(uuid)
    assert (i.vm_state, i.task_state, i.host, i.flavor, i.power_state) == (V.ACTIVE, None, "a", SMALL, P.RUNNING)
    assert i.previous_vm_state is None and fakes["a"].get_info(uuid) is P.RUNNING
    assert fakes["a"].kept_disks() == [] and not fakes["b"].domain_exists(uuid)
    assert _used(cloud) == {"a": 512, "b": 0} and cloud.store.claims.of(uuid) == ["a"]
    assert cloud.store.moves.open_of(uuid) is None
    assert cloud.store.moves.get(migration.id).status is MS.ERROR  # it never finished: failed, now undone


def test_a_stopped_instance_whose_move_failed_is_reverted_stopped(cloud: Engine, fakes: Fakes) -> None:
    """A guest stopped before its failed move comes back stopped on a (vm_state and power), from the move's record."""
    uuid = _vm(cloud)
    cloud.stop(uuid)
    _failed_move(cloud, fakes, uuid)
    cloud.revert_resize(uuid)
    i = cloud.get(uuid)
    assert (i.vm_state, i.host, i.flavor, i.power_state) == (V.STOPPED, "a", SMALL, P.SHUTDOWN)
    assert fakes["a"].get_info(uuid) is P.SHUTDOWN and not fakes["b"].domain_exists(uuid)


def test_an_instance_whose_delete_failed_confirming_is_reverted(cloud: Engine, fakes: Fakes) -> None:
    """A resized instance whose delete failed at the confirm (error, move finished) goes back to a by revert_resize."""
    uuid = _vm(cloud)
    cloud.resize(uuid, BIG)
    fakes["a"].faults.fail_next("confirm_migration", DriverError("a refused", call="confirm_migration"))
    with pytest.raises(TaskFailed):
        cloud.delete(uuid)
    migration = cloud.store.moves.open_of(uuid)
    assert cloud.get(uuid).vm_state is V.ERROR and migration is not None and migration.status is MS.FINISHED
    with pytest.raises(InvalidState):
        cloud.confirm_resize(uuid)  # refused from error: the graph admits confirm from resized only
    cloud.revert_resize(uuid)
    i = cloud.get(uuid)
    assert (i.vm_state, i.host, i.flavor, i.power_state) == (V.ACTIVE, "a", SMALL, P.RUNNING)
    assert cloud.store.moves.get(migration.id).status is MS.REVERTED and _used(cloud) == {"a": 512, "b": 0}


def test_a_failed_move_refuses_other_operations_naming_revert(cloud: Engine, fakes: Fakes) -> None:
    """While the failed move is open, reviving operations are refused with a reason naming revert_resize; nothing changes."""
    uuid = _vm(cloud)
    _failed_move(cloud, fakes, uuid)
    before, tasks = cloud.get(uuid), cloud.tasks(uuid)
    for operation in ("reboot_hard", "rebuild", "stop", "rescue"):
        with pytest.raises(InvalidState, match=r"only revert_resize .*, delete and force_delete are possible"):
            cloud.run(operation, uuid)
    assert (cloud.get(uuid), cloud.tasks(uuid)) == (before, tasks)


def test_reset_state_of_a_failed_move_names_revert_not_confirm(cloud: Engine, fakes: Fakes) -> None:
    """reset-state refuses an error instance with a failed move open, pointing at revert-resize, never at confirm."""
    uuid = _vm(cloud)
    _failed_move(cloud, fakes, uuid)
    with pytest.raises(InvalidInput, match="has an open move") as refused:
        cloud.reset_state(uuid, reason="stuck?")
    assert "revert-resize" in str(refused.value) and "confirm" not in str(refused.value)


def test_revert_from_error_needs_an_open_move(cloud: Engine) -> None:
    """revert_resize of an error instance that has no open move is refused: there is nothing to revert."""
    uuid = _vm(cloud)
    cloud.reset_state(uuid, reason="broken by hand")
    before = cloud.get(uuid)
    with pytest.raises(InvalidState, match="nothing to revert"):
        cloud.revert_resize(uuid)
    assert cloud.get(uuid) == before


# -- (b) reset-state of an unshelve from shelved_offloaded ------------------------------------


def _stuck_unshelve(engine: Engine, fakes: Fakes, uuid: str) -> tuple[threading.Thread, list[BaseException]]:
    """Unshelve ``uuid`` onto h2 and hold it after its spawn there (the guest runs; its end is not written)."""
    gate = fakes.factory(engine.hosts.get("h2")).faults.hold("get_info")
    errors: list[BaseException] = []

    def unshelve() -> None:
        try:
            engine.unshelve(uuid, host="h2")
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=unshelve)
    worker.start()
    assert gate.wait_entered()
    assert engine.get(uuid).host == "h2" and fakes["h2"].domain_exists(uuid)
    worker.gate = gate  # type: ignore[attr-defined]
    return worker, errors


def test_reset_state_of_a_stuck_unshelve_returns_it_offloaded(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """reset-state of an unshelve stuck after its spawn ends shelved_offloaded: snapshot kept, no host, no claim."""
    uuid = new_instance()
    engine.shelve(uuid)
    snapshot = engine.store.images.find(f"shelved-{uuid}")
    assert snapshot is not None
    worker, errors = _stuck_unshelve(engine, fakes, uuid)
    i = engine.reset_state(uuid, reason="unshelve hung on h2")
    worker.gate.release()  # type: ignore[attr-defined]
    worker.join(10)
    assert len(errors) == 1 and isinstance(errors[0], Preempted)  # fenced: it writes nothing more
    i = engine.get(uuid)
    assert (i.vm_state, i.task_state, i.host, i.power_state) == (V.SHELVED_OFFLOADED, None, None, P.NOSTATE)
    assert engine.store.claims.of(uuid) == [] and engine.store.images.find(snapshot.name) is not None
    assert "leftover" in (engine.history(uuid)[-1].message or "")
    assert engine.hosts.destroy_evacuated("h2") == [uuid] and not fakes["h2"].domain_exists(uuid)  # the host's reaper
    engine.unshelve(uuid, host="h1")
    assert engine.get(uuid).vm_state is V.ACTIVE and engine.store.images.find(snapshot.name) is None


def test_reset_state_active_of_a_stuck_unshelve_is_refused(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """reset-state --active of an unshelve in flight is refused (no guest is known to run); nothing changes."""
    uuid = new_instance()
    engine.shelve(uuid)
    worker, _errors = _stuck_unshelve(engine, fakes, uuid)
    before = engine.get(uuid)
    with pytest.raises(InvalidInput, match="returns it to shelved_offloaded"):
        engine.reset_state(uuid, state=V.ACTIVE, reason="it runs, I think")
    assert engine.get(uuid) == before
    worker.gate.release()  # type: ignore[attr-defined]
    worker.join(10)
    assert engine.get(uuid).vm_state is V.ACTIVE


# -- (c) claims of revived instances ----------------------------------------------------------


def _error_without_claim(cloud: Engine, uuid: str) -> None:
    """Leave ``uuid`` in error on its host holding no claim, as a delete that failed after its release does."""
    cloud.reset_state(uuid, reason="a delete failed after releasing the claim")
    cloud.store.claims.release(uuid)
    assert cloud.store.claims.of(uuid) == []


@pytest.mark.parametrize("operation", ["reboot_hard", "rebuild", "rescue", "stop"])
def test_an_operation_reviving_an_error_instance_claims_first(cloud: Engine, operation: str) -> None:
    """Each operation from error on an instance holding no claim on its host takes it before running."""
    uuid = _vm(cloud)
    _error_without_claim(cloud, uuid)
    cloud.run(operation, uuid)
    assert cloud.store.claims.of(uuid) == ["a"] and _used(cloud)["a"] == SMALL.memory_mb


def test_a_revival_on_a_full_host_is_refused_and_writes_nothing(cloud: Engine) -> None:
    """With no room left on its host, reviving an error instance without a claim raises NoValidHost; nothing written."""
    uuid = _vm(cloud)
    _error_without_claim(cloud, uuid)
    cloud.store.hosts.update("a", memory_mb=SMALL.memory_mb)  # the room went to others meanwhile
    cloud.create("other", host="a", flavor=SMALL, image="cirros")
    before, tasks, history = cloud.get(uuid), cloud.tasks(uuid), cloud.history(uuid)
    with pytest.raises(NoValidHost, match="holds no claim on a"):
        cloud.reboot(uuid, hard=True)
    assert (cloud.get(uuid), cloud.tasks(uuid), cloud.history(uuid)) == (before, tasks, history)
    assert cloud.store.claims.of(uuid) == [] and _used(cloud)["a"] == SMALL.memory_mb
    cloud.delete(uuid)  # delete needs no room: it ends the instance wherever its claims are


def test_reset_state_active_claims_first(engine: Engine, new_instance: Callable[..., str]) -> None:
    """reset-state --active of an instance holding no claim on its host takes the claim with the state."""
    uuid = new_instance()
    engine.reset_state(uuid, reason="a delete failed after releasing the claim")
    engine.store.claims.release(uuid)
    engine.reset_state(uuid, state=V.ACTIVE, reason="checked: it runs")
    assert engine.store.claims.of(uuid) == ["h1"]
    assert engine.get(uuid).flavor == FLAVOR
