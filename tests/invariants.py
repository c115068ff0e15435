"""The SPEC section 1 invariants, checked against a database after commits."""

from __future__ import annotations

from lifecycle.records import Instance, Outcome
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
       states as they were only when it records a new task taking over.
    """
    for instance in store.list_instances(include_deleted=True):
        where = f"instance {instance.uuid} ({instance.vm_state}, {instance.task_state}, {instance.task_id})"
        assert (instance.task_state is None) == (instance.task_id is None), where
        running = [t for t in store.tasks_of(instance.uuid) if t.outcome is Outcome.RUNNING]
        assert [t.id for t in running] == ([instance.task_id] if instance.task_id else []), where
        if instance.vm_state is VmState.DELETED and instance.task_id is None:
            assert instance.power_state is PowerState.NOSTATE, where
        _check_audit_chain(store, instance)


def _check_audit_chain(store: Store, instance: Instance) -> None:
    entries = store.history(instance.uuid)
    assert entries, f"instance {instance.uuid} has no audit rows"
    state: tuple[object, ...] = (None, None, None)
    task: str | None = None
    for e in entries:
        assert (e.from_vm_state, e.from_task_state, e.from_power_state) == state, (instance, e)
        after = (e.to_vm_state, e.to_task_state, e.to_power_state)
        assert after != state or e.task_id != task, f"audit row {e.id} records no change"
        state, task = after, e.task_id
    current = (instance.vm_state.value, instance.task_state and instance.task_state.value, int(instance.power_state))
    assert state == current, f"audit log of {instance.uuid} ends at {state}, row is {current}"
