"""Shelve, shelve offload and unshelve on the fake driver: walks, claims, the snapshot image, and every failure path."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lifecycle import Engine, InvalidInput, InvalidState, Outcome, PowerState, TaskFailed, VmState
from lifecycle.errors import DriverError, DriverUnavailable, Preempted
from lifecycle.snapshots import image_store, snapshot_name
from tests.conftest import FLAVOR, Fakes, library_logging_kept, make_engine
from tests.invariants import check_invariants

V, P = VmState, PowerState


@pytest.fixture
def keeping(db_url: str, fakes: Fakes) -> Iterator[Engine]:
    """An engine whose shelve keeps the instance on its host for an hour (shelved_offload_time 3600)."""
    eng = make_engine(db_url, fakes, shutdown_timeout=0.0, shelved_offload_time=3600.0)
    yield eng
    check_invariants(eng.store)
    eng.close()


def _snapshot(engine: Engine, uuid: str) -> Path | None:
    names = {i.name: i for i in engine.images.list()}
    image = names.get(snapshot_name(uuid))
    return None if image is None else Path(image.path)


@pytest.mark.parametrize("before", [[], ["stop"], ["pause"], ["suspend"]])
def test_shelve_offloads_at_once_from_each_allowed_state(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str], before: list[str]
) -> None:
    """From active, stopped, paused and suspended, shelve walks Nova's four steps and ends offloaded, nothing kept."""
    uuid = new_instance()
    disk = fakes["h1"].domain_disk(uuid)
    for op in before:
        engine.run(op, uuid)
    task = engine.shelve(uuid)
    i = engine.get(uuid)
    assert (i.vm_state, i.task_state, i.host, i.power_state, i.status) == (
        V.SHELVED_OFFLOADED,
        None,
        None,
        P.NOSTATE,
        "SHELVED_OFFLOADED",
    )
    steps = engine.steps(task.id)
    assert [(s.name, s.result) for s in steps] == [
        ("shelving", "ok"),
        ("shelving_image_pending_upload", "ok"),
        ("shelving_image_uploading", "ok"),
        ("shelving_offloading", "ok"),
    ]
    assert not fakes["h1"].domain_exists(uuid) and engine.store.claims.of(uuid) == []
    snapshot = _snapshot(engine, uuid)
    assert snapshot is not None and snapshot.read_text() == disk  # the disk lives on in the image


def test_shelve_keeps_the_host_until_offload(keeping: Engine, fakes: Fakes) -> None:
    """With shelved_offload_time set, shelve ends shelved on its host (off, claim held); offload then frees it."""
    uuid = keeping.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    task = keeping.shelve(uuid)
    i = keeping.get(uuid)
    assert (i.vm_state, i.host, i.power_state, i.status) == (V.SHELVED, "h1", P.SHUTDOWN, "SHELVED")
    assert [s.name for s in keeping.steps(task.id)][-1] == "shelving_image_uploading"
    assert keeping.store.claims.of(uuid) == ["h1"] and fakes["h1"].get_info(uuid) is P.SHUTDOWN
    keeping.shelve_offload(uuid)
    i = keeping.get(uuid)
    assert (i.vm_state, i.host, i.power_state) == (V.SHELVED_OFFLOADED, None, P.NOSTATE)
    assert not fakes["h1"].domain_exists(uuid) and keeping.store.claims.of(uuid) == []


