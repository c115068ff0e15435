"""Invariants checked against a database after commits: SPEC section 1, claims, tasks ended, no deleted guests."""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from lifecycle.records import Flavor, Instance, Outcome
from lifecycle.states import PowerState, VmState
from lifecycle.store import Store


def check_invariants(store: Store) -> None:
    """Assert every invariant of SPEC section 1 over every instance in ``store``.

    1. task_state is None iff task_id is None, and task_id names the one
       running task of the instance;
    2. a deleted instance has no task and power_state 0;
    3. the audit log replays to the current states: each row starts where the
       previous one ended and the last one ends at the row's states, so no
       change is missing an audit row and none has two; a row may leave the
       states as they were only when it records a new task taking over, or
       when it is a note outside any task saying what was done to the
       instance (a leftover domain reaped, a host removed by force under an
       instance already in error).
    """
    for instance in store.instances.list(include_deleted=True):
        where = f"instance {instance.uuid} ({instance.vm_state}, {instance.task_state}, {instance.task_id})"
        assert (instance.task_state is None) == (instance.task_id is None), where
        running = [t for t in store.tasks.of(instance.uuid) if t.outcome is Outcome.RUNNING]
        assert [t.id for t in running] == ([instance.task_id] if instance.task_id else []), where
        if instance.vm_state is VmState.DELETED and instance.task_id is None:
            assert instance.power_state is PowerState.NOSTATE, where
        _check_audit_chain(store, instance)


def _check_audit_chain(store: Store, instance: Instance) -> None:
    entries = store.instances.history(instance.uuid)
    assert entries, f"instance {instance.uuid} has no audit rows"
    state: tuple[object, ...] = (None, None, None)
    task: str | None = None
    for e in entries:
        assert (e.from_vm_state, e.from_task_state, e.from_power_state) == state, (instance, e)
        after = (e.to_vm_state, e.to_task_state, e.to_power_state)
        note = e.task_id is None and bool(e.message)  # e.g. the reaper's record of a leftover it destroyed
        assert after != state or e.task_id != task or note, f"audit row {e.id} records no change"
        state, task = after, e.task_id
    current = (instance.vm_state.value, instance.task_state and instance.task_state.value, int(instance.power_state))
    assert state == current, f"audit log of {instance.uuid} ends at {state}, row is {current}"


Size = tuple[int, int, int]
"""vcpus, memory in MiB, disk in GiB: what a claim reserves."""


def _size(flavor: Flavor) -> Size:
    return (flavor.vcpus, flavor.memory_mb, flavor.root_gb)


def expected_claims(store: Store, instance: Instance) -> dict[str, Size]:
    """Return the claims (host -> size) an idle instance must hold, by its states and its open move.

    An instance on host H holds one claim on H sized as its flavor; a resized
    one also holds one on its move's source, sized as the old flavor; an
    error one whose move is still open (it failed after the disk left the
    source, or its roll-back could not reach the source) keeps both claims of
    the move (source: old flavor, destination: new), since the source keeps
    the disk. Deleted and host-less instances hold none.
    """
    if instance.vm_state is VmState.DELETED or instance.host is None:
        return {}
    migration = store.moves.open_of(instance.uuid)
    if instance.vm_state is VmState.RESIZED:
        assert migration is not None and migration.dest_host == instance.host, (instance, migration)
        return {instance.host: _size(instance.flavor), migration.source_host: _size(migration.old_flavor)}
    # A move left open in error (it failed after the disk left the source, or its roll-back could not reach the
    # source, which then may not have recorded the kept disk yet): both claims stay until revert or delete.
    if instance.vm_state is VmState.ERROR and migration is not None and migration.dest_host is not None:
        assert instance.host in (migration.source_host, migration.dest_host), (instance, migration)
        return {migration.source_host: _size(migration.old_flavor), migration.dest_host: _size(migration.new_flavor)}
    return {instance.host: _size(instance.flavor)}


def check_claims(store: Store) -> None:
    """Assert that resource accounting matches the instances that hold it.

    1. per host, vcpus_used, memory_mb_used and disk_gb_used are the sums of
       the claims rows on that host;
    2. the claims rows are exactly those the live idle instances hold (see
       :func:`expected_claims`); an instance with a task in flight is skipped,
       its claims may be in between.
    """
    query = sa.text("SELECT instance_uuid, host, vcpus, memory_mb, disk_gb FROM claims")
    with store.engine.connect() as conn:
        held: dict[str, dict[str, Size]] = {}
        for uuid, host, vcpus, memory_mb, disk_gb in conn.execute(query):
            held.setdefault(uuid, {})[host] = (vcpus, memory_mb, disk_gb)
    for host in store.hosts.list():
        sums = [claims[host.name] for claims in held.values() if host.name in claims]
        used = tuple(sum(column) for column in zip(*sums, strict=True)) if sums else (0, 0, 0)
        assert (host.vcpus_used, host.memory_mb_used, host.disk_gb_used) == used, f"host {host.name} usage {used}"
    for instance in store.instances.list(include_deleted=True):
        if instance.task_id is None:
            claims, expected = held.pop(instance.uuid, {}), expected_claims(store, instance)
            where = f"instance {instance.uuid} ({instance.vm_state}, host {instance.host})"
            assert claims == expected, f"{where} holds claims {claims}, expected {expected}"
        else:
            held.pop(instance.uuid, None)
    assert not held, f"claims of unknown instances: {held}"


def check_tasks_ended(store: Store) -> None:
    """Assert that every task has ended: none running, each closed with its steps, a failed one saying why."""
    with store.engine.connect() as conn:
        tasks = conn.execute(sa.text("SELECT id, operation, outcome, finished_at, error FROM tasks")).all()
        open_steps = conn.execute(sa.text("SELECT task_id, name FROM task_steps WHERE finished_at IS NULL")).all()
    for task_id, operation, outcome, finished_at, error in tasks:
        where = f"{operation} task {task_id} ({outcome})"
        assert outcome != Outcome.RUNNING.value and finished_at is not None, where
        assert outcome != Outcome.FAILED.value or error, f"{where} has no error"
    assert not open_steps, f"steps left open: {open_steps}"


def check_no_deleted_guests(store: Store, host: str, domains: Iterable[str]) -> None:
    """Assert that none of ``domains`` (a host's domains after a sync pass) belongs to a deleted instance."""
    uuids = sorted(domains)
    deleted = [u for u, i in store.sync.instances_by_uuid(uuids).items() if i.vm_state is VmState.DELETED]
    assert not deleted, f"host {host} still runs domains of deleted instances after a sync pass: {deleted}"
