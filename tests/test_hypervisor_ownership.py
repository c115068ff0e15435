"""Ownership reaches the hypervisor: stalled workers, stale copies and lost domains never cost a disk (fake hosts).

Each test writes a data marker into the guest's disk (the fake driver keeps
disk contents) and checks it survives what a hostile operator did: a worker
stalled in a driver call while a forced recovery finished its task, a copy
of an earlier life of the instance on the destination, a domain lost while
its disk survived. The same reproductions run on real QEMU in
``test_ownership_qemu.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from lifecycle import Engine, Flavor, PowerState, TaskFailed, VmState
from lifecycle.config import Settings
from lifecycle.errors import DriverUnavailable, Fenced
from lifecycle.recovery import RecoveryOutcome
from lifecycle.states import MigrationStatus
from tests.conftest import Fakes
from tests.images import fake_image
from tests.invariants import check_invariants

V, P = VmState, PowerState
SMALL, BIG = Flavor(1, 512, 1, name="small"), Flavor(2, 1024, 2, name="big")


@pytest.fixture
def twins(db_url: str, fakes: Fakes) -> Iterator[Callable[[], Engine]]:
    """Open engines sharing one database, one owner name (a forced recovery's) and fake hosts a, b and c."""
    opened: list[Engine] = []

    def open_engine() -> Engine:
        engine = Engine(db_url, driver_factory=fakes.factory, owner="engine-x", settings=Settings(shutdown_timeout=0))
        if not engine.hosts.list():
            for name in ("a", "b", "c"):
                engine.hosts.add(name, "fake://", vcpus=8, memory_mb=8192, disk_gb=80)
            engine.images.add("cirros", fake_image("cirros"))
        for name in ("a", "b", "c"):
            engine.hosts.heartbeat(name)
        opened.append(engine)
        return engine

    yield open_engine
    check_invariants(opened[0].store)
    for engine in opened:
        engine.close()


def _vm(engine: Engine, fakes: Fakes, marker: str = "customer-data") -> str:
    """Create an instance on a and write ``marker`` into its disk."""
    uuid = engine.create("vm", host="a", flavor=SMALL, image="cirros").instance_uuid
    fakes.factory(engine.hosts.get("a")).write(uuid, marker)
    return uuid


def _in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker, errors


def test_a_stalled_copy_never_deletes_the_disk_its_recovery_made(twins: Callable[[], Engine], fakes: Fakes) -> None:
    """A migrate stalled mid-copy, finished by a forced recovery, then resumed, deletes only its own partial copy."""
    first = twins()
    uuid = _vm(first, fakes)
    b = fakes.factory(first.hosts.get("b"))
    gate = b.faults.hold("copy")
    worker, errors = _in_thread(lambda: first.migrate(uuid, host="b"))
    assert gate.wait_entered()
    second = twins()
    [recovered] = second.recover(force=True)
    assert (recovered.plan, recovered.outcome) == ("resume", RecoveryOutcome.SUCCEEDED)
    current = second.get(uuid).disk
    assert current is not None and current.endswith("-1")  # made by the recovery's attempt (epoch 1)
    gate.release()
    worker.join(10)
    assert not worker.is_alive() and len(errors) == 1 and isinstance(errors[0], Fenced)
    assert b.volumes() == {current: "image:" + first.store.images.get("cirros").path + "|customer-data"}
    second.confirm_resize(uuid)
    assert b.domain_disk(uuid) is not None and b.domain_disk(uuid).endswith("|customer-data")  # type: ignore[union-attr]
    assert fakes.factory(second.hosts.get("a")).volumes() == {}


def test_a_stale_copy_on_the_destination_is_destroyed_never_started(twins: Callable[[], Engine], fakes: Fakes) -> None:
    """A copy of an earlier life on the destination is destroyed (audited) before the move copies the current disk."""
    engine = twins()
    uuid = _vm(engine, fakes, "old")
    a, b = fakes.factory(engine.hosts.get("a")), fakes.factory(engine.hosts.get("b"))
    b.copy_domain_from(a, uuid)  # what an evacuation off b left there while b was fenced but alive
    a.write(uuid, "new")
    engine.migrate(uuid, host="b")
    i = engine.get(uuid)
    assert (i.host, i.status) == ("b", "VERIFY_RESIZE")
    assert b.domain_disk(uuid) is not None and b.domain_disk(uuid).endswith("|old|new")  # type: ignore[union-attr]
    assert list(b.volumes()) == [i.disk]  # the stale disk went with its domain
    notes = [e.message or "" for e in engine.history(uuid) if "never adopted nor started" in (e.message or "")]
    assert len(notes) == 1 and "destroyed on b" in notes[0]


def test_unshelve_never_starts_a_stale_copy_on_its_host(twins: Callable[[], Engine], fakes: Fakes) -> None:
    """An offloaded instance unshelved to a host holding an old copy of it boots its snapshot, not the old copy."""
    engine = twins()
    uuid = _vm(engine, fakes, "old")
    a, b = fakes.factory(engine.hosts.get("a")), fakes.factory(engine.hosts.get("b"))
    b.copy_domain_from(a, uuid)
    b.set_power(uuid, P.SHUTDOWN, event=False)
    a.write(uuid, "shelved")
    engine.shelve(uuid)
    engine.unshelve(uuid, host="b")
    i = engine.get(uuid)
    assert (i.host, i.vm_state) == ("b", V.ACTIVE)
    assert b.domain_disk(uuid) is not None and b.domain_disk(uuid).endswith("|old|shelved")  # type: ignore[union-attr]
    assert list(b.volumes()) == [i.disk]


def test_a_stalled_resize_never_kills_the_guest_its_recovery_rolled_back(
    twins: Callable[[], Engine], fakes: Fakes
) -> None:
    """A resize stalled before the source powered off, rolled back by a forced recovery, leaves the guest running."""
    first = twins()
    uuid = _vm(first, fakes)
    a = fakes.factory(first.hosts.get("a"))
    gate = a.faults.hold("migrate_disk_and_power_off")
    worker, errors = _in_thread(lambda: first.resize(uuid, BIG))
    assert gate.wait_entered()
    second = twins()
    [recovered] = second.recover(force=True)
    assert (recovered.plan, recovered.outcome) == ("roll_back", RecoveryOutcome.ROLLED_BACK)
    gate.release()
    worker.join(10)
    assert not worker.is_alive() and len(errors) == 1 and isinstance(errors[0], Fenced)
    i = second.get(uuid)
    assert (i.host, i.vm_state, i.flavor) == ("a", V.ACTIVE, SMALL)
    assert a.get_info(uuid) is P.RUNNING and a.domain_disk(uuid).endswith("|customer-data")  # type: ignore[union-attr]


def test_a_hard_reboot_brings_back_a_lost_domain_on_its_disk(twins: Callable[[], Engine], fakes: Fakes) -> None:
    """A domain undefined behind the engine's back (disk kept) is defined anew on that disk by reboot --hard."""
    engine = twins()
    uuid = _vm(engine, fakes)
    a = fakes.factory(engine.hosts.get("a"))
    a.undefine(uuid)
    engine.reboot(uuid, hard=True)
    assert engine.get(uuid).vm_state is V.ACTIVE and a.get_info(uuid) is P.RUNNING
    assert a.domain_disk(uuid).endswith("|customer-data")  # type: ignore[union-attr]


def test_a_roll_back_that_cannot_reach_the_source_leaves_the_move_open(
    twins: Callable[[], Engine], fakes: Fakes
) -> None:
    """A copy failing while the source does not answer ends in error with the move open, disk kept; revert ends it."""
    engine = twins()
    uuid = _vm(engine, fakes)
    a, b = fakes.factory(engine.hosts.get("a")), fakes.factory(engine.hosts.get("b"))
    original = a.volumes()
    b.faults.fail_after("copy", DriverUnavailable("source vanished mid-copy", call="copy"))
    before = b._before

    def source_gone_at_the_copy(call: str) -> BaseException | None:
        if call == "copy":
            a.unreachable = True  # the source stops answering while its disk is being read
        return before(call)

    b._before = source_gone_at_the_copy  # type: ignore[method-assign]
    with pytest.raises(TaskFailed):
        engine.migrate(uuid, host="b")
    a.unreachable = False
    i = engine.get(uuid)
    migration = engine.store.moves.open_of(uuid)
    assert i.vm_state is V.ERROR and i.host == "a" and migration is not None
    assert migration.status is not MigrationStatus.ERROR and a.volumes() == original  # the disk is kept on a
    assert b.volumes() == {}  # the partial copy went
    engine.revert_resize(uuid)  # once the source answers, the move is finished onto it with its disk
    i = engine.get(uuid)
    assert (i.vm_state, i.host, a.get_info(uuid)) == (V.ACTIVE, "a", P.RUNNING)
    assert a.domain_disk(uuid).endswith("|customer-data") and engine.store.moves.open_of(uuid) is None  # type: ignore[union-attr]


def test_a_resumed_copy_that_fails_rolls_back_to_stopped(twins: Callable[[], Engine], fakes: Fakes) -> None:
    """A stopped instance's move cut by a crash, whose resumed copy then fails, ends stopped on its source, not error."""
    from lifecycle.drivers.fake import SimulatedCrash

    engine = twins()
    uuid = _vm(engine, fakes)
    engine.stop(uuid)
    b = fakes.factory(engine.hosts.get("b"))
    b.faults.crash_after("copy")
    with pytest.raises(SimulatedCrash):
        engine.migrate(uuid, host="b")
    b.faults.fail_next("copy")
    [recovered] = twins().recover(force=True)
    assert (recovered.plan, recovered.outcome) == ("resume", RecoveryOutcome.FAILED)
    i = engine.get(uuid)
    assert (i.vm_state, i.host, i.task_state) == (V.STOPPED, "a", None)
    assert fakes.factory(engine.hosts.get("a")).domain_disk(uuid).endswith("|customer-data")  # type: ignore[union-attr]


def test_a_copy_cut_by_a_crash_leaves_one_disk_once_recovered(twins: Callable[[], Engine], fakes: Fakes) -> None:
    """The partial copy a dead worker left on the destination goes when its recovery copies again: one disk stays."""
    from lifecycle.drivers.fake import SimulatedCrash

    engine = twins()
    uuid = _vm(engine, fakes)
    b = fakes.factory(engine.hosts.get("b"))
    b.faults.crash_after("copy")
    with pytest.raises(SimulatedCrash):
        engine.migrate(uuid, host="b")
    assert len(b.volumes()) == 1  # the dead worker's partial copy
    [recovered] = twins().recover(force=True)
    assert recovered.outcome is RecoveryOutcome.SUCCEEDED
    i = engine.get(uuid)
    assert list(b.volumes()) == [i.disk] and b.domain_disk(uuid).endswith("|customer-data")  # type: ignore[union-attr]


def test_a_destination_silent_before_the_copy_rolls_the_move_back(twins: Callable[[], Engine], fakes: Fakes) -> None:
    """A destination that does not answer when the move clears it puts the guest back on its source, running."""
    engine = twins()
    uuid = _vm(engine, fakes)
    b = fakes.factory(engine.hosts.get("b"))
    b.unreachable = True
    with pytest.raises(TaskFailed, match="does not answer before the copy"):
        engine.migrate(uuid, host="b")
    i = engine.get(uuid)
    a = fakes.factory(engine.hosts.get("a"))
    assert (i.vm_state, i.host, a.get_info(uuid)) == (V.ACTIVE, "a", P.RUNNING)
    assert engine.store.moves.open_of(uuid) is None and a.domain_disk(uuid).endswith("|customer-data")  # type: ignore[union-attr]


def test_a_second_forced_recovery_never_takes_the_first_ones_task(
    db_url: str, twins: Callable[[], Engine], fakes: Fakes
) -> None:
    """A forced recovery runs a dead engine's task under a name of its own: a second one, forced too, takes nothing."""
    first = twins()
    uuid = _vm(first, fakes)
    b = fakes.factory(first.hosts.get("b"))
    gates = [b.faults.hold("copy"), b.faults.hold("copy")]  # the first worker's copy, then the recovery's
    worker, _ = _in_thread(lambda: first.migrate(uuid, host="b"))
    assert gates[0].wait_entered()
    rescuer = Engine(db_url, driver_factory=fakes.factory, settings=Settings(shutdown_timeout=0))
    rescue, _ = _in_thread(lambda: rescuer.recover(force=True, owner="engine-x"))
    try:
        assert gates[1].wait_entered()  # the recovery's run is in flight
        late = Engine(db_url, driver_factory=fakes.factory, settings=Settings(shutdown_timeout=0))
        try:
            assert late.recover(force=True, owner="engine-x") == []
        finally:
            late.close()
        task = first.store.tasks.get(first.get(uuid).task_id or "")
        assert (task.epoch, task.owner) == (1, rescuer.owner)
    finally:
        for gate in gates:
            gate.release()
        rescue.join(10)
        worker.join(10)
        rescuer.close()
    assert first.get(uuid).host == "b" and first.get(uuid).status == "VERIFY_RESIZE"
