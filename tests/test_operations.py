"""Operations executed end to end through the engine and the fake driver."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lifecycle import Engine, InvalidInput, InvalidState, Outcome, PowerState, TaskFailed, TaskState, VmState
from lifecycle.errors import DomainNotFound, DriverError, HostNotFound, ImageNotFound, InstanceNotFound
from tests.conftest import FLAVOR, Fakes
from tests.images import fake_image
from tests.invariants import check_invariants

V, P = VmState, PowerState

# (operations to reach the start state, operation, expected vm_state, power_state, status)
SCENARIOS = [
    ([], "stop", V.STOPPED, P.SHUTDOWN, "SHUTOFF"),
    (["stop"], "start", V.ACTIVE, P.RUNNING, "ACTIVE"),
    ([], "reboot", V.ACTIVE, P.RUNNING, "ACTIVE"),
    (["stop"], "reboot_hard", V.ACTIVE, P.RUNNING, "ACTIVE"),
    ([], "pause", V.PAUSED, P.PAUSED, "PAUSED"),
    (["pause"], "unpause", V.ACTIVE, P.RUNNING, "ACTIVE"),
    ([], "suspend", V.SUSPENDED, P.SHUTDOWN, "SUSPENDED"),
    (["suspend"], "resume", V.ACTIVE, P.RUNNING, "ACTIVE"),
    (["stop"], "rescue", V.RESCUED, P.RUNNING, "RESCUE"),
    (["rescue"], "unrescue", V.ACTIVE, P.RUNNING, "ACTIVE"),
    ([], "rebuild", V.ACTIVE, P.RUNNING, "ACTIVE"),
    (["stop"], "rebuild", V.STOPPED, P.SHUTDOWN, "SHUTOFF"),
    ([], "soft_delete", V.SOFT_DELETED, P.SHUTDOWN, "SOFT_DELETED"),
    (["soft_delete"], "restore", V.ACTIVE, P.RUNNING, "ACTIVE"),
    ([], "delete", V.DELETED, P.NOSTATE, "DELETED"),
    (["pause"], "force_delete", V.DELETED, P.NOSTATE, "DELETED"),
]


@pytest.mark.parametrize(("before", "op", "vm_state", "power", "status"), SCENARIOS)
def test_operation_ends_in_its_state(
    engine: Engine,
    new_instance: Callable[..., str],
    before: list[str],
    op: str,
    vm_state: VmState,
    power: PowerState,
    status: str,
) -> None:
    """Each operation ends with its vm_state, task idle, the guest's real power and a succeeded task."""
    uuid = new_instance()
    for step in before:
        engine.run(step, uuid)
    task = engine.run(op, uuid)
    i = engine.get(uuid)
    assert (i.vm_state, i.task_state, i.task_id, i.power_state, i.status) == (vm_state, None, None, power, status)
    assert task.outcome is Outcome.SUCCEEDED and task.finished_at is not None
    assert [s.result for s in engine.steps(task.id)] == ["ok"] * len(engine.steps(task.id))


def test_create_walks_every_build_step(engine: Engine, fakes: Fakes) -> None:
    """Create records scheduling, networking, block_device_mapping and spawning, then runs the guest."""
    task = engine.create("web", host="h1", flavor=FLAVOR, image="cirros")
    i = engine.get(task.instance_uuid)
    assert [s.name for s in engine.steps(task.id)] == ["scheduling", "networking", "block_device_mapping", "spawning"]
    assert (i.vm_state, i.power_state, i.host) == (V.ACTIVE, P.RUNNING, "h1")
    assert i.launched_at is not None
    assert fakes["h1"].get_info(i.uuid) is P.RUNNING