def test_unshelve_of_an_offloaded_instance_spawns_its_snapshot_elsewhere(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """Unshelve --host h2 claims h2, spawns from the snapshot there, ends active and deletes the snapshot."""
    uuid = new_instance()
    disk = fakes["h1"].domain_disk(uuid)
    engine.shelve(uuid)
    snapshot = _snapshot(engine, uuid)
    assert snapshot is not None
    task = engine.unshelve(uuid, host="h2")
    i = engine.get(uuid)
    assert (i.vm_state, i.host, i.power_state, i.status) == (V.ACTIVE, "h2", P.RUNNING, "ACTIVE")
    assert [(s.name, s.result) for s in engine.steps(task.id)] == [("unshelving", "ok"), ("spawning", "ok")]
    assert fakes["h2"].domain_disk(uuid) == disk  # the shelved disk's content
    assert engine.store.claims.of(uuid) == ["h2"] and not fakes["h1"].domain_exists(uuid)
    assert _snapshot(engine, uuid) is None and not snapshot.exists()


def test_unshelve_of_a_shelved_instance_powers_it_on_in_place(keeping: Engine, fakes: Fakes) -> None:
    """A shelved (not offloaded) instance is started where it is; --host is refused for it, naming why."""
    uuid = keeping.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    keeping.shelve(uuid)
    with pytest.raises(InvalidInput, match="only for an offloaded instance"):
        keeping.unshelve(uuid, host="h2")
    keeping.unshelve(uuid)
    i = keeping.get(uuid)
    assert (i.vm_state, i.host, i.power_state) == (V.ACTIVE, "h1", P.RUNNING)
    assert _snapshot(keeping, uuid) is None


def test_a_failed_snapshot_powers_a_running_guest_back_on(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A snapshot that fails leaves the instance active and running, its claim held, no snapshot image."""
    uuid = new_instance()
    fakes["h1"].faults.fail_next("snapshot", DriverError("disk unreadable (injected)"))
    with pytest.raises(TaskFailed, match="disk unreadable"):
        engine.shelve(uuid)
    i = engine.get(uuid)
    assert (i.vm_state, i.task_state, i.host, i.power_state) == (V.ACTIVE, None, "h1", P.RUNNING)
    assert engine.store.claims.of(uuid) == ["h1"] and _snapshot(engine, uuid) is None


def test_an_offload_that_cannot_reach_the_host_ends_shelved_and_the_duty_finishes_it(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """The offload at once failing keeps the instance shelved on its host, noted; the daemon's duty offloads it."""
    uuid = new_instance()
    fakes["h1"].faults.fail_next("destroy", DriverUnavailable("host h1 went away (injected)"))
    task = engine.shelve(uuid)
    assert task.outcome is Outcome.SUCCEEDED
    i = engine.get(uuid)
    assert (i.vm_state, i.host, i.power_state) == (V.SHELVED, "h1", P.SHUTDOWN)
    assert "offload failed" in (engine.history(uuid)[-1].message or "")
    results = engine.duties.offload_shelved_instances()  # shelved_offload_time is 0: due at once
    assert [r.outcome for r in results] == ["offloaded"]
    i = engine.get(uuid)
    assert (i.vm_state, i.host) == (V.SHELVED_OFFLOADED, None) and engine.store.claims.of(uuid) == []
    assert engine.history(uuid)[-1].cause == "timer"


def test_the_duty_waits_for_shelved_offload_time(keeping: Engine) -> None:
    """An instance shelved for less than shelved_offload_time is left on its host; older_than=0 offloads it."""
    uuid = keeping.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    keeping.shelve(uuid)
    assert keeping.duties.offload_shelved_instances() == []
    assert keeping.get(uuid).vm_state is V.SHELVED
    assert [r.outcome for r in keeping.duties.offload_shelved_instances(older_than=0)] == ["offloaded"]
    assert keeping.get(uuid).vm_state is V.SHELVED_OFFLOADED


def test_a_failed_unshelve_stays_offloaded_and_can_be_tried_again(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A spawn failing on the chosen host gives its claim back, leaves nothing there, keeps the snapshot."""
    uuid = new_instance()
    engine.shelve(uuid)
    fakes.factory(engine.hosts.get("h2"))
    fakes["h2"].faults.fail_after("spawn_from_snapshot", DriverError("qemu died (injected)"))
    with pytest.raises(TaskFailed, match="qemu died"):
        engine.unshelve(uuid, host="h2")
    i = engine.get(uuid)
    assert (i.vm_state, i.task_state, i.host) == (V.SHELVED_OFFLOADED, None, None)
    assert engine.store.claims.of(uuid) == [] and not fakes["h2"].domain_exists(uuid)
    assert _snapshot(engine, uuid) is not None
    engine.unshelve(uuid, host="h2")
    assert engine.get(uuid).vm_state is V.ACTIVE


def test_nothing_but_unshelve_and_delete_touches_an_offloaded_instance(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """Start, stop, soft delete, rebuild and migrate are refused for an offloaded instance, nothing written."""
    uuid = new_instance()
    engine.shelve(uuid)
    version = engine.get(uuid).version
    for op in ("start", "stop", "soft_delete", "rebuild", "migrate", "shelve", "shelve_offload"):
        with pytest.raises(InvalidState):
            engine.run(op, uuid)
    assert engine.get(uuid).version == version


def test_unshelve_is_refused_when_the_snapshot_is_gone(engine: Engine, new_instance: Callable[..., str]) -> None:
    """An offloaded instance whose snapshot image vanished cannot be unshelved: a typed error naming the image."""
    uuid = new_instance()
    engine.shelve(uuid)
    engine.store.images.remove(snapshot_name(uuid))
    with pytest.raises(InvalidInput, match=snapshot_name(uuid)):
        engine.unshelve(uuid)
    assert engine.get(uuid).task_id is None


@pytest.mark.parametrize("offload", [True, False])
def test_delete_of_a_shelved_instance_drops_its_snapshot(keeping: Engine, fakes: Fakes, offload: bool) -> None:
    """Deleting a shelved or an offloaded instance removes its domain, claims and snapshot (row and file)."""
    uuid = keeping.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    keeping.shelve(uuid)
    if offload:
        keeping.shelve_offload(uuid)
    snapshot = _snapshot(keeping, uuid)
    assert snapshot is not None and snapshot.exists()
    keeping.delete(uuid)
    assert keeping.get(uuid).vm_state is V.DELETED
    assert _snapshot(keeping, uuid) is None and not snapshot.exists()
    assert not fakes["h1"].domain_exists(uuid) and keeping.store.claims.of(uuid) == []


def test_with_reclaim_an_offloaded_instance_is_deleted_for_good(db_url: str, fakes: Fakes) -> None:
    """Under reclaim_instance_interval, delete of an offloaded instance is a delete (nothing to keep), not a soft one."""
    engine = make_engine(db_url, fakes, shutdown_timeout=0.0, reclaim_instance_interval=3600.0)
    try:
        uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
        engine.shelve(uuid)
        assert engine.delete(uuid).operation == "delete"
        assert engine.get(uuid).vm_state is V.DELETED
    finally:
        engine.close()


def test_a_delete_racing_the_snapshot_leaves_no_snapshot_behind(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A delete that ends while the shelve's snapshot is being registered: no image row or file survives it."""
    uuid = new_instance()
    entered, release = threading.Event(), threading.Event()
    add_image = engine.store.images.add

    def held_add_image(*args: Any, **kwargs: Any) -> Any:
        entered.set()  # the snapshot file is written; the delete runs now, before the row exists
        assert release.wait(10)
        return add_image(*args, **kwargs)

    engine.store.images.add = held_add_image  # type: ignore[method-assign]
    engine.shelve(uuid, wait=False)
    assert entered.wait(10)
    assert list(image_store(engine.settings).glob(f"*{uuid}*"))  # the late file is there
    engine.delete(uuid)
    release.set()
    engine.runner.wait_idle()
    assert engine.get(uuid).vm_state is V.DELETED
    assert _snapshot(engine, uuid) is None
    assert list(image_store(engine.settings).glob(f"*{uuid}*")) == []  # the late worker removed its file
    assert not fakes["h1"].domain_exists(uuid) and engine.store.claims.of(uuid) == []


def test_the_cli_shelves_offloads_and_unshelves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`shelve`, `shelve-offload`, `unshelve --host` and `offload-shelved` work; a bad --host or age is exit 2."""
    import json

    from lifecycle.cli import main

    monkeypatch.setenv("LIFECYCLE_DB_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("LIFECYCLE_SHELVED_OFFLOAD_TIME", "3600")

    def run(*argv: str) -> tuple[int, Any]:
        code = main([*argv, "--json"] if argv[0] not in ("db", "host", "image") else list(argv))
        out = capsys.readouterr().out
        return code, json.loads(out) if out.strip().startswith(("{", "[")) else out

    with library_logging_kept():  # the CLI configures logging globally
        assert run("db", "upgrade")[0] == 0
        for host in ("h1", "h2"):
            assert run("host", "add", host, "--uri", f"fake://{tmp_path / (host + '.json')}")[0] == 0
        image = tmp_path / "cirros.qcow2"
        image.write_bytes(b"QFI\xfb")
        assert run("image", "add", "cirros", "--path", str(image))[0] == 0
        code, made = run("create", "vm", "--host", "h1", "--flavor", "vcpus=1,ram=64,disk=1", "--image", "cirros")
        uuid = made["uuid"]
        assert run("shelve", uuid)[1]["status"] == "SHELVED"
        assert run("unshelve", uuid, "--host", "h2")[0] == 2  # still on h1: refused, nothing changed
        assert run("shelve-offload", uuid)[1]["status"] == "SHELVED_OFFLOADED"
        assert run("unshelve", uuid, "--host", "nowhere")[0] == 2
        code, back = run("unshelve", uuid, "--host", "h2")
        assert (code, back["status"], back["host"]) == (0, "ACTIVE", "h2")
        assert run("shelve", uuid)[1]["status"] == "SHELVED"
        assert run("offload-shelved", "--older-than", "-1")[0] == 2
        code, done = run("offload-shelved", "--older-than", "0")
        assert (code, [(d["uuid"], d["outcome"]) for d in done]) == (0, [(uuid, "offloaded")])


def test_the_snapshot_names_are_kept_for_the_engine(engine: Engine, new_instance: Callable[..., str]) -> None:
    """`image add shelved-...` is refused, and a look-alike row never stands in for a snapshot nor gets deleted."""
    from tests.images import fake_image

    uuid = new_instance()
    with pytest.raises(InvalidInput, match="kept for shelve snapshots"):
        engine.images.add(snapshot_name(uuid), fake_image("decoy"))
    decoy = Path(fake_image("decoy"))
    engine.store.images.add(snapshot_name(uuid), str(decoy), "qcow2")  # as if written behind the API's back
    with pytest.raises(TaskFailed, match="already exists"):
        engine.shelve(uuid)
    assert engine.get(uuid).vm_state is V.ACTIVE and decoy.exists()  # powered back on; the file not touched
    engine.delete(uuid)
    assert decoy.exists() and engine.store.images.get(snapshot_name(uuid)).path == str(decoy)


# -- found by the hostile pass ---------------------------------------------------------------


def test_an_unshelve_taken_over_by_recovery_never_deletes_the_snapshot(
    one_owner: Callable[..., Engine], fakes: Fakes
) -> None:
    """The old worker of an unshelve recovery took over (and failed) stops fenced; the snapshot stays, nothing leaks."""
    first = one_owner()
    uuid = first.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    first.shelve(uuid)
    snapshot = _snapshot(first, uuid)
    assert snapshot is not None
    first.hosts.driver("h2")
    gate = fakes["h2"].faults.hold("spawn_from_snapshot")
    ended: list[str] = []

    def old_worker() -> None:
        try:
            first.unshelve(uuid, host="h2")
        except Preempted as exc:  # Fenced: recovery took the task over
            ended.append(type(exc).__name__)

    worker = threading.Thread(target=old_worker)
    worker.start()
    assert gate.wait_entered()
    second = one_owner()
    fakes["h2"].faults.fail_next("spawn_from_snapshot", DriverError("copy failed (injected)"))
    assert [r.outcome for r in second.recover(force=True)] == ["failed"]
    gate.release()
    worker.join(30)
    assert ended == ["Fenced"]
    i = second.get(uuid)
    assert (i.vm_state, i.host, i.task_id) == (V.SHELVED_OFFLOADED, None, None)
    assert _snapshot(second, uuid) == snapshot and snapshot.exists()  # the only copy of the disk survives
    assert second.store.claims.of(uuid) == [] and not fakes["h2"].domain_exists(uuid)
    second.unshelve(uuid, host="h2")
    assert second.get(uuid).vm_state is V.ACTIVE and not snapshot.exists()
    check_invariants(second.store)


def test_a_crash_after_the_offload_destroy_is_recovered_offloaded(
    one_owner: Callable[..., Engine], fakes: Fakes
) -> None:
    """Recovery of a shelve that died right after destroying the domain finishes the offload, snapshot kept."""
    from lifecycle.drivers.fake import SimulatedCrash

    first = one_owner()
    uuid = first.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    fakes["h1"].faults.crash_after("destroy")
    with pytest.raises(SimulatedCrash):
        first.shelve(uuid)
    first.close()
    second = one_owner()
    assert [r.outcome for r in second.recover(force=True)] == ["succeeded"]
    i = second.get(uuid)
    assert (i.vm_state, i.host, i.power_state) == (V.SHELVED_OFFLOADED, None, P.NOSTATE)
    assert second.store.claims.of(uuid) == [] and _snapshot(second, uuid) is not None
    second.unshelve(uuid)
    assert second.get(uuid).vm_state is V.ACTIVE


def test_offload_refuses_when_the_snapshot_file_is_gone(keeping: Engine, fakes: Fakes) -> None:
    """A shelved instance whose snapshot file vanished is not offloaded: its disk is the only copy; it stays shelved."""
    uuid = keeping.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    keeping.shelve(uuid)
    snapshot = _snapshot(keeping, uuid)
    assert snapshot is not None
    snapshot.unlink()
    with pytest.raises(TaskFailed, match="only copy"):
        keeping.shelve_offload(uuid)
    assert [r.outcome for r in keeping.duties.offload_shelved_instances(older_than=0)] == ["failed"]
    i = keeping.get(uuid)
    assert (i.vm_state, i.host) == (V.SHELVED, "h1") and fakes["h1"].domain_exists(uuid)


def test_offload_refuses_a_guest_started_behind_the_engine(keeping: Engine, fakes: Fakes) -> None:
    """A shelved guest found running (started outside the engine) is not offloaded: what it wrote would be lost."""
    uuid = keeping.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    keeping.shelve(uuid)
    fakes["h1"].set_power(uuid, P.RUNNING)
    with pytest.raises(TaskFailed, match="started outside the engine"):
        keeping.shelve_offload(uuid)
    i = keeping.get(uuid)
    assert (i.vm_state, i.host) == (V.SHELVED, "h1") and fakes["h1"].domain_exists(uuid)


@pytest.mark.parametrize("op", ["shelve_offload", "unshelve"])
def test_an_unreachable_host_keeps_a_shelved_instance_shelved(keeping: Engine, fakes: Fakes, op: str) -> None:
    """Offload and unshelve on a host that does not answer fail, the instance stays shelved; the duty retries later."""
    uuid = keeping.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    keeping.shelve(uuid)
    fakes["h1"].unreachable = True
    with pytest.raises(TaskFailed, match="unreachable"):
        keeping.run(op, uuid)
    assert [r.outcome for r in keeping.duties.offload_shelved_instances(older_than=0)] == ["failed"]
    assert (keeping.get(uuid).vm_state, keeping.get(uuid).host) == (V.SHELVED, "h1")
    fakes["h1"].unreachable = False
    assert [r.outcome for r in keeping.duties.offload_shelved_instances(older_than=0)] == ["offloaded"]
    assert keeping.get(uuid).vm_state is V.SHELVED_OFFLOADED


def test_a_failed_snapshot_of_a_paused_guest_leaves_it_paused(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A paused guest whose snapshot fails is started and paused again: the instance stays paused, not error."""
    uuid = new_instance()
    engine.pause(uuid)
    fakes["h1"].faults.fail_next("snapshot", DriverError("disk unreadable (injected)"))
    with pytest.raises(TaskFailed):
        engine.shelve(uuid)
    i = engine.get(uuid)
    assert (i.vm_state, i.power_state) == (V.PAUSED, P.PAUSED) and fakes["h1"].get_info(uuid) is P.PAUSED


def test_a_snapshot_is_no_image_to_build_from(engine: Engine, new_instance: Callable[..., str]) -> None:
    """create and rebuild refuse a shelve snapshot as their image (it belongs to its instance's unshelve)."""
    uuid = new_instance()
    engine.shelve(uuid)
    other = new_instance("other")
    with pytest.raises(InvalidInput, match="shelve snapshot"):
        engine.create("thief", host="h2", flavor=FLAVOR, image=snapshot_name(uuid))
    with pytest.raises(InvalidInput, match="shelve snapshot"):
        engine.rebuild(other, image=snapshot_name(uuid))
    assert _snapshot(engine, uuid) is not None


@pytest.mark.parametrize("bad", ["snaps", "./snaps", "../x"])
def test_a_relative_image_store_is_refused(bad: str) -> None:
    """image_store_dir must be absolute: a relative one would move with the working directory and lose snapshots."""
    from lifecycle import Settings

    with pytest.raises(InvalidInput, match="image_store_dir"):
        Settings(image_store_dir=bad)


def test_a_shelved_instance_of_a_dead_fenced_host_is_offloaded_and_its_leftover_destroyed(
    keeping: Engine, fakes: Fakes
) -> None:
    """Host evacuate offloads a shelved instance of a down, fenced host in the database; its return destroys the copy."""
    from datetime import UTC, datetime, timedelta

    uuid = keeping.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    keeping.shelve(uuid)
    fakes["h1"].unreachable = True
    with pytest.raises(TaskFailed):  # merely silent: not offloaded, it stays shelved there
        keeping.shelve_offload(uuid)
    assert keeping.get(uuid).vm_state is V.SHELVED
    keeping.store.hosts.update(
        "h1", last_heartbeat=datetime.now(UTC) - timedelta(seconds=keeping.settings.host_down_after + 5)
    )
    keeping.hosts.fence("h1", reason="dead", actor="test")
    results = keeping.hosts.evacuate("h1")
    assert [(r.uuid, r.outcome) for r in results] == [(uuid, "offloaded")]
    i = keeping.get(uuid)
    assert (i.vm_state, i.host) == (V.SHELVED_OFFLOADED, None) and keeping.store.claims.of(uuid) == []
    assert "destroyed when its hypervisor answers again" in (keeping.history(uuid)[-1].message or "")
    assert fakes["h1"].domain_exists(uuid)  # still there: nobody could reach it
    fakes["h1"].unreachable = False
    assert keeping.hosts.destroy_evacuated("h1") == [uuid]
    assert not fakes["h1"].domain_exists(uuid)
    keeping.hosts.unfence("h1")
    keeping.unshelve(uuid, host="h2")
    assert keeping.get(uuid).vm_state is V.ACTIVE


def test_delete_removes_scratch_files_a_killed_shelve_left(engine: Engine, new_instance: Callable[..., str]) -> None:
    """Files a SIGKILLed shelve or unshelve left for an instance (.download, .part, .delta) go with its delete."""
    uuid = new_instance()
    other = new_instance("other")
    store = image_store(engine.settings)
    store.mkdir(parents=True)
    left = [store / f"{snapshot_name(uuid)}.qcow2.x1{suffix}" for suffix in (".download", ".part", ".delta")]
    kept = store / f"{snapshot_name(other)}.qcow2.x2.download"
    for path in [*left, kept]:
        path.write_bytes(b"disk bytes")
    engine.delete(uuid)
    assert not any(p.exists() for p in left) and kept.exists()  # another instance's are not this delete's


def test_minus_one_never_offloads(db_url: str, fakes: Fakes) -> None:
    """shelved_offload_time -1 (Nova's never): shelve keeps the host and the duty leaves it; other negatives are refused."""
    from lifecycle import Settings

    with pytest.raises(InvalidInput, match="shelved_offload_time"):
        Settings(shelved_offload_time=-2)
    engine = make_engine(db_url, fakes, shutdown_timeout=0.0, shelved_offload_time=-1.0)
    try:
        uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
        engine.shelve(uuid)
        assert engine.duties.offload_shelved_instances() == []
        assert (engine.get(uuid).vm_state, engine.get(uuid).host) == (V.SHELVED, "h1")
    finally:
        engine.close()
