"""Cold migrate, resize, confirm and revert through the engine on fake hosts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lifecycle import Engine, Flavor, InvalidInput, InvalidState, PowerState, TaskFailed, VmState
from lifecycle.errors import DriverError, DriverUnavailable
from lifecycle.states import MigrationStatus, TaskState
from tests.conftest import Fakes
from tests.images import fake_image
from tests.invariants import check_invariants

V, P = VmState, PowerState
SMALL, BIG = Flavor(1, 512, 1, name="small"), Flavor(2, 1024, 2, name="big")


@pytest.fixture
def cloud(db_url: str, fakes: Fakes) -> Iterator[Engine]:
    """Two fake hosts with resources and heartbeats; an instance starts on a."""
    engine = Engine(db_url, driver_factory=fakes.factory)
    for name in ("a", "b"):
        engine.hosts.add(name, "fake://", vcpus=8, memory_mb=8192, disk_gb=80)
        engine.hosts.heartbeat(name)
    engine.images.add("cirros", fake_image("cirros"))
    yield engine
    check_invariants(engine.store)
    engine.close()


def _vm(cloud: Engine) -> str:
    return cloud.create("vm", host="a", flavor=SMALL, image="cirros").instance_uuid


def _used(cloud: Engine) -> dict[str, int]:
    return {h.name: h.memory_mb_used for h in cloud.hosts.list()}


def test_resize_moves_grows_and_waits_for_confirm(cloud: Engine, fakes: Fakes) -> None:
    """Resize walks prep/migrating/migrated/finish, ends VERIFY_RESIZE on b with the new flavor and claims on both hosts."""
    uuid = _vm(cloud)
    task = cloud.resize(uuid, BIG)
    i = cloud.get(uuid)
    assert (i.status, i.host, i.flavor.memory_mb, i.power_state) == ("VERIFY_RESIZE", "b", 1024, P.RUNNING)
    assert [s.name for s in cloud.steps(task.id)] == [
        "resize_prep",
        "resize_migrating",
        "resize_migrated",
        "resize_finish",
    ]
    assert _used(cloud) == {"a": 512, "b": 1024} and sorted(cloud.store.claims.of(uuid)) == ["a", "b"]
    assert fakes["a"].kept_disks() == [uuid] and not fakes["a"].domain_exists(uuid)
    migration = cloud.store.moves.get(cloud.store.moves.open_of(uuid).id)  # type: ignore[union-attr]
    assert (migration.status, migration.source_host, migration.dest_host) == (MigrationStatus.FINISHED, "a", "b")


def test_confirm_cleans_the_source(cloud: Engine, fakes: Fakes) -> None:
    """Confirm deletes the source's kept disk, releases its claim and ends active."""
    uuid = _vm(cloud)
    cloud.resize(uuid, BIG)
    cloud.confirm_resize(uuid)
    assert (cloud.get(uuid).vm_state, cloud.get(uuid).host) == (V.ACTIVE, "b")
    assert fakes["a"].kept_disks() == [] and _used(cloud) == {"a": 0, "b": 1024}


def test_revert_puts_everything_back(cloud: Engine, fakes: Fakes) -> None:
    """Revert destroys the copy on b, restores a with the old flavor, and releases b's claim."""
    uuid = _vm(cloud)
    cloud.resize(uuid, BIG)
    cloud.revert_resize(uuid)
    i = cloud.get(uuid)
    assert (i.vm_state, i.host, i.flavor.memory_mb, i.power_state) == (V.ACTIVE, "a", 512, P.RUNNING)
    assert not fakes["b"].domain_exists(uuid) and fakes["a"].kept_disks() == []
    assert _used(cloud) == {"a": 512, "b": 0}


def test_a_stopped_instance_stays_stopped_through_migrate_and_revert(cloud: Engine, fakes: Fakes) -> None:
    """Migrate keeps the flavor and a stopped guest off; revert returns it stopped."""
    uuid = _vm(cloud)
    cloud.stop(uuid)
    cloud.migrate(uuid)
    assert (cloud.get(uuid).flavor, fakes["b"].get_info(uuid)) == (SMALL, P.SHUTDOWN)
    cloud.confirm_resize(uuid)
    assert cloud.get(uuid).vm_state is V.STOPPED
    cloud.migrate(uuid)
    cloud.revert_resize(uuid)
    assert (cloud.get(uuid).vm_state, cloud.get(uuid).host) == (V.STOPPED, "b")


