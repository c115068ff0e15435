"""The state vocabulary: Nova's stored values, power numbering and status words."""

from __future__ import annotations

import pytest

from lifecycle.states import PowerState, TaskState, VmState, status_of

V, T = VmState, TaskState


def test_vm_state_values_are_novas() -> None:
    """The twelve vm_states store exactly Nova's strings."""
    assert {s.value for s in VmState} == {
        "active",
        "building",
        "paused",
        "suspended",
        "stopped",
        "rescued",
        "resized",
        "soft-delete",
        "deleted",
        "error",
        "shelved",
        "shelved_offloaded",
    }


def test_power_state_numbering_is_novas() -> None:
    """Power states use Nova's integers, with 2 and 5 unused."""
    assert {p.name: int(p) for p in PowerState} == {
        "NOSTATE": 0,
        "RUNNING": 1,
        "PAUSED": 3,
        "SHUTDOWN": 4,
        "CRASHED": 6,
        "SUSPENDED": 7,
    }


def test_task_states_cover_the_spec_vocabulary() -> None:
    """Every task_state SPEC section 1 lists exists, hyphens included where Nova has them."""
    for value in (
        "scheduling",
        "networking",
        "block_device_mapping",
        "spawning",
        "powering-off",
        "powering-on",
        "rebooting",
        "reboot_pending",
        "reboot_started",
        "rebooting_hard",
        "reboot_pending_hard",
        "reboot_started_hard",
        "pausing",
        "unpausing",
        "suspending",
        "resuming",
        "rescuing",
        "unrescuing",
        "resize_prep",
        "resize_migrating",
        "resize_migrated",
        "resize_finish",
        "resize_reverting",
        "resize_confirming",
        "rebuilding",
        "rebuild_block_device_mapping",
        "rebuild_spawning",
        "deleting",
        "soft-deleting",
        "restoring",
    ):
        assert TaskState(value).value == value


@pytest.mark.parametrize(
    ("vm_state", "task_state", "status"),
    [
        (V.ACTIVE, None, "ACTIVE"),
        (V.ACTIVE, T.REBOOTING, "REBOOT"),
        (V.ACTIVE, T.REBOOT_PENDING, "REBOOT"),
        (V.ACTIVE, T.REBOOT_STARTED, "REBOOT"),
        (V.ACTIVE, T.REBOOTING_HARD, "HARD_REBOOT"),
        (V.ACTIVE, T.REBOOT_PENDING_HARD, "HARD_REBOOT"),
        (V.ACTIVE, T.REBOOT_STARTED_HARD, "HARD_REBOOT"),
        (V.ACTIVE, T.REBUILDING, "REBUILD"),
        (V.ACTIVE, T.REBUILD_SPAWNING, "REBUILD"),
        (V.ACTIVE, T.RESIZE_PREP, "RESIZE"),
        (V.ACTIVE, T.RESIZE_FINISH, "RESIZE"),
        (V.ACTIVE, T.DELETING, "ACTIVE"),
        (V.ACTIVE, T.POWERING_OFF, "ACTIVE"),
        (V.BUILDING, T.SPAWNING, "BUILD"),
        (V.STOPPED, None, "SHUTOFF"),
        (V.STOPPED, T.RESIZE_MIGRATING, "RESIZE"),
        (V.STOPPED, T.REBUILDING, "REBUILD"),
        (V.STOPPED, T.POWERING_ON, "SHUTOFF"),
        (V.RESIZED, None, "VERIFY_RESIZE"),
        (V.RESIZED, T.RESIZE_REVERTING, "REVERT_RESIZE"),
        (V.RESIZED, T.RESIZE_CONFIRMING, "VERIFY_RESIZE"),
        (V.PAUSED, None, "PAUSED"),
        (V.SUSPENDED, T.RESUMING, "SUSPENDED"),
        (V.RESCUED, None, "RESCUE"),
        (V.ERROR, None, "ERROR"),
        (V.ERROR, T.REBUILD_BLOCK_DEVICE_MAPPING, "REBUILD"),
        (V.ERROR, T.DELETING, "ERROR"),
        (V.DELETED, None, "DELETED"),
        (V.SOFT_DELETED, None, "SOFT_DELETED"),
        (V.SHELVED, None, "SHELVED"),
        (V.SHELVED_OFFLOADED, None, "SHELVED_OFFLOADED"),
    ],
)
def test_status_matches_novas_api_map(vm_state: VmState, task_state: TaskState | None, status: str) -> None:
    """status_of reproduces Nova's _STATE_MAP, including fall-through to the default."""
    assert status_of(vm_state, task_state) == status


def test_every_pair_has_a_status() -> None:
    """Every (vm_state, task_state) pair maps to some status word."""
    for vm_state in VmState:
        for task_state in (None, *TaskState):
            assert status_of(vm_state, task_state).isupper()
