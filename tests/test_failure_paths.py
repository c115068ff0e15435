"""Failure paths: nothing stuck, nothing silently dropped (issue: failure paths, part A)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from lifecycle import (
    Engine,
    HostInUse,
    InvalidState,
    NoValidHost,
    Outcome,
    PowerState,
    TaskFailed,
    TaskNotFound,
    TaskState,
    VmState,
)
from lifecycle.daemon import Daemon
from lifecycle.drivers.base import Driver
from lifecycle.errors import DriverUnavailable
from lifecycle.records import Host
from tests.conftest import FLAVOR, Fakes
from tests.invariants import check_invariants

V = VmState
HOSTLESS_REFUSED = ["start", "stop", "reboot", "reboot_hard", "rebuild", "rescue", "soft_delete", "pause", "migrate"]


def _no_valid_host(engine: Engine) -> str:
    engine.hosts.set_enabled("h1", False)
    engine.hosts.set_enabled("h2", False)
    with pytest.raises(TaskFailed) as failed:
        engine.create("nowhere", flavor=FLAVOR, image="cirros")
    assert "NoValidHost" in failed.value.error
    return failed.value.task.instance_uuid


def _task_rows(engine: Engine, uuid: str) -> list[tuple[str, str]]:
    return [(t.operation, t.outcome.value) for t in engine.tasks(uuid)]


@pytest.mark.parametrize("op", ["delete", "force_delete"])
def test_hostless_error_instance_is_deleted_in_the_database(engine: Engine, op: str) -> None:
    """A create that found no host ends error without a host; delete and force_delete then end deleted, audited."""
    uuid = _no_valid_host(engine)
    assert (engine.get(uuid).vm_state, engine.get(uuid).host) == (V.ERROR, None)
    task = engine.run(op, uuid)
    i = engine.get(uuid)
    assert (task.outcome, i.vm_state, i.task_id, i.power_state) == (Outcome.SUCCEEDED, V.DELETED, None, 0)
    assert "no host: deleted in the database only" in (engine.history(uuid)[-1].message or "")
    assert engine.store.claims.of(uuid) == []


@pytest.mark.parametrize("op", HOSTLESS_REFUSED)
def test_hostless_instance_refuses_every_other_operation_before_writing(engine: Engine, op: str) -> None:
    """Every operation but delete on a host-less instance is InvalidState naming why, and writes nothing."""
    uuid = _no_valid_host(engine)
    before, tasks = engine.get(uuid), _task_rows(engine, uuid)
    with pytest.raises(InvalidState):
        engine.run(op, uuid)
    assert engine.get(uuid) == before and _task_rows(engine, uuid) == tasks


def test_hostless_refusal_says_why(engine: Engine) -> None:
    """stop of a host-less error instance says it has no host, not only the (satisfied) vm_state guard."""
    uuid = _no_valid_host(engine)
    with pytest.raises(InvalidState, match="has no host"):
        engine.stop(uuid)


def test_console_of_a_hostless_instance_says_it_has_no_host(engine: Engine) -> None:
    """The console refusal of a host-less error instance names the missing host as its reason."""
    uuid = _no_valid_host(engine)
    with pytest.raises(InvalidState, match="no host, so no console"):
        engine.consoles.get_vnc_console(uuid)


def test_failed_build_on_a_named_host_keeps_no_host_claim_or_domain(engine: Engine, fakes: Fakes) -> None:
    """A spawn failing on a named host ends error with no host, no claim and no half-made domain left there."""
    engine.hosts.driver("h1")
    fakes["h1"].faults.fail_after("spawn")  # the domain is made, then the call reports failure
    with pytest.raises(TaskFailed) as failed:
        engine.create("vm", host="h1", flavor=FLAVOR, image="cirros")
    uuid = failed.value.task.instance_uuid
    i = engine.get(uuid)
    assert (i.vm_state, i.host) == (V.ERROR, None)
    assert engine.store.claims.of(uuid) == [] and not fakes["h1"].domain_exists(uuid)
    for op in ("rebuild", "reboot_hard", "rescue"):
        with pytest.raises(InvalidState):
            engine.run(op, uuid)


def test_failed_build_leaves_room_for_the_next_create(db_url: str, fakes: Fakes) -> None:
    """On a host with room for one guest, a failed build gives its room back and a later build fits exactly once."""
    engine = Engine(db_url, driver_factory=fakes.factory)
    engine.hosts.add("small", "fake://", vcpus=1, memory_mb=64, disk_gb=1)
    from tests.images import fake_image

    engine.images.add("cirros", fake_image())
    engine.hosts.heartbeat("small")
    fakes.factory(engine.hosts.get("small")).faults.fail_next("spawn")
    with pytest.raises(TaskFailed):
        engine.create("a", host="small", flavor=FLAVOR, image="cirros")
    engine.create("b", host="small", flavor=FLAVOR, image="cirros")
    with pytest.raises(TaskFailed, match="NoValidHost"):
        engine.create("c", flavor=FLAVOR, image="cirros")
    assert engine.hosts.get("small").vcpus_used == 1
    check_invariants(engine.store)
    engine.close()


@pytest.mark.parametrize(
    "error",
    [OSError(2, "No such file or directory"), json.JSONDecodeError("Expecting value", "", 0), RuntimeError("bug")],
    ids=["OSError", "JSONDecodeError", "RuntimeError"],
)
@pytest.mark.parametrize("op", ["stop", "delete", "force_delete", "pause"])
def test_any_exception_from_the_driver_ends_the_task(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str], error: Exception, op: str
) -> None:
    """A driver raising something other than DriverError ends the task failed with error and traceback."""
    uuid = new_instance()
    call = {"stop": "power_off", "delete": "destroy", "force_delete": "destroy", "pause": "pause"}[op]
    fakes["h1"].faults.fail_next(call, error)
    fakes["h1"].faults.fail_next("get_info", error)  # the power read at failure breaks too
    with pytest.raises(TaskFailed) as failed:
        engine.run(op, uuid)
    task = engine.task(failed.value.task.id)
    assert task.outcome is Outcome.FAILED and type(error).__name__ in (task.error or "")
    assert task.traceback and type(error).__name__ in task.traceback
    assert engine.get(uuid).task_id is None
    fakes["h1"].faults.clear()  # the fault not consumed (the power read) would hit the delete
    engine.delete(uuid)
    assert engine.get(uuid).vm_state is V.DELETED


def test_spawn_raising_oserror_reschedules(engine: Engine, fakes: Fakes) -> None:
    """A spawn raising OSError is a failed spawn like any other: the build is tried on the other host."""
    engine.hosts.heartbeat("h1")
    engine.hosts.heartbeat("h2")
    for name in ("h1", "h2"):
        engine.hosts.driver(name)
    first = iter(["h1", "h2"])
    fakes["h1"].faults.fail_next("spawn", OSError(28, "No space left on device"))
    fakes["h2"].faults.fail_next("spawn", OSError(28, "No space left on device"))
    with pytest.raises(TaskFailed, match="NoValidHost") as failed:
        engine.create("vm", flavor=FLAVOR, image="cirros")
    assert next(first) == "h1"
    uuid = engine.list()[0].uuid
    assert engine.get(uuid).host is None and engine.store.claims.of(uuid) == []
    failures = [m for r in engine.history(uuid) if "OSError" in (m := r.message or "") and "rescheduling" in m]
    assert len(failures) == 2 and all("No space left on device; rescheduling" in m for m in failures)
    assert "h1: a spawn there failed (OSError: [Errno 28] No space left on device)" in str(failed.value)


class _Broken(Fakes):
    """Fakes whose host h1 cannot even be opened (a driver factory raising)."""

    def factory(self, host: Host) -> Driver:
        if host.name == "h1" and self.get("broken"):
            raise RuntimeError("cannot open h1")
        return super().factory(host)


def test_recover_goes_on_past_a_task_it_cannot_recover(sqlite_url: str) -> None:
    """A task whose recovery raises is reported as error, and the tasks after it are still recovered."""
    fakes = _Broken()
    first = Engine(sqlite_url, driver_factory=fakes.factory, owner="dead")
    from tests.images import fake_image

    first.hosts.add("h1", "fake://")
    first.hosts.add("h2", "fake://")
    first.images.add("cirros", fake_image())
    on_h1 = first.create("a", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    on_h2 = first.create("b", host="h2", flavor=FLAVOR, image="cirros").instance_uuid
    for uuid, host in ((on_h1, "h1"), (on_h2, "h2")):
        gate = fakes[host].faults.hold("power_off")
        first.stop(uuid, wait=False)
        assert gate.wait_entered()
    fakes["broken"] = fakes["h1"]  # h1's driver can no longer be opened by a new engine
    second = Engine(sqlite_url, driver_factory=fakes.factory, owner="dead")
    results = {r.instance_uuid: r for r in second.recover(force=True)}
    assert results[on_h1].outcome == "failed" and "cannot open h1" in results[on_h1].reason
    assert second.get(on_h1).task_id is None
    assert results[on_h2].outcome == "succeeded" and second.get(on_h2).vm_state is V.STOPPED
    for gate_host in ("h1", "h2"):
        fakes[gate_host].faults.clear()
    del fakes["broken"]
    second.close()


def test_recover_reports_a_task_whose_recovery_raises_and_goes_on(
    sqlite_url: str, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When recovering one task raises, recover reports it as error and still recovers the next one."""
    from lifecycle import recovery
    from tests.images import fake_image

    first = Engine(sqlite_url, driver_factory=fakes.factory, owner="dead")
    first.hosts.add("h1", "fake://")
    first.images.add("cirros", fake_image())
    uuids = [first.create(n, host="h1", flavor=FLAVOR, image="cirros").instance_uuid for n in ("a", "b")]
    for uuid in uuids:
        gate = fakes["h1"].faults.hold("power_off")
        first.stop(uuid, wait=False)
        assert gate.wait_entered()
    real = recovery._recover

    def flaky(engine: Engine, task: object) -> recovery.Recovered:
        if getattr(task, "instance_uuid", None) == uuids[0]:
            raise RuntimeError("database hiccup")
        return real(engine, task)  # type: ignore[arg-type]

    monkeypatch.setattr(recovery, "_recover", flaky)
    second = Engine(sqlite_url, driver_factory=fakes.factory, owner="dead")
    results = {r.instance_uuid: r for r in second.recover(force=True)}
    assert (results[uuids[0]].outcome, results[uuids[0]].reason) == ("error", "RuntimeError: database hiccup")
    assert results[uuids[1]].outcome == "succeeded"
    fakes["h1"].faults.clear()
    second.close()