@pytest.mark.parametrize(
    ("flavor", "message"),
    [(Flavor(1, 512, 0), "cannot shrink the root disk"), (Flavor(1, 512, 1), "same size")],
)
def test_bad_resizes_are_refused_before_anything_changes(cloud: Engine, flavor: Flavor, message: str) -> None:
    """Shrinking the disk or resizing to the same size raises InvalidInput and writes nothing."""
    uuid = _vm(cloud)
    before = cloud.history(uuid)
    with pytest.raises(InvalidInput, match=message):
        cloud.resize(uuid, flavor)
    assert cloud.history(uuid) == before


def test_confirm_needs_a_resized_instance(cloud: Engine) -> None:
    """Confirm and revert are refused unless the instance is resized."""
    uuid = _vm(cloud)
    with pytest.raises(InvalidState):
        cloud.confirm_resize(uuid)


def test_delete_of_a_resized_instance_confirms_first(cloud: Engine, fakes: Fakes) -> None:
    """Deleting a resized instance cleans the source too: nothing is left anywhere, no claim remains."""
    uuid = _vm(cloud)
    cloud.resize(uuid, BIG)
    cloud.delete(uuid)
    assert fakes["a"].kept_disks() == [] and not fakes["b"].domain_exists(uuid)
    assert _used(cloud) == {"a": 0, "b": 0}


def test_an_unreachable_source_leaves_the_move_finished_for_a_retry(cloud: Engine, fakes: Fakes) -> None:
    """Confirm failing on the source keeps the migration finished and the instance resized; a retry confirms."""
    uuid = _vm(cloud)
    cloud.resize(uuid, BIG)
    fakes["a"].faults.fail_next("confirm_migration", DriverUnavailable("host a unreachable"))
    with pytest.raises(TaskFailed):
        cloud.confirm_resize(uuid)
    assert cloud.get(uuid).vm_state is V.RESIZED
    assert cloud.store.moves.open_of(uuid).status == "finished"  # type: ignore[union-attr]
    cloud.confirm_resize(uuid)
    assert cloud.get(uuid).vm_state is V.ACTIVE


def test_a_failure_before_the_disk_leaves_is_rolled_back_on_the_source(cloud: Engine, fakes: Fakes) -> None:
    """If the source cannot set the disk aside, the instance stays on a, running, and b's claim is released."""
    uuid = _vm(cloud)
    fakes["a"].faults.fail_next("migrate_disk_and_power_off", DriverError("disk busy"))
    with pytest.raises(TaskFailed):
        cloud.resize(uuid, BIG)
    i = cloud.get(uuid)
    assert (i.vm_state, i.host, i.flavor, fakes["a"].get_info(uuid)) == (V.ACTIVE, "a", SMALL, P.RUNNING)
    assert _used(cloud) == {"a": 512, "b": 0}


def test_a_failure_on_the_destination_keeps_the_source_disk(cloud: Engine, fakes: Fakes) -> None:
    """finish_migration failing on b sends the instance to error but never loses the source's kept disk."""
    uuid = _vm(cloud)
    fakes.factory(cloud.hosts.get("b")).faults.fail_next("finish_migration")
    with pytest.raises(TaskFailed):
        cloud.resize(uuid, BIG)
    assert cloud.get(uuid).vm_state is V.ERROR
    assert fakes["a"].kept_disks() == [uuid]
    assert cloud.images.clean_cache("a", 0) == []  # the fake keeps no cache; the open move is protected


def test_no_destination_is_no_change(cloud: Engine) -> None:
    """With no other host able to take the flavor the resize fails in prep and changes nothing."""
    uuid = _vm(cloud)
    cloud.hosts.set_enabled("b", False)
    with pytest.raises(TaskFailed, match="NoValidHost"):
        cloud.resize(uuid, BIG)
    assert (cloud.get(uuid).vm_state, cloud.get(uuid).host) == (V.ACTIVE, "a")


