"""The rows of the operations table: every operation of the engine, as data (see :mod:`lifecycle.graph`).

Each row is written in the vocabulary of :mod:`lifecycle.graph_types`; its
``note`` says where and why it differs from Nova. :mod:`lifecycle.graph`
re-exports :data:`OPERATIONS` and :data:`DATA_LOSS` and checks the table
before building its machines.
"""

from __future__ import annotations

from lifecycle.graph_types import ANY_TASK, ANY_VM, Failure, Op, Operation, Result, Takeover
from lifecycle.states import PowerState, TaskState, VmState

__all__ = ["DATA_LOSS", "OPERATIONS"]

V, T = VmState, TaskState


# Nova's task_states.ALLOW_REBOOT: a hard reboot may take over these tasks.
_ALLOW_HARD_REBOOT_TASKS: frozenset[TaskState | None] = frozenset(
    {
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
)


_MOVE_FROM = frozenset({V.ACTIVE, V.STOPPED})
_RESIZE_WALK = (T.RESIZE_PREP, T.RESIZE_MIGRATING, T.RESIZE_MIGRATED, T.RESIZE_FINISH)
DATA_LOSS = "rebuilt from its image on the new host: data on the dead host's disk is lost"
"""What every evacuation means for the guest's disk: the one sentence the engine, the CLI and the docs say."""
_DELETE_NOTE = (
    "Nova ignores a second delete while one is running (pain point 3: a lost RPC left it "
    "stuck); here a delete takes over any task, a running delete included."
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "create",
        frozenset(),
        (T.SCHEDULING, T.NETWORKING, T.BLOCK_DEVICE_MAPPING, T.SPAWNING),
        V.ACTIVE,
        PowerState.RUNNING,
        failure=Failure.ERROR,
        creates=True,
        reschedules=True,
        lock_applies=False,
        note="Nova passes through task NULL between scheduling and networking; "
        "the task owns the instance throughout here, so there is no idle gap.",
    ),
    Operation("start", frozenset({V.STOPPED}), (T.POWERING_ON,), V.ACTIVE, PowerState.RUNNING),
    Operation(
        "force_stop",
        frozenset({V.STOPPED, V.PAUSED}),
        (T.POWERING_OFF,),
        V.STOPPED,
        PowerState.SHUTDOWN,
        note="Nova's compute_api.force_stop, used by the power sync for a stopped guest found running "
        "and a paused guest found off; Nova applies no vm_state check, we admit only those two.",
    ),
    Operation("stop", frozenset({V.ACTIVE, V.ERROR}), (T.POWERING_OFF,), V.STOPPED, PowerState.SHUTDOWN),
    Operation(
        "reboot",
        frozenset({V.ACTIVE}),
        (T.REBOOTING, T.REBOOT_PENDING, T.REBOOT_STARTED),
        V.ACTIVE,
        PowerState.RUNNING,
    ),
    Operation(
        "reboot_hard",
        frozenset({V.ACTIVE, V.STOPPED, V.PAUSED, V.SUSPENDED, V.ERROR}),
        (T.REBOOTING_HARD, T.REBOOT_PENDING_HARD, T.REBOOT_STARTED_HARD),
        V.ACTIVE,
        PowerState.RUNNING,
        allowed_task_states=_ALLOW_HARD_REBOOT_TASKS,
        failure=Failure.ACTIVE_IF_RUNNING,
        takeover=Takeover.BY_POWER,
    ),
    Operation("pause", frozenset({V.ACTIVE}), (T.PAUSING,), V.PAUSED, PowerState.PAUSED),
    Operation("unpause", frozenset({V.PAUSED}), (T.UNPAUSING,), V.ACTIVE, PowerState.RUNNING),
    Operation("suspend", frozenset({V.ACTIVE}), (T.SUSPENDING,), V.SUSPENDED),
    Operation("resume", frozenset({V.SUSPENDED}), (T.RESUMING,), V.ACTIVE, PowerState.RUNNING),
    Operation("rescue", frozenset({V.ACTIVE, V.STOPPED, V.ERROR}), (T.RESCUING,), V.RESCUED, PowerState.RUNNING),
    Operation("unrescue", frozenset({V.RESCUED}), (T.UNRESCUING,), V.ACTIVE, PowerState.RUNNING),
    Operation("resize", _MOVE_FROM, _RESIZE_WALK, V.RESIZED, moves=True, move_family=True),
    Operation("migrate", _MOVE_FROM, _RESIZE_WALK, V.RESIZED, moves=True, move_family=True),
    Operation(
        "confirm_resize",
        frozenset({V.RESIZED}),
        (T.RESIZE_CONFIRMING,),
        Result.BY_POWER,
        move_family=True,
        note="Nova defines resize_confirming but never sets it and tracks confirm only on the "
        "migration record; here confirm is a task like any other, so it is visible and recoverable.",
    ),
    Operation(
        "revert_resize",
        frozenset({V.RESIZED, V.ERROR}),
        (T.RESIZE_REVERTING,),
        Result.PREVIOUS,
        move_family=True,
        reverts_move=True,
        note="Nova reverts only a resized instance; here also an error one whose move failed after its disk left "
        "the source and is still open (the runner refuses it otherwise): the source's kept disk is put back, with the "
        "old flavor and the vm_state from before the move, and the destination's copy and claim go.",
    ),
    Operation(
        "rebuild",
        frozenset({V.ACTIVE, V.STOPPED, V.ERROR}),
        (T.REBUILDING, T.REBUILD_BLOCK_DEVICE_MAPPING, T.REBUILD_SPAWNING),
        Result.REBUILT,
    ),
    Operation(
        "evacuate",
        frozenset({V.ACTIVE, V.STOPPED, V.ERROR}),
        (T.REBUILDING, T.REBUILD_BLOCK_DEVICE_MAPPING, T.REBUILD_SPAWNING),
        Result.REBUILT,
        failure=Failure.ERROR,
        holds_room=False,
        note="Nova's evacuate skips the task check; here it needs an idle instance (a task stuck on the dead "
        "host ends by itself once its connection fails, or by reset-state), so only delete and force_delete "
        "ever take it over. Its host must be down and fenced (lifecycle.evacuation), not only down, and it is "
        + DATA_LOSS
        + ".",
    ),
    Operation(
        "delete",
        ANY_VM,
        (T.DELETING,),
        V.DELETED,
        PowerState.NOSTATE,
        allowed_task_states=ANY_TASK,
        failure=Failure.ERROR,
        needs_host=False,
        holds_room=False,
        takeover=Takeover.DESTROY_LATE,
        note=_DELETE_NOTE,
    ),
    Operation(
        "force_delete",
        ANY_VM,
        (T.DELETING,),
        V.DELETED,
        PowerState.NOSTATE,
        allowed_task_states=ANY_TASK,
        failure=Failure.ERROR,
        needs_host=False,
        holds_room=False,
        takeover=Takeover.DESTROY_LATE,
        note="Same path as delete, but the guest is destroyed at once with no clean shutdown. " + _DELETE_NOTE,
    ),
    Operation(
        "soft_delete",
        ANY_VM - {V.SOFT_DELETED, V.SHELVED_OFFLOADED},
        (T.SOFT_DELETING,),
        V.SOFT_DELETED,
        PowerState.SHUTDOWN,
        holds_room=False,
        note="Nova lets soft delete overwrite any running task; here only delete and force_delete take "
        "over a running task (a soft delete is restorable, so it must not cut a task short): it needs an "
        "idle instance. An offloaded instance has no guest to keep: its delete is a delete, as Nova's local delete.",
    ),
    Operation("restore", frozenset({V.SOFT_DELETED}), (T.RESTORING,), V.ACTIVE, PowerState.RUNNING),
    Operation(
        "shelve",
        frozenset({V.ACTIVE, V.STOPPED, V.PAUSED, V.SUSPENDED}),
        (T.SHELVING, T.SHELVING_IMAGE_PENDING_UPLOAD, T.SHELVING_IMAGE_UPLOADING, T.SHELVING_OFFLOADING),
        Result.SHELVED,
        may_end_after=T.SHELVING_IMAGE_UPLOADING,
        note="As Nova: the offload is part of the shelve when shelved_offload_time is 0 (the walk goes on to "
        "shelving_offloading and ends shelved_offloaded), else the walk ends after the upload, shelved. A failed "
        "snapshot powers a guest that was running back on, so its vm_state is kept.",
    ),
    Operation(
        "shelve_offload",
        frozenset({V.SHELVED}),
        (T.SHELVING_OFFLOADING,),
        V.SHELVED_OFFLOADED,
        PowerState.NOSTATE,
    ),
    Operation(
        "unshelve",
        frozenset({V.SHELVED, V.SHELVED_OFFLOADED}),
        (T.UNSHELVING, T.SPAWNING),
        V.ACTIVE,
        PowerState.RUNNING,
        note="Nova starts a shelved (not offloaded) instance through start_instance (powering-on); here both "
        "kinds walk unshelving -> spawning, the offloaded one scheduled and spawned from its snapshot.",
    ),
)

if {op.name for op in OPERATIONS} != set(Op):
    raise AssertionError("Op must name exactly the operations of the table")  # a definition error, found at import