def test_recover_does_not_take_over_a_task_its_own_engine_runs(engine: Engine, fakes: Fakes) -> None:
    """An engine's periodic recover leaves alone the tasks its own workers are running."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    gate = fakes["h1"].faults.hold("pause")
    task = engine.pause(uuid, wait=False)
    assert gate.wait_entered()
    assert engine.recover() == []
    gate.release()
    engine.runner.wait_idle()
    assert engine.task(task.id).outcome is Outcome.SUCCEEDED and engine.get(uuid).vm_state is V.PAUSED


def test_only_live_workers_have_their_lease_renewed(engine: Engine, fakes: Fakes) -> None:
    """A running task row whose worker is gone is not renewed by the heartbeat, so recovery can end it."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    gate = fakes["h1"].faults.hold("pause")
    live = engine.pause(uuid, wait=False)
    assert gate.wait_entered()
    assert engine.store.tasks.renew_leases(engine.owner, sorted(engine.runner.active)) == 1
    assert engine.store.tasks.renew_leases(engine.owner, []) == 0
    gate.release()
    engine.runner.wait_idle()
    assert engine.runner.active == set() and engine.task(live.id).outcome is Outcome.SUCCEEDED


def test_task_lookup_of_an_unknown_id_is_typed(engine: Engine) -> None:
    """engine.task of an unknown id raises TaskNotFound; a malformed one raises InvalidInput."""
    with pytest.raises(TaskNotFound):
        engine.task("00000000-0000-0000-0000-000000000000")
    with pytest.raises(TaskNotFound.__mro__[1]):
        engine.task("nope")