def test_a_move_revokes_console_tokens(cloud: Engine) -> None:
    """A console token issued before the move no longer works after it."""
    uuid = _vm(cloud)
    token = cloud.consoles.get_vnc_console(uuid).token
    cloud.migrate(uuid)
    assert cloud.consoles.check_token(token) is None


def test_migration_status_chart_is_checked() -> None:
    """Every migration status is reachable from pre-migrating; only confirmed, reverted, error and completed end."""
    from lifecycle.states import MIGRATION_TRANSITIONS, MigrationStatus

    terminal = {s for s, exits in MIGRATION_TRANSITIONS.items() if not exits}
    ends = {MigrationStatus.CONFIRMED, MigrationStatus.REVERTED, MigrationStatus.ERROR, MigrationStatus.COMPLETED}
    assert terminal == ends
    assert {s for s in MigrationStatus if not s.open} == terminal


def test_the_store_refuses_a_migration_status_the_chart_does_not_allow(cloud: Engine) -> None:
    """A confirmed migration cannot be written back to migrating: the write raises Conflict and changes nothing."""
    from lifecycle import Conflict
    from lifecycle.states import MigrationStatus

    uuid = _vm(cloud)
    cloud.migrate(uuid)
    migration = cloud.store.moves.open_of(uuid)
    assert migration is not None
    cloud.confirm_resize(uuid)
    with pytest.raises(Conflict, match="migration status"):
        cloud.store.moves.update(migration.id, status=MigrationStatus.MIGRATING)
    assert cloud.store.moves.get(migration.id).status is MigrationStatus.CONFIRMED


def test_migrations_are_listed_and_shown(cloud: Engine) -> None:
    """engine.migrations lists moves newest first (filtered by host); engine.migration shows one or says not found."""
    from lifecycle.errors import MigrationNotFound

    uuid = _vm(cloud)
    cloud.migrate(uuid)
    (m,) = cloud.migrations()
    assert (m.instance_uuid, m.source_host, m.dest_host, m.status) == (uuid, "a", "b", MigrationStatus.FINISHED)
    assert cloud.migrations("b") == [m] and cloud.migration(m.id) == m
    cloud.hosts.add("c", "fake://")
    assert cloud.migrations("c") == []
    with pytest.raises(MigrationNotFound):
        cloud.migration("00000000-0000-0000-0000-000000000000")
    with pytest.raises(InvalidInput):
        cloud.migration("nope")


def test_the_copy_records_its_progress_on_the_step_and_the_migration(cloud: Engine) -> None:
    """The disk copy writes bytes done and total on resize_finish; the migration shows the copy complete."""
    uuid = _vm(cloud)
    task = cloud.resize(uuid, BIG)
    finish = next(s for s in cloud.steps(task.id) if s.name == "resize_finish")
    assert finish.bytes_total is not None and finish.bytes_total > 0
    assert finish.bytes_done == finish.bytes_total
    migration = cloud.migrations()[0]
    assert (migration.bytes_done, migration.bytes_total) == (finish.bytes_done, finish.bytes_total)
    assert all(s.bytes_total is None for s in cloud.steps(task.id) if s.name != "resize_finish")


def test_a_copy_that_fails_rolls_back_onto_the_source(cloud: Engine, fakes: Fakes) -> None:
    """A copy failing midway leaves nothing on b: the guest runs on a as before, old flavor, b's claim released."""
    uuid = _vm(cloud)
    b = fakes.factory(cloud.hosts.get("b"))
    b.faults.fail_after("copy", DriverUnavailable("b stopped answering", call="copy"))  # after the first chunk
    with pytest.raises(TaskFailed, match="CopyFailed"):
        cloud.resize(uuid, BIG)
    i = cloud.get(uuid)
    assert (i.vm_state, i.task_state, i.host, i.flavor, i.power_state) == (V.ACTIVE, None, "a", SMALL, P.RUNNING)
    assert fakes["a"].get_info(uuid) is P.RUNNING and not b.domain_exists(uuid)
    assert _used(cloud) == {"a": 512, "b": 0} and cloud.store.claims.of(uuid) == ["a"]
    assert cloud.migrations()[0].status is MigrationStatus.ERROR and fakes["a"].kept_disks() == []


