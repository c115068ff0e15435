"""Delete from everywhere: delete and force_delete end every instance, whatever state it is stuck in.

For every (vm_state, task_state) pair the operations table allows (each
operation's walk from each of its source vm_states, and every idle
vm_state), the instance is put there with a task that is running (a live
owner), stuck (an owner whose lease ran out) or none, on a host whose
hypervisor is up, down (unreachable, no heartbeat) or failing once, or with
no host at all. Delete and force_delete must end it ``deleted`` with no task
running, no claim held, and no domain left on a host that answers (a down
host's leftover is reaped by its next sync pass).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lifecycle import Engine, Outcome, PowerState, Settings, TaskFailed, TaskState, VmState, graph
from lifecycle.audit import Why
from lifecycle.records import Cause, Instance
from tests.conftest import FLAVOR, Fakes
from tests.images import fake_image
from tests.invariants import check_invariants

V = VmState


def _pairs() -> list[tuple[VmState, TaskState | None]]:
    pairs: set[tuple[VmState, TaskState | None]] = {(vm, None) for vm in V if vm is not V.DELETED}
    for op in graph.OPERATIONS:
        for vm in [V.BUILDING] if op.creates else op.allowed_vm_states:
            pairs.update((vm, ts) for ts in op.walk)
    return sorted(pairs, key=lambda p: (p[0].value, p[1].value if p[1] else ""))


PAIRS = _pairs()
HOSTS = ["up", "down", "failing", "none"]
TASKS = ["none", "running", "stuck"]
OPERATIONS = ["delete", "force_delete"]


def _place(engine: Engine, fakes: Fakes, vm: VmState, ts: TaskState | None, host: str, task: str) -> str:
    """Create an instance on h1 and write it into (vm, ts) with a task of the given kind, audited."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    store = engine.store
    current = store.instances.get(uuid)
    setup = engine.runner.new_task(
        uuid, "stop", params={}, request_id=None, key=None, actor="test-setup", cause=Cause.API
    )
    why = Why(actor="test-setup", cause=Cause.API, operation="setup", task_id=setup.id)
    current = store.writes.begin(current, setup, TaskState.POWERING_OFF, why, None)
    fields = {"host": None} if host == "none" else {}
    if host == "none":  # as a host-less instance (a failed build, a removed host) holds no claim and no domain here
        store.claims.release(uuid)
        fakes["h1"].destroy(uuid, destroy_disks=True)
    current = store.writes.finish(
        current, setup, vm_state=vm, power_state=current.power_state, outcome=Outcome.SUCCEEDED, why=why, **fields
    )
    if ts is not None:
        owner = "engine-alive" if task == "running" else "engine-dead"
        t = replace(
            engine.runner.new_task(
                uuid, "stop", params={}, request_id=None, key=None, actor="test-setup", cause=Cause.API
            ),
            owner=owner,
        )
        if task == "stuck":
            t = replace(t, lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        current = store.writes.begin(current, t, ts, replace(why, task_id=t.id), None)
    if host == "down":
        fakes["h1"].unreachable = True
        store.hosts.update(
            "h1", last_heartbeat=datetime.now(UTC) - timedelta(seconds=engine.settings.host_down_after + 5)
        )
    elif host == "failing":
        fakes["h1"].faults.fail_next("destroy", OSError(5, "Input/output error"))
    return uuid


def _delete(engine: Engine, op: str, uuid: str) -> Instance:
    """Run the delete; a failure is retried once (the failing host fails one call only)."""
    try:
        engine.run(op, uuid)
    except TaskFailed:
        engine.run(op, uuid)
    return engine.get(uuid)


@pytest.mark.parametrize(("vm", "ts"), PAIRS, ids=[f"{vm.value}-{ts.value if ts else 'idle'}" for vm, ts in PAIRS])
def test_delete_ends_every_state(tmp_path: Path, vm: VmState, ts: TaskState | None) -> None:
    """From this (vm_state, task_state), with every host and task situation, both deletes end in deleted, clean."""
    url = f"sqlite:///{tmp_path / 'everywhere.db'}"
    from lifecycle import upgrade

    upgrade(url)
    fakes = Fakes()
    engine = Engine(url, driver_factory=fakes.factory, settings=Settings(shutdown_timeout=0))
    engine.hosts.add("h1", "fake://")
    engine.images.add("cirros", fake_image())
    engine.hosts.driver("h1")
    for host, task, op in itertools.product(HOSTS, TASKS, OPERATIONS):
        if (ts is None and task != "none") or (ts is not None and task == "none"):
            continue
        engine.hosts.heartbeat("h1")
        fakes["h1"].unreachable = False
        uuid = _place(engine, fakes, vm, ts, host, task)
        where = f"{op} from {vm.value}/{ts} host={host} task={task}"
        i = _delete(engine, op, uuid)
        assert (i.vm_state, i.task_state, i.task_id, i.power_state) == (V.DELETED, None, None, PowerState.NOSTATE), (
            where
        )
        assert not [t for t in engine.tasks(uuid) if t.outcome is Outcome.RUNNING], where
        assert engine.store.claims.of(uuid) == [], where
        if host == "down":
            fakes["h1"].unreachable = False
            assert uuid in engine.hosts.sync("h1")[0].reaped, where
        assert not fakes["h1"].domain_exists(uuid), where
    assert engine.hosts.get("h1").vcpus_used == 0
    check_invariants(engine.store)
    engine.close()


def test_the_sweep_covers_every_pair_the_table_allows() -> None:
    """The pairs above are the table's: every operation's walk from each source, plus every idle vm_state."""
    walks = {ts for op in graph.OPERATIONS for ts in op.walk}
    assert {ts for _, ts in PAIRS} == walks | {None}
    assert {vm for vm, _ in PAIRS} == set(V) - {V.DELETED}
    assert len(PAIRS) == 108, len(PAIRS)  # with (error, resize_reverting): a revert of a failed move
