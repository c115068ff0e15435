"""The operations table: Nova's guards, the definition-time checks, the exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lifecycle import graph
from lifecycle.errors import InvalidState
from lifecycle.graph import OPERATIONS, Operation, check_table
from lifecycle.states import PowerState, TaskState, VmState

V, T = VmState, TaskState
ANY_VM = set(VmState) - {V.DELETED}
ALL_TASKS = {None, *TaskState}
IDLE = {None}
NOVA_ALLOW_REBOOT = {
    None,
    T.REBOOTING,
    T.REBOOT_PENDING,
    T.REBOOT_STARTED,
    T.RESUMING,
    T.REBOOTING_HARD,
    T.UNPAUSING,
    T.PAUSING,
    T.SUSPENDING,
}

# Nova's guards (reference section 3.2), written out independently of the table.
# Deliberate differences are the rows marked DIFFERS; each is pinned by its own test.
NOVA_GUARDS: dict[str, tuple[set[VmState], set[TaskState | None], tuple[TaskState, ...]]] = {
    "start": ({V.STOPPED}, IDLE, (T.POWERING_ON,)),
    "force_stop": ({V.STOPPED, V.PAUSED}, IDLE, (T.POWERING_OFF,)),  # DIFFERS: Nova checks no vm_state
    "stop": ({V.ACTIVE, V.ERROR}, IDLE, (T.POWERING_OFF,)),
    "reboot": ({V.ACTIVE}, IDLE, (T.REBOOTING, T.REBOOT_PENDING, T.REBOOT_STARTED)),
    "reboot_hard": (
        {V.ACTIVE, V.STOPPED, V.PAUSED, V.SUSPENDED, V.ERROR},
        NOVA_ALLOW_REBOOT,
        (T.REBOOTING_HARD, T.REBOOT_PENDING_HARD, T.REBOOT_STARTED_HARD),
    ),
    "pause": ({V.ACTIVE}, IDLE, (T.PAUSING,)),
    "unpause": ({V.PAUSED}, IDLE, (T.UNPAUSING,)),
    "suspend": ({V.ACTIVE}, IDLE, (T.SUSPENDING,)),
    "resume": ({V.SUSPENDED}, IDLE, (T.RESUMING,)),
    "rescue": ({V.ACTIVE, V.STOPPED, V.ERROR}, IDLE, (T.RESCUING,)),
    "unrescue": ({V.RESCUED}, IDLE, (T.UNRESCUING,)),
    "resize": ({V.ACTIVE, V.STOPPED}, IDLE, (T.RESIZE_PREP, T.RESIZE_MIGRATING, T.RESIZE_MIGRATED, T.RESIZE_FINISH)),
    "migrate": ({V.ACTIVE, V.STOPPED}, IDLE, (T.RESIZE_PREP, T.RESIZE_MIGRATING, T.RESIZE_MIGRATED, T.RESIZE_FINISH)),
    "confirm_resize": ({V.RESIZED}, IDLE, (T.RESIZE_CONFIRMING,)),  # DIFFERS: Nova sets no task_state
    # DIFFERS: also from error, while a failed move is open (the runner checks the move)
    "revert_resize": ({V.RESIZED, V.ERROR}, IDLE, (T.RESIZE_REVERTING,)),
    "rebuild": (
        {V.ACTIVE, V.STOPPED, V.ERROR},
        IDLE,
        (T.REBUILDING, T.REBUILD_BLOCK_DEVICE_MAPPING, T.REBUILD_SPAWNING),
    ),
    "evacuate": (  # DIFFERS: Nova skips the task check; here it needs an idle instance
        {V.ACTIVE, V.STOPPED, V.ERROR},
        IDLE,
        (T.REBUILDING, T.REBUILD_BLOCK_DEVICE_MAPPING, T.REBUILD_SPAWNING),
    ),
    "delete": (ANY_VM, ALL_TASKS, (T.DELETING,)),
    "force_delete": (ANY_VM, ALL_TASKS, (T.DELETING,)),
    # DIFFERS: Nova allows any task; an offloaded instance's soft delete is a delete (Nova's local delete)
    "soft_delete": (ANY_VM - {V.SOFT_DELETED, V.SHELVED_OFFLOADED}, IDLE, (T.SOFT_DELETING,)),
    "restore": ({V.SOFT_DELETED}, IDLE, (T.RESTORING,)),
    "shelve": (
        {V.ACTIVE, V.STOPPED, V.PAUSED, V.SUSPENDED},
        IDLE,
        (T.SHELVING, T.SHELVING_IMAGE_PENDING_UPLOAD, T.SHELVING_IMAGE_UPLOADING, T.SHELVING_OFFLOADING),
    ),
    "shelve_offload": ({V.SHELVED}, IDLE, (T.SHELVING_OFFLOADING,)),
    "unshelve": ({V.SHELVED, V.SHELVED_OFFLOADED}, IDLE, (T.UNSHELVING, T.SPAWNING)),  # DIFFERS: Nova: unshelving only
}


def test_every_spec_operation_is_in_the_table() -> None:
    """The table holds every operation SPEC section 2 names, and create."""
    assert {op.name for op in OPERATIONS} == {*NOVA_GUARDS, "create"}


@pytest.mark.parametrize("name", sorted(NOVA_GUARDS))
def test_guards_equal_novas(name: str) -> None:
    """Each operation's allowed vm_states, task_states and walk equal Nova's."""
    op = graph.operation(name)
    vm, task, walk = NOVA_GUARDS[name]
    assert (set(op.allowed_vm_states), set(op.allowed_task_states), op.walk) == (vm, task, walk)


@pytest.mark.parametrize("name", sorted(NOVA_GUARDS))
def test_begin_admits_exactly_the_guard(name: str) -> None:
    """The machine built from the table admits exactly the guarded (vm_state, task_state) pairs."""
    vm_ok, task_ok, walk = NOVA_GUARDS[name]
    for vm_state in VmState:
        for task_state in (None, *TaskState):
            if vm_state in vm_ok and task_state in task_ok:
                assert graph.begin(name, "u", vm_state, task_state) is walk[0]
            else:
                with pytest.raises(InvalidState):
                    graph.begin(name, "u", vm_state, task_state)


def test_create_walk_and_guard() -> None:
    """Create needs no existing row and walks scheduling to spawning without an idle gap."""
    op = graph.operation("create")
    assert op.walk == (T.SCHEDULING, T.NETWORKING, T.BLOCK_DEVICE_MAPPING, T.SPAWNING)
    assert graph.begin("create", "u", None, None) is T.SCHEDULING
    with pytest.raises(InvalidState):
        graph.begin("create", "u", V.ACTIVE, None)


def test_force_stop_only_serves_the_sync_cases() -> None:
    """Differs from Nova on purpose: force_stop is admitted only from stopped and paused, the two sync uses."""
    assert graph.begin("force_stop", "u", V.PAUSED, None) is T.POWERING_OFF
    with pytest.raises(InvalidState):
        graph.begin("force_stop", "u", V.RESCUED, None)


def test_soft_delete_does_not_preempt() -> None:
    """Differs from Nova on purpose: soft delete is refused while a task runs (SPEC 2)."""
    with pytest.raises(InvalidState):
        graph.begin("soft_delete", "u", V.ACTIVE, T.POWERING_OFF)


def test_confirm_resize_is_a_task() -> None:
    """Differs from Nova on purpose: confirm walks resize_confirming so it is visible and recoverable."""
    assert graph.begin("confirm_resize", "u", V.RESIZED, None) is T.RESIZE_CONFIRMING


def test_delete_takes_over_a_running_delete() -> None:
    """Differs from Nova on purpose: a second delete takes over instead of being ignored."""
    assert graph.begin("delete", "u", V.ERROR, T.DELETING) is T.DELETING


def test_refusal_names_what_is_allowed() -> None:
    """InvalidState carries the operation, current states and the allowed ones, and says so."""
    with pytest.raises(InvalidState) as info:
        graph.begin("start", "abc", V.ACTIVE, None)
    err = info.value
    assert (err.operation, err.vm_state, err.task_state) == ("start", V.ACTIVE, None)
    assert err.allowed_vm_states == ["stopped"]
    assert "start is allowed from vm_state stopped" in str(err)


@pytest.mark.parametrize(
    ("name", "source", "power", "expected"),
    [
        ("stop", V.ACTIVE, PowerState.SHUTDOWN, V.STOPPED),
        ("stop", V.ERROR, PowerState.SHUTDOWN, V.STOPPED),
        ("reboot_hard", V.SUSPENDED, PowerState.RUNNING, V.ACTIVE),
        ("confirm_resize", V.RESIZED, PowerState.RUNNING, V.ACTIVE),
        ("confirm_resize", V.RESIZED, PowerState.SHUTDOWN, V.STOPPED),
        ("rebuild", V.ERROR, PowerState.RUNNING, V.ACTIVE),
        ("rebuild", V.STOPPED, PowerState.SHUTDOWN, V.STOPPED),
        ("delete", V.RESCUED, PowerState.NOSTATE, V.DELETED),
    ],
)
def test_success_end_states(name: str, source: VmState, power: PowerState, expected: VmState) -> None:
    """Operations end where Nova ends them, including the power- and source-dependent ones."""
    assert graph.end_vm_state(name, source, succeeded=True, power=power) is expected


def test_revert_returns_to_the_previous_vm_state() -> None:
    """revert_resize ends in the vm_state recorded before the move."""
    assert (
        graph.end_vm_state("revert_resize", V.RESIZED, succeeded=True, power=PowerState.SHUTDOWN, previous=V.STOPPED)
        is V.STOPPED
    )


@pytest.mark.parametrize("previous", [V.ACTIVE, V.STOPPED])
def test_revert_from_error_returns_to_the_vm_state_before_the_move(previous: VmState) -> None:
    """Differs from Nova on purpose: revert_resize from error (a failed move) ends as the instance was before it."""
    assert graph.begin("revert_resize", "u", V.ERROR, None) is T.RESIZE_REVERTING
    power = PowerState.RUNNING if previous is V.ACTIVE else PowerState.SHUTDOWN
    assert graph.end_vm_state("revert_resize", V.ERROR, succeeded=True, power=power, previous=previous) is previous
    assert graph.end_vm_state("revert_resize", V.ERROR, succeeded=False, power=power) is V.ERROR


@pytest.mark.parametrize(
    ("name", "source", "before", "after", "expected"),
    [
        ("pause", V.ACTIVE, PowerState.RUNNING, PowerState.RUNNING, V.ACTIVE),
        ("stop", V.ACTIVE, PowerState.RUNNING, PowerState.CRASHED, V.ERROR),
        ("reboot_hard", V.STOPPED, PowerState.SHUTDOWN, PowerState.RUNNING, V.ACTIVE),
        ("reboot_hard", V.ACTIVE, PowerState.RUNNING, PowerState.SHUTDOWN, V.ERROR),
        ("create", None, PowerState.NOSTATE, PowerState.NOSTATE, V.ERROR),
        ("delete", V.ACTIVE, PowerState.RUNNING, PowerState.RUNNING, V.ERROR),
    ],
)
def test_failure_end_states(
    name: str, source: VmState | None, before: PowerState, after: PowerState, expected: VmState
) -> None:
    """A failure keeps the vm_state only when the guest is unchanged; create and delete always error."""
    assert graph.end_vm_state(name, source, succeeded=False, power=after, before_power=before) is expected


def test_walk_steps_follow_the_table() -> None:
    """next_task_state follows each walk and returns None after its last step."""
    for op in OPERATIONS:
        for here, there in zip(op.walk, [*op.walk[1:], None], strict=True):
            assert graph.next_task_state(op.name, here) is there


def _with(op_name: str, **changes: object) -> list[Operation]:
    return [op._replace(**changes) if op.name == op_name else op for op in OPERATIONS]


def test_check_table_accepts_the_real_table() -> None:
    """The shipped table passes its own definition checks."""
    check_table()


def test_check_table_finds_an_unreachable_state() -> None:
    """Removing the only way into rescued makes it unreachable."""
    with pytest.raises(ValueError, match="vm_state rescued is unreachable"):
        check_table([op for op in OPERATIONS if op.name != "rescue"])


def test_check_table_finds_a_task_state_without_preemption_exit() -> None:
    """If delete and force_delete only started from idle, running tasks could never be taken over."""
    ops = [op._replace(allowed_task_states=frozenset({None})) if "delete" in op.name else op for op in OPERATIONS]
    with pytest.raises(ValueError, match="has no preemption exit"):
        check_table(ops)


def test_check_table_keeps_deleted_terminal() -> None:
    """An operation allowed from deleted is a definition error."""
    with pytest.raises(ValueError, match="deleted, which must be terminal"):
        check_table(_with("restore", allowed_vm_states=frozenset({V.SOFT_DELETED, V.DELETED})))


def test_check_table_finds_unwalked_task_states_and_duplicates() -> None:
    """A task_state no operation walks, and a name defined twice, are both reported."""
    ops = [op for op in OPERATIONS if op.name != "restore"] + [OPERATIONS[1]]
    with pytest.raises(ValueError) as info:
        check_table(ops)
    assert "task_state restoring is walked by no operation" in str(info.value)
    assert "operation 'start' is defined twice" in str(info.value)


def test_json_export_is_the_table() -> None:
    """`lifecycle graph --format json` is the table: operation, guards, walk, result."""
    rows = {row["operation"]: row for row in json.loads(graph.to_json())}
    for op in OPERATIONS:
        row = rows[op.name]
        assert set(row["allowed_vm_states"]) == {s.value for s in op.allowed_vm_states}
        assert set(row["allowed_task_states"]) == {None if t is None else t.value for t in op.allowed_task_states}
        assert row["walk"] == [t.value for t in op.walk]


def test_readme_diagram_is_current() -> None:
    """The mermaid diagram in the README is exactly what `lifecycle graph` prints now."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```mermaid\n(.*?)```", readme, re.S)
    assert block is not None, "README has no mermaid block"
    assert block.group(1) == graph.to_mermaid(), "README diagram is stale: paste `lifecycle graph` output"