def test_a_stopped_guest_whose_copy_fails_stays_stopped_on_the_source(cloud: Engine, fakes: Fakes) -> None:
    """The roll back of a failed copy keeps a stopped guest stopped (vm_state and power)."""
    uuid = _vm(cloud)
    cloud.stop(uuid)
    b = fakes.factory(cloud.hosts.get("b"))
    b.faults.fail_next("copy")
    with pytest.raises(TaskFailed):
        cloud.migrate(uuid)
    i = cloud.get(uuid)
    assert (i.vm_state, i.host, i.power_state, fakes["a"].get_info(uuid)) == (V.STOPPED, "a", P.SHUTDOWN, P.SHUTDOWN)


def test_a_force_delete_stops_a_copy_in_flight(cloud: Engine, fakes: Fakes) -> None:
    """A force delete while the copy is held takes the move over; the copy stops and neither host keeps anything."""
    import threading

    from lifecycle.errors import Preempted

    uuid = _vm(cloud)
    b = fakes.factory(cloud.hosts.get("b"))
    gate = b.faults.hold("copy")
    errors: list[BaseException] = []

    def resize() -> None:
        try:
            cloud.resize(uuid, BIG)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=resize)
    worker.start()
    assert gate.wait_entered()
    cloud.force_delete(uuid)
    gate.release()
    worker.join(10)
    assert not worker.is_alive() and len(errors) == 1 and isinstance(errors[0], Preempted)
    assert cloud.get(uuid).vm_state is V.DELETED
    assert not fakes["a"].domain_exists(uuid) and not b.domain_exists(uuid)
    assert fakes["a"].kept_disks() == [] and cloud.store.claims.of(uuid) == []
    assert b.calls.count("copy") == 1  # the next chunk's progress record found the task taken over


def test_a_copy_cut_by_a_crash_is_restarted_by_recovery(cloud: Engine, fakes: Fakes) -> None:
    """An engine dying mid-copy leaves the task in resize_finish; recovery copies again and finishes the move."""
    from lifecycle.drivers.fake import SimulatedCrash

    uuid = _vm(cloud)
    b = fakes.factory(cloud.hosts.get("b"))
    b.faults.crash_after("copy")
    with pytest.raises(SimulatedCrash):
        cloud.resize(uuid, BIG)
    assert cloud.get(uuid).task_state is TaskState.RESIZE_FINISH and not b.domain_exists(uuid)
    [recovered] = cloud.recover(force=True)
    assert (recovered.plan, recovered.outcome) == ("resume", "succeeded")
    i = cloud.get(uuid)
    assert (i.status, i.host, i.flavor) == ("VERIFY_RESIZE", "b", BIG) and b.get_info(uuid) is P.RUNNING
    assert b.calls.count("copy") == 1 + 5  # the cut copy's first chunk, then the whole disk again


def test_a_delete_that_cuts_a_move_short_leaves_its_record_in_error(cloud: Engine, fakes: Fakes) -> None:
    """A delete taking over a move mid-copy ends the migration in error (it never happened), a resized one confirmed."""
    uuid = _vm(cloud)
    fakes.factory(cloud.hosts.get("b"))
    gate = fakes["b"].faults.hold("copy")
    cloud.migrate(uuid, host="b", wait=False)
    assert gate.wait_entered()
    migration = cloud.store.moves.open_of(uuid)
    assert migration is not None
    cloud.delete(uuid)
    gate.release()
    cloud.runner.wait_idle()
    assert cloud.get(uuid).vm_state is V.DELETED
    assert cloud.store.moves.get(migration.id).status is MigrationStatus.ERROR
    assert _used(cloud) == {"a": 0, "b": 0}

    resized = _vm(cloud)
    cloud.migrate(resized, host="b")
    done = cloud.store.moves.open_of(resized)
    assert done is not None
    cloud.delete(resized)
    assert cloud.store.moves.get(done.id).status is MigrationStatus.CONFIRMED