# -- hosts -----------------------------------------------------------------------


def test_host_remove_is_refused_while_instances_live_there(engine: Engine, new_instance: Callable[..., str]) -> None:
    """remove_host refuses a host holding an instance and changes nothing."""
    uuid = new_instance()
    with pytest.raises(HostInUse, match=uuid):
        engine.hosts.remove("h1")
    assert engine.hosts.get("h1").name == "h1" and engine.get(uuid).host == "h1"


def test_forced_host_remove_orphans_instances_that_delete_then_removes(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """A forced removal leaves the instance error without host or claim; a delete then ends it in the database."""
    uuid = new_instance()
    assert engine.hosts.remove("h1", force=True) == [uuid]
    assert "h1" not in [h.name for h in engine.hosts.list()]
    i = engine.get(uuid)
    assert (i.vm_state, i.host, engine.store.claims.of(uuid)) == (V.ERROR, None, [])
    assert "may still exist" in (engine.history(uuid)[-1].message or "")
    engine.delete(uuid)
    assert engine.get(uuid).vm_state is V.DELETED


def test_host_with_only_deleted_instances_can_be_removed(engine: Engine, new_instance: Callable[..., str]) -> None:
    """Deleted instances do not hold a host: it is removed without force, their history kept."""
    uuid = new_instance()
    engine.delete(uuid)
    assert engine.hosts.remove("h1") == []
    assert engine.get(uuid).vm_state is V.DELETED and engine.history(uuid)


def _down(engine: Engine, fakes: Fakes, host: str = "h1") -> None:
    """Make ``host`` unreachable and its last heartbeat older than host_down_after."""
    engine.hosts.driver(host)
    fakes[host].unreachable = True
    stale = datetime.now(UTC) - timedelta(seconds=engine.settings.host_down_after + 5)
    engine.store.hosts.update(host, last_heartbeat=stale)


@pytest.mark.parametrize("op", ["delete", "force_delete"])
def test_delete_on_a_down_host_is_local_and_the_guest_is_reaped_later(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str], op: str
) -> None:
    """Delete of an instance on a down, unreachable host ends deleted; the host's next sync pass reaps the guest."""
    uuid = new_instance()
    _down(engine, fakes)
    engine.run(op, uuid)
    i = engine.get(uuid)
    assert (i.vm_state, i.task_id, engine.store.claims.of(uuid)) == (V.DELETED, None, [])
    assert "the guest may still exist" in (engine.history(uuid)[-1].message or "")
    assert fakes["h1"].domain_exists(uuid)
    fakes["h1"].unreachable = False
    (summary,) = engine.hosts.sync("h1")
    assert summary.reaped == [uuid] and summary.unknown_domains == []
    assert not fakes["h1"].domain_exists(uuid)


