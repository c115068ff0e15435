"""The pure sync decision, cell by cell against Nova's table, then our additions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lifecycle.states import PowerState, TaskState, VmState
from lifecycle.sync import Action, Observation, Policy, Recorded, Stance, decide

P, V = PowerState, VmState
T0 = datetime(2026, 1, 1, tzinfo=UTC)
LATER = T0 + timedelta(seconds=1)


def nova(vm: VmState, db: PowerState, hv: PowerState) -> tuple[str | None, bool]:
    """Nova's _sync_instance_power_state (reference 4.2), written independently: (operation, power copied)."""
    copied = hv != db
    if vm is V.ACTIVE and hv in (P.SHUTDOWN, P.CRASHED, P.SUSPENDED):
        return "stop", copied
    if vm is V.STOPPED and hv in (P.RUNNING, P.PAUSED, P.SUSPENDED):
        return "force_stop", copied
    if vm is V.PAUSED and hv in (P.SHUTDOWN, P.CRASHED):
        return "force_stop", copied
    return None, copied


CELLS = [(vm, db, hv) for vm in VmState if vm is not V.DELETED for db in PowerState for hv in PowerState]


@pytest.mark.parametrize(("vm", "db", "hv"), CELLS)
def test_idle_instance_matches_novas_table(vm: VmState, db: PowerState, hv: PowerState) -> None:
    """Every (vm_state, recorded power, observed power) cell without a task decides as Nova does."""
    decision = decide(Recorded(vm, None, db, T0), Observation(hv, LATER))
    operation, copied = nova(vm, db, hv)
    assert decision.operation == operation, decision
    if operation is None:
        assert (decision.action in (Action.UPDATE_POWER, Action.RECORD)) == copied, decision
        assert decision.power == (hv if copied else None)
    else:
        assert decision.action is Action.RUN and decision.power == hv


@pytest.mark.parametrize("task", [None, *TaskState])
def test_every_cell_with_a_task_is_skipped(task: TaskState | None) -> None:
    """For every task_state, every (vm_state, recorded, observed) cell is skipped; with none, none is."""
    for vm, db, hv in CELLS:
        action = decide(Recorded(vm, task, db, T0), Observation(hv, LATER)).action
        assert (action is Action.SKIP) == (task is not None), (vm, db, hv, task)


def test_stale_observation_is_ignored() -> None:
    """An observation older than the instance's last change is dropped."""
    decision = decide(Recorded(V.ACTIVE, None, P.RUNNING, LATER), Observation(P.SHUTDOWN, T0))
    assert (decision.action, decision.rule) == (Action.SKIP, "stale_observation")


def test_missing_domain_needs_consecutive_observations() -> None:
    """A missing domain is counted twice, then on the third observation marked error with power 0."""
    count = 0
    actions = []
    for _ in range(3):
        d = decide(Recorded(V.ACTIVE, None, P.RUNNING, T0, count), Observation(None, LATER))
        actions.append(d.action)
        count = d.missing_count
    assert actions == [Action.COUNT_MISSING, Action.COUNT_MISSING, Action.MARK_ERROR]
    assert d.power is P.NOSTATE and d.rule == "missing_domain"


def test_missing_threshold_and_record_policy_are_configurable() -> None:
    """With threshold 1 and the record stance, one miss only records power 0 with a warning rule."""
    policy = Policy(missing=Stance.RECORD, missing_threshold=1)
    d = decide(Recorded(V.STOPPED, None, P.SHUTDOWN, T0), Observation(None, LATER), policy)
    assert (d.action, d.power, d.rule) == (Action.RECORD, P.NOSTATE, "missing_recorded")


def test_a_returning_domain_resets_the_count() -> None:
    """Seen again, a domain's missing count goes back to zero."""
    assert decide(Recorded(V.ACTIVE, None, P.RUNNING, T0, 2), Observation(P.RUNNING, LATER)).missing_count == 0


@pytest.mark.parametrize(
    ("recorded", "observed", "policy", "operation", "action"),
    [
        (V.STOPPED, P.RUNNING, Policy(stopped_but_running=Stance.ADOPT), "start", Action.RUN),
        (V.STOPPED, P.RUNNING, Policy(stopped_but_running=Stance.RECORD), None, Action.RECORD),
        (V.ACTIVE, P.SHUTDOWN, Policy(active_but_off=Stance.ENFORCE), "reboot_hard", Action.RUN),
        (V.ACTIVE, P.SHUTDOWN, Policy(active_but_off=Stance.RECORD), None, Action.RECORD),
        (V.ACTIVE, P.PAUSED, Policy(active_but_paused=Stance.ADOPT), "pause", Action.RUN),
        (V.ACTIVE, P.PAUSED, Policy(), None, Action.RECORD),
        (V.PAUSED, P.CRASHED, Policy(paused_but_off=Stance.RECORD), None, Action.RECORD),
    ],
)
def test_policies_choose_adopt_enforce_or_record(
    recorded: VmState, observed: PowerState, policy: Policy, operation: str | None, action: Action
) -> None:
    """Each out-of-band case follows its configured stance."""
    d = decide(
        Recorded(recorded, None, P.RUNNING if observed is not P.RUNNING else P.SHUTDOWN, T0),
        Observation(observed, LATER),
        policy,
    )
    assert (d.operation, d.action) == (operation, action)


def test_recorded_disagreement_is_not_rewritten_every_pass() -> None:
    """Once an ignored disagreement is recorded (active but paused), later passes change nothing."""
    d = decide(Recorded(V.ACTIVE, None, P.PAUSED, T0), Observation(P.PAUSED, LATER))
    assert d.action is Action.NOTHING


def test_deleted_instances_are_only_recorded() -> None:
    """A soft-deleted instance whose guest runs gets a warning record, never an operation."""
    d = decide(Recorded(V.SOFT_DELETED, None, P.SHUTDOWN, T0), Observation(P.RUNNING, LATER))
    assert (d.action, d.operation, d.rule) == (Action.RECORD, None, "deleted_but_running")