def test_stop_falls_back_to_destroy_when_the_guest_ignores_acpi(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A guest that ignores the clean shutdown is destroyed after the timeout and still ends stopped."""
    uuid = new_instance()
    fakes["h1"].set_ignores_acpi(uuid)
    engine.stop(uuid, timeout=5)
    assert "power_off:destroy" in fakes["h1"].calls
    assert engine.get(uuid).vm_state is V.STOPPED


def test_stop_uses_a_clean_shutdown_when_the_guest_cooperates(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A cooperative guest is shut down cleanly, not destroyed."""
    uuid = new_instance()
    engine.stop(uuid, timeout=5)
    assert "power_off:clean" in fakes["h1"].calls


def test_rebuild_gives_a_new_disk_on_the_new_image(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """Rebuild keeps uuid, name, host and flavor, replaces the disk and records the new image."""
    uuid = new_instance("keep-me")
    engine.images.add("debian", fake_image("debian"))
    old_disk = fakes["h1"].disk_of(uuid)
    engine.rebuild(uuid, image="debian")
    i = engine.get(uuid)
    assert (i.name, i.host, i.flavor, i.image) == ("keep-me", "h1", FLAVOR, "debian")
    assert fakes["h1"].disk_of(uuid) != old_disk


def test_rebuild_from_error_ends_active(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """A rebuild is a way out of error: it ends active."""
    uuid = new_instance()
    fakes["h1"].faults.fail_after("pause")
    with pytest.raises(TaskFailed):
        engine.pause(uuid)
    assert engine.get(uuid).vm_state is V.ERROR
    engine.rebuild(uuid)
    assert (engine.get(uuid).vm_state, engine.get(uuid).power_state) == (V.ACTIVE, P.RUNNING)


def test_failure_with_guest_unchanged_keeps_the_vm_state(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A failed pause that left the guest running keeps active; the error is on the task and in the audit log."""
    uuid = new_instance()
    fakes["h1"].faults.fail_next("pause", DriverError("qemu said no"))
    with pytest.raises(TaskFailed) as info:
        engine.pause(uuid)
    i = engine.get(uuid)
    assert (i.vm_state, i.task_state, i.power_state) == (V.ACTIVE, None, P.RUNNING)
    task = engine.task(info.value.task.id)
    assert task.outcome is Outcome.FAILED and "qemu said no" in (task.error or "")
    assert "Traceback" in (task.traceback or "")
    assert "qemu said no" in (engine.history(uuid)[-1].message or "")
    assert engine.steps(task.id)[-1].result == "failed"


def test_failure_with_guest_changed_goes_to_error(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A stop that changed the guest and then reported failure goes to error with the real power."""
    uuid = new_instance()
    fakes["h1"].faults.fail_after("power_off", DriverError("lost the monitor"))
    with pytest.raises(TaskFailed):
        engine.stop(uuid)
    i = engine.get(uuid)
    assert (i.vm_state, i.task_state, i.power_state) == (V.ERROR, None, P.SHUTDOWN)


def test_failure_with_unchanged_broken_guest_keeps_the_vm_state(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A guest crashed before the stop and still crashed after it is unchanged: the vm_state stays."""
    uuid = new_instance()
    fakes["h1"].set_power(uuid, P.CRASHED)
    fakes["h1"].faults.fail_next("power_off")
    with pytest.raises(TaskFailed):
        engine.stop(uuid)
    assert (engine.get(uuid).vm_state, engine.get(uuid).power_state) == (V.ACTIVE, P.CRASHED)


def test_hard_reboot_failure_with_guest_running_ends_active(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """As in Nova, a failed hard reboot with the guest running gives active, not error."""
    uuid = new_instance()
    engine.stop(uuid)
    fakes["h1"].set_power(uuid, P.RUNNING)
    fakes["h1"].faults.fail_next("reboot")
    with pytest.raises(TaskFailed):
        engine.reboot(uuid, hard=True)
    assert engine.get(uuid).vm_state is V.ACTIVE


def test_create_failure_goes_to_error(engine: Engine, fakes: Fakes) -> None:
    """A spawn failure leaves the instance in error with the task failed and idle."""
    fakes.factory(engine.store.hosts.get("h1"))
    fakes["h1"].faults.fail_next("spawn")
    with pytest.raises(TaskFailed) as info:
        engine.create("doomed", host="h1", flavor=FLAVOR, image="cirros")
    i = engine.get(info.value.task.instance_uuid)
    assert (i.vm_state, i.task_state, i.task_id) == (V.ERROR, None, None)


def test_delete_failure_goes_to_error_and_can_be_retried(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A failed delete gives error with the task cleared (Nova bug 1329559), and a retry deletes."""
    uuid = new_instance()
    fakes["h1"].faults.fail_next("destroy")
    with pytest.raises(TaskFailed):
        engine.delete(uuid)
    assert (engine.get(uuid).vm_state, engine.get(uuid).task_state) == (V.ERROR, None)
    engine.delete(uuid)
    assert engine.get(uuid).vm_state is V.DELETED
    assert not fakes["h1"].domain_exists(uuid)


def test_delete_of_a_vanished_domain_succeeds(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """Deleting an instance whose domain was undefined behind our back still completes."""
    uuid = new_instance()
    fakes["h1"].undefine(uuid)
    engine.delete(uuid)
    assert engine.get(uuid).vm_state is V.DELETED


def test_refused_operation_changes_nothing(engine: Engine, new_instance: Callable[..., str]) -> None:
    """An operation refused by its guard raises InvalidState and writes no task and no audit row."""
    uuid = new_instance()
    before, history, tasks = engine.get(uuid), engine.history(uuid), engine.tasks(uuid)
    with pytest.raises(InvalidState, match="start is allowed from vm_state stopped"):
        engine.start(uuid)
    assert (engine.get(uuid), engine.history(uuid), engine.tasks(uuid)) == (before, history, tasks)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"host": "nowhere"}, HostNotFound),
        ({"image": "nothing"}, ImageNotFound),
        ({"name": ""}, InvalidInput),
        ({"name": "bad\nname"}, InvalidInput),
        ({"uuid": "not-a-uuid"}, InvalidInput),
    ],
)
def test_bad_create_input_is_refused_before_anything_changes(
    engine: Engine, kwargs: dict[str, str], error: type[Exception]
) -> None:
    """Unknown host or image, a bad name or uuid raise a typed error and create nothing."""
    args = {"name": "vm", "host": "h1", "flavor": FLAVOR, "image": "cirros"} | kwargs
    with pytest.raises(error):
        engine.create(**args)  # type: ignore[arg-type]
    assert engine.list(include_deleted=True) == []


def test_flavor_smaller_than_image_minimum_is_refused(engine: Engine) -> None:
    """An image's minimum disk is enforced before anything is written."""
    engine.images.add("big", fake_image("big"), min_disk_gb=20)
    with pytest.raises(InvalidInput, match="smaller than image big's minimum"):
        engine.create("vm", host="h1", flavor=FLAVOR, image="big")
    assert engine.list() == []


def test_unknown_instance_and_operation_are_typed_errors(engine: Engine) -> None:
    """An unknown uuid raises InstanceNotFound; an unknown or unimplemented operation InvalidInput."""
    with pytest.raises(InstanceNotFound):
        engine.stop("00000000-0000-0000-0000-000000000000")
    with pytest.raises(InvalidInput, match="unknown operation 'explode'"):
        engine.run("explode", "00000000-0000-0000-0000-000000000000")


def test_background_task_runs_on_the_executor(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """wait=False returns the running task at once; the executor finishes it."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("pause")
    task = engine.pause(uuid, wait=False)
    assert task.outcome is Outcome.RUNNING
    assert gate.wait_entered()
    assert engine.get(uuid).task_state is TaskState.PAUSING
    gate.release()
    engine.runner.wait_idle()
    assert engine.task(task.id).outcome is Outcome.SUCCEEDED
    assert engine.get(uuid).vm_state is V.PAUSED


def test_invariants_hold_after_a_long_mixed_sequence(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """After many operations, failures included, the invariants hold and the audit log replays."""
    uuid = new_instance()
    for op in ("stop", "start", "pause", "unpause", "suspend", "resume", "rescue", "unrescue"):
        engine.run(op, uuid)
        check_invariants(engine.store)
    fakes["h1"].faults.fail_next("suspend")
    with pytest.raises(TaskFailed):
        engine.suspend(uuid)
    check_invariants(engine.store)
    with pytest.raises(DomainNotFound):
        fakes["h1"].get_info("00000000-0000-0000-0000-000000000000")