def test_delete_on_an_up_but_unanswering_host_fails_and_keeps_the_claim(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """While the host still heartbeats, an unreachable hypervisor fails the delete (to retry), claims kept."""
    uuid = new_instance()
    engine.hosts.driver("h1")
    fakes["h1"].unreachable = True
    engine.hosts.heartbeat("h1")
    with pytest.raises(TaskFailed, match="unreachable"):
        engine.delete(uuid)
    assert engine.get(uuid).vm_state is V.ERROR and engine.store.claims.of(uuid) == ["h1"]
    fakes["h1"].unreachable = False
    engine.delete(uuid)
    assert engine.get(uuid).vm_state is V.DELETED and not fakes["h1"].domain_exists(uuid)


def test_reaping_can_be_turned_off(db_url: str, fakes: Fakes) -> None:
    """With running_deleted_instance_action=noop, a deleted instance's leftover domain is only reported."""
    from lifecycle import Settings
    from tests.images import fake_image

    settings = Settings(shutdown_timeout=0, running_deleted_instance_action="noop")
    engine = Engine(db_url, driver_factory=fakes.factory, settings=settings)
    engine.hosts.add("h1", "fake://")
    engine.images.add("cirros", fake_image())
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    _down(engine, fakes)
    engine.delete(uuid)
    fakes["h1"].unreachable = False
    (summary,) = engine.hosts.sync("h1")
    assert summary.reaped == [] and summary.unknown_domains == [uuid] and fakes["h1"].domain_exists(uuid)
    engine.close()


def test_sync_of_every_host_goes_on_past_an_unreachable_one(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """engine.hosts.sync() reports an unreachable host's error and still syncs the others, disabled ones included."""
    new_instance("a", "h1")
    b = new_instance("b", "h2")
    engine.hosts.set_enabled("h2", False)
    fakes["h1"].unreachable = True
    fakes["h2"].set_power(b, PowerState.SHUTDOWN)
    summaries = {s.host: s for s in engine.hosts.sync()}
    assert "unreachable" in (summaries["h1"].error or "")
    assert summaries["h2"].error is None and summaries["h2"].instances == 1
    assert engine.get(b).vm_state is V.STOPPED


def test_daemon_serves_disabled_hosts_and_releases_removed_ones(engine: Engine) -> None:
    """The daemon claims a disabled host (sync, events, heartbeat) and lets a removed host go."""
    engine.hosts.set_enabled("h2", False)
    daemon = Daemon(engine)
    try:
        daemon._claim_hosts()
        assert sorted(daemon.claims) == ["h1", "h2"]
        engine.hosts.remove("h2")
        daemon._claim_hosts()
        assert sorted(daemon.claims) == ["h1"] and sorted(daemon.workers) == ["h1"]
    finally:
        daemon._shutdown()


def test_create_preempted_by_delete_keeps_no_claim_and_no_domain(engine: Engine, fakes: Fakes) -> None:
    """A delete taking over a build held inside spawn leaves no claim, and the late spawn's domain is destroyed."""
    engine.hosts.driver("h1")
    gate = fakes["h1"].faults.hold("spawn")
    task = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros", wait=False)
    assert gate.wait_entered()
    engine.delete(task.instance_uuid)
    gate.release()
    engine.runner.wait_idle()
    uuid = task.instance_uuid
    assert engine.get(uuid).vm_state is V.DELETED and engine.store.claims.of(uuid) == []
    assert not fakes["h1"].domain_exists(uuid)
    assert engine.task(task.id).outcome is Outcome.PREEMPTED


def test_unreachable_driver_error_is_transient(engine: Engine, fakes: Fakes) -> None:
    """The fake's unreachable mode raises DriverUnavailable on every call until cleared."""
    engine.hosts.driver("h1")
    fakes["h1"].unreachable = True
    with pytest.raises(DriverUnavailable):
        fakes["h1"].list_instances()
    fakes["h1"].unreachable = False
    assert fakes["h1"].list_instances().owned == {}


def test_no_valid_host_is_recorded_not_raised_bare(engine: Engine) -> None:
    """A create with every host disabled is a failed task whose error names NoValidHost and each host's reason."""
    uuid = _no_valid_host(engine)
    task = engine.tasks(uuid)[0]
    assert task.outcome is Outcome.FAILED and NoValidHost.__name__ in (task.error or "")
    assert "h1" in (task.error or "") and replace(task, error=None).error is None


def _leftover(engine: Engine, fakes: Fakes) -> str:
    """A deleted instance whose domain is still on h1 (deleted locally while h1 was down, then h1 came back)."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    _down(engine, fakes)
    engine.delete(uuid)
    fakes["h1"].unreachable = False
    engine.hosts.heartbeat("h1")
    return uuid


def _engine_with(db_url: str, fakes: Fakes, **settings: object) -> Engine:
    from lifecycle import Settings
    from tests.images import fake_image

    engine = Engine(db_url, driver_factory=fakes.factory, settings=Settings(shutdown_timeout=0, **settings))  # type: ignore[arg-type]
    engine.hosts.add("h1", "fake://")
    engine.images.add("cirros", fake_image())
    engine.hosts.driver("h1")
    return engine


def test_reaping_is_audited_on_the_deleted_instance(engine: Engine, fakes: Fakes) -> None:
    """The reaper's destroy of a deleted instance's domain leaves an audit row naming the host and the action."""
    uuid = _leftover(engine, fakes)
    engine.hosts.sync("h1")
    last = engine.history(uuid)[-1]
    assert (last.operation, last.rule, last.cause) == ("reap", "running_deleted_reap", "sync")
    assert "still on h1" in (last.message or "")


def test_shutdown_action_powers_the_leftover_off_and_keeps_it(db_url: str, fakes: Fakes) -> None:
    """running_deleted_instance_action=shutdown powers a deleted instance's guest off and leaves its domain."""
    engine = _engine_with(db_url, fakes, running_deleted_instance_action="shutdown")
    uuid = _leftover(engine, fakes)
    assert engine.hosts.sync("h1")[0].reaped == [uuid]
    assert fakes["h1"].domain_exists(uuid) and fakes["h1"].get_info(uuid) is PowerState.SHUTDOWN
    engine.close()


def test_a_delete_younger_than_the_timeout_is_left_alone(db_url: str, fakes: Fakes) -> None:
    """Within running_deleted_instance_timeout of the delete the leftover is only listed as an unknown domain."""
    engine = _engine_with(db_url, fakes, running_deleted_instance_timeout=3600.0)
    uuid = _leftover(engine, fakes)
    (summary,) = engine.hosts.sync("h1")
    assert summary.reaped == [] and summary.unknown_domains == [uuid] and fakes["h1"].domain_exists(uuid)
    engine.close()


def test_our_domain_unknown_to_the_database_is_reaped_only_when_asked(db_url: str, fakes: Fakes) -> None:
    """With reap_unknown_domains, a domain named as ours that no row knows is reaped; foreign ones never are."""
    from lifecycle.drivers.base import DomainSpec

    engine = _engine_with(db_url, fakes, reap_unknown_domains=True)
    stray = "0badc0de-0000-4000-8000-000000000001"
    fakes["h1"].spawn(DomainSpec(stray, "stray", 1, 64, 1, "/x", "qcow2"))
    fakes["h1"].add_foreign("someone-elses-vm")
    (summary,) = engine.hosts.sync("h1")
    assert summary.reaped == [stray] and not fakes["h1"].domain_exists(stray)
    assert summary.unknown_domains == ["someone-elses-vm"]
    engine.close()


def test_settings_refuse_an_unknown_reap_action() -> None:
    """Settings(running_deleted_instance_action=...) accepts only Nova's four actions."""
    from lifecycle import InvalidInput, Settings

    with pytest.raises(InvalidInput, match="reap, shutdown, log, noop"):
        Settings(running_deleted_instance_action="explode")
    with pytest.raises(InvalidInput):
        Settings(sync_interval=float("nan"))


def test_a_fenced_worker_cannot_write_after_a_forced_takeover(db_url: str, fakes: Fakes) -> None:
    """The old worker of a task taken over by force is refused at its write (epoch), and recovery's run ends it."""
    from tests.images import fake_image

    first = Engine(db_url, driver_factory=fakes.factory, owner="node-1")
    first.hosts.add("h1", "fake://")
    first.images.add("cirros", fake_image())
    uuid = first.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    old_gate = fakes["h1"].faults.hold("pause")
    task = first.pause(uuid, wait=False)
    assert old_gate.wait_entered()
    second = Engine(db_url, driver_factory=fakes.factory, owner="node-1")
    new_gate = fakes["h1"].faults.hold("pause")
    recovering = threading.Thread(target=second.recover, kwargs={"force": True})
    recovering.start()
    assert new_gate.wait_entered()
    old_gate.release()
    first.runner.wait_idle()
    new_gate.release()
    recovering.join(10)
    finished = second.task(task.id)
    assert (finished.outcome, finished.epoch, finished.actor) == (Outcome.SUCCEEDED, 1, "api")
    writes = [e for e in second.history(uuid) if e.task_id == task.id and e.to_task_state is None]
    assert len(writes) == 1 and writes[0].cause == "recovery"
    assert second.get(uuid).vm_state is V.PAUSED
    first.close()
    second.close()


def test_a_failed_delete_does_not_let_its_victim_destroy_the_guest(engine: Engine, fakes: Fakes) -> None:
    """When the delete that took over a stop fails, the stop's late return leaves the domain and claim alone."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    gate = fakes["h1"].faults.hold("power_off")
    engine.stop(uuid, wait=False)
    assert gate.wait_entered()
    fakes["h1"].faults.fail_next("destroy")
    with pytest.raises(TaskFailed):
        engine.force_delete(uuid)
    gate.release()
    engine.runner.wait_idle()
    i = engine.get(uuid)
    assert i.vm_state is V.ERROR and fakes["h1"].domain_exists(uuid) and engine.store.claims.of(uuid) == ["h1"]


def test_a_crashed_build_rolls_back_while_its_host_is_unreachable(sqlite_url: str, fakes: Fakes) -> None:
    """Recovery rolls a create back to error without a host although the host does not answer (no driver needed)."""
    from lifecycle.drivers.fake import SimulatedCrash
    from tests.images import fake_image

    first = Engine(sqlite_url, driver_factory=fakes.factory, owner="dead")
    first.hosts.add("h1", "fake://")
    first.images.add("cirros", fake_image())
    original = first.store.writes.advance

    def crash_at_bdm(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)  # type: ignore[arg-type]
        if result.task_state is TaskState.BLOCK_DEVICE_MAPPING:
            raise SimulatedCrash("crash at block_device_mapping")
        return result

    first.hosts.driver("h1")
    first.store.writes.advance = crash_at_bdm  # type: ignore[method-assign]
    with pytest.raises(SimulatedCrash):
        first.create("vm", host="h1", flavor=FLAVOR, image="cirros")
    uuid = first.list()[0].uuid
    fakes["h1"].unreachable = True
    second = Engine(sqlite_url, driver_factory=fakes.factory, owner="dead")
    (result,) = second.recover(force=True)
    i = second.get(uuid)
    assert (result.outcome, i.vm_state, i.host, i.task_id) == ("rolled_back", V.ERROR, None, None)
    assert second.store.claims.of(uuid) == []
    second.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.hosts.get(["h1"]),
        lambda e: e.hosts.remove({"h": 1}),
        lambda e: e.hosts.sync(10**30),
        lambda e: e.hosts.driver(object()),
        lambda e: e.images.clean_cache(["h1"]),
        lambda e: e.create("vm", flavor=FLAVOR, image=["cirros"]),
    ],
    ids=["host", "remove_host", "sync", "driver", "clean_image_cache", "create-image"],
)
def test_wrong_argument_types_are_invalid_input(engine: Engine, call: Callable[[Engine], object]) -> None:
    """Library calls given a list, dict, object or huge integer where a name belongs raise InvalidInput."""
    from lifecycle import InvalidInput

    with pytest.raises(InvalidInput):
        call(engine)


def test_settings_and_engine_arguments_are_checked(sqlite_url: str) -> None:
    """Settings refuse a non-bool reap switch and bad ratios; Engine refuses non-Settings and unsafe owners."""
    from lifecycle import Flavor, InvalidInput, Settings
    from lifecycle.scheduler import SchedulerSettings

    with pytest.raises(InvalidInput):
        Settings(reap_unknown_domains="false")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        Settings(scheduler=SchedulerSettings(cpu_allocation_ratio=float("nan")))
    with pytest.raises(InvalidInput):
        Engine(sqlite_url, settings=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        Engine(sqlite_url, owner="a\x00b")
    with pytest.raises(InvalidInput):
        Flavor.parse(None)  # type: ignore[arg-type]


def test_a_delete_whose_power_read_failed_still_shuts_a_running_guest_down_cleanly(
    engine: Engine, fakes: Fakes
) -> None:
    """Delete asks the host again when the read before its steps failed: a guest started out of band gets power_off."""
    from lifecycle.drivers.base import DomainSpec

    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    engine.stop(uuid)
    fake = fakes["h1"]
    fake.power_on(DomainSpec(uuid, "vm", 1, 64, 1, "/x", "qcow2"))  # started behind the engine's back
    fake.calls.clear()
    fake.faults.fail_next("get_info")
    engine.delete(uuid)
    assert next(c for c in fake.calls if c.startswith(("power_off", "destroy"))) == "power_off"
    assert not fake.domain_exists(uuid) and engine.get(uuid).vm_state is V.DELETED


def test_host_remove_is_refused_while_a_claim_of_an_instance_not_on_it_holds_it(engine: Engine, fakes: Fakes) -> None:
    """A claim whose instance has no host set (a build between its claim and its first step) keeps the host unless forced."""
    engine.hosts.driver("h1")
    fakes["h1"].faults.fail_next("spawn")
    with pytest.raises(TaskFailed):
        engine.create("vm", host="h1", flavor=FLAVOR, image="cirros")
    (failed,) = [i for i in engine.list() if i.vm_state is V.ERROR]
    assert failed.host is None and engine.store.claims.of(failed.uuid) == []
    assert engine.store.claims.claim(failed.uuid, "h1", vcpus=1, memory_mb=64, disk_gb=1, ratios=(16.0, 1.5, 1.0))
    with pytest.raises(HostInUse, match=failed.uuid):
        engine.hosts.remove("h1")
    assert engine.store.claims.of(failed.uuid) == ["h1"] and engine.hosts.get("h1").vcpus_used == 1
    assert engine.hosts.remove("h1", force=True) == []
    assert engine.store.claims.of(failed.uuid) == []


def test_a_driver_error_holding_a_nul_byte_still_ends_the_task(engine: Engine, fakes: Fakes) -> None:
    """The failure write shows a NUL byte escaped (PostgreSQL text refuses one): the task ends failed, not running."""
    from lifecycle.errors import DriverError

    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    fakes["h1"].faults.fail_next("power_off", DriverError("bad\x00byte", call="power_off"))
    with pytest.raises(TaskFailed, match=r"bad\\x00byte"):
        engine.stop(uuid)
    task = engine.store.tasks.of(uuid)[-1]
    assert task.outcome is Outcome.FAILED and task.error is not None and "bad\\x00byte" in task.error
    assert engine.get(uuid).vm_state is V.ACTIVE and engine.get(uuid).task_id is None
