"""Hypervisor sync, the pure part: what to do when the database and the hypervisor disagree.

:func:`decide` takes what the database recorded, what the hypervisor showed
and the policy, and returns a :class:`Decision` naming the rule that fired.
With the default :class:`Policy` it reproduces Nova's
``_sync_instance_power_state`` table (nova/compute/manager.py); beyond Nova:

- an instance with a task in flight is skipped (the task owns it);
- an observation older than the instance's last change is ignored;
- a missing domain is acted on only after ``missing_threshold`` consecutive
  observations, and then per ``Policy.missing``;
- each out-of-band case has a policy: adopt the hypervisor's state, enforce
  the database's, or only record the power state.

:class:`Decider` is :func:`decide` for a whole pass: one observation time,
one policy, and stored values in, with every distinct case decided once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from lifecycle.graph import Op
from lifecycle.records import Recorded  # defined with the other records; re-exported here
from lifecycle.states import PowerState, TaskState, VmState

__all__ = ["Action", "Decider", "Decision", "Observation", "Policy", "Recorded", "Stance", "decide"]

P, V = PowerState, VmState


class Stance(enum.StrEnum):
    """How to resolve one kind of disagreement."""

    ADOPT = "adopt"
    """Make the database follow the hypervisor."""
    ENFORCE = "enforce"
    """Make the hypervisor follow the database."""
    RECORD = "record"
    """Copy the power state and write an audit row; change nothing else."""


class Action(enum.StrEnum):
    """What a decision asks the sweep to do."""

    NOTHING = "nothing"
    UPDATE_POWER = "update_power"
    """Copy the observed power state into the row (no vm_state change)."""
    RECORD = "record"
    """Like UPDATE_POWER, but the disagreement is noted as a warning rule."""
    RUN = "run"
    """Run ``Decision.operation`` as an ordinary task with actor sync."""
    MARK_ERROR = "mark_error"
    """Set vm_state error and power NOSTATE, with the rule as the reason."""
    COUNT_MISSING = "count_missing"
    """The domain is missing but not yet ``missing_threshold`` times in a row."""
    SKIP = "skip"
    """A task owns the instance, or the observation is stale."""


@dataclass(frozen=True, slots=True)
class Policy:
    """Per-case stances; the defaults are Nova's behaviour."""

    stopped_but_running: Stance = Stance.ENFORCE
    """stopped + running/paused/suspended: enforce = force stop (Nova); adopt = start."""
    active_but_off: Stance = Stance.ADOPT
    """active + shutdown/crashed/suspended: adopt = stop (Nova); enforce = hard reboot."""
    paused_but_off: Stance = Stance.ADOPT
    """paused + shutdown/crashed: adopt = force stop (Nova; bug 1265494)."""
    active_but_paused: Stance = Stance.RECORD
    """active + paused: record with a warning (Nova; bug 1097806); adopt = pause."""
    missing: Stance = Stance.ADOPT
    """A domain gone for ``missing_threshold`` observations: adopt = error + NOSTATE."""
    missing_threshold: int = 3
    """Consecutive observations of a missing domain before acting on it."""


@dataclass(frozen=True, slots=True)
class Observation:
    """What the hypervisor showed; ``power`` None means the domain is missing."""

    power: PowerState | None
    observed_at: datetime
    source: str = "poll"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: an action, the rule that fired, and its details."""

    action: Action
    rule: str
    power: PowerState | None = None
    """The power state to record (None: leave it)."""
    operation: str | None = None
    """For RUN: the operation to run."""
    missing_count: int = 0
    """The consecutive-missing count to store after this observation."""

    @property
    def changes_something(self) -> bool:
        """Whether applying the decision writes a state (and so an audit row)."""
        return self.action in _CHANGING


_CHANGING = frozenset({Action.UPDATE_POWER, Action.RECORD, Action.RUN, Action.MARK_ERROR})
_IN_SYNC = Decision(Action.NOTHING, "in_sync")


_OFF = frozenset({P.SHUTDOWN, P.CRASHED, P.SUSPENDED})
_ON = frozenset({P.RUNNING, P.PAUSED, P.SUSPENDED})
_POWER_ONLY = frozenset({V.BUILDING, V.RESCUED, V.RESIZED, V.SUSPENDED, V.ERROR, V.SHELVED, V.SHELVED_OFFLOADED})


def decide(recorded: Recorded, observed: Observation, policy: Policy = Policy()) -> Decision:
    """Return what to do about one instance given one observation (pure, total)."""
    if recorded.task_state is not None:
        return Decision(Action.SKIP, "task_in_flight", missing_count=recorded.missing_count)
    if observed.observed_at < recorded.changed_at:
        return Decision(Action.SKIP, "stale_observation", missing_count=recorded.missing_count)
    if recorded.vm_state in (V.DELETED, V.SOFT_DELETED):
        return _deleted(recorded, observed)
    if observed.power is None:
        return _missing(recorded, policy)
    return _present(recorded, observed.power, policy)


def _deleted(recorded: Recorded, observed: Observation) -> Decision:
    # Nova only warns about a (soft-)deleted instance whose guest runs; reaping is a separate job.
    power = P.NOSTATE if observed.power is None else observed.power
    if power in (P.NOSTATE, P.SHUTDOWN):
        return _copy(recorded, power, "deleted_power_copied")
    return _copy(recorded, power, "deleted_but_running", warn=True)


def _missing(recorded: Recorded, policy: Policy) -> Decision:
    count = recorded.missing_count + 1
    if recorded.vm_state is V.ERROR and recorded.power_state is P.NOSTATE:
        return Decision(Action.NOTHING, "missing_already_error", missing_count=count)
    if count < policy.missing_threshold:
        return Decision(Action.COUNT_MISSING, "missing_not_confirmed", missing_count=count)
    if policy.missing is Stance.RECORD:
        return _copy(recorded, P.NOSTATE, "missing_recorded", count, warn=True)
    return Decision(Action.MARK_ERROR, "missing_domain", power=P.NOSTATE, missing_count=count)


def _copy(recorded: Recorded, power: PowerState, rule: str, count: int = 0, *, warn: bool = False) -> Decision:
    if power == recorded.power_state:
        return _IN_SYNC if count == 0 else Decision(Action.NOTHING, "in_sync", missing_count=count)
    return Decision(Action.RECORD if warn else Action.UPDATE_POWER, rule, power=power, missing_count=count)


def _present(recorded: Recorded, power: PowerState, policy: Policy) -> Decision:
    vm = recorded.vm_state
    if vm in _POWER_ONLY:
        return _copy(recorded, power, "power_state_copied")
    if vm is V.ACTIVE:
        return _active(recorded, power, policy)
    if vm is V.STOPPED and power in _ON:
        return _stance(recorded, power, policy.stopped_but_running, "stopped_but_running", Op.FORCE_STOP, Op.START)
    if vm is V.PAUSED and power in (P.SHUTDOWN, P.CRASHED):
        return _stance(recorded, power, policy.paused_but_off, "paused_but_off", None, Op.FORCE_STOP)
    return _copy(recorded, power, "power_state_copied")


def _active(recorded: Recorded, power: PowerState, policy: Policy) -> Decision:
    if power in _OFF:
        return _stance(recorded, power, policy.active_but_off, "active_but_off", Op.REBOOT_HARD, Op.STOP)
    if power is P.PAUSED:
        return _stance(recorded, power, policy.active_but_paused, "active_but_paused", None, Op.PAUSE)
    if power is P.NOSTATE:
        # Nova's docstring says stop, its code only warns: so do we.
        return _copy(recorded, power, "active_but_nostate", warn=True)
    return _copy(recorded, power, "power_state_copied")


def _stance(
    recorded: Recorded, power: PowerState, stance: Stance, rule: str, enforce_op: Op | None, adopt_op: Op
) -> Decision:
    if stance is Stance.RECORD or (stance is Stance.ENFORCE and enforce_op is None):
        return (
            _copy(recorded, power, rule, warn=True)
            if power != recorded.power_state
            else Decision(Action.NOTHING, f"{rule}_recorded")
        )
    operation = enforce_op if stance is Stance.ENFORCE else adopt_op
    return Decision(Action.RUN, f"{rule}:{stance.value}", power=power, operation=operation)


_LATER = timedelta(microseconds=1)


class Decider:
    """:func:`decide` over stored values for one pass (one observation time, one policy), each case decided once.

    :func:`decide` is pure and reads a record's ``changed_at`` only to compare
    it with the observation time, so the decision is a function of the
    stored states, the missing count, the observed power and whether the row
    changed after the observation. A pass over 10,000 instances meets a
    handful of such cases: deciding each once keeps the per-row cost a dict
    lookup.
    """

    __slots__ = ("_at", "_memo", "_policy")

    def __init__(self, policy: Policy, observed_at: datetime) -> None:
        self._policy = policy
        self._at = observed_at
        self._memo: dict[tuple[str, str | None, int, int, PowerState | None, bool], Decision] = {}

    def __call__(
        self,
        vm_state: str,
        task_state: str | None,
        power_state: int,
        missing_count: int,
        observed: PowerState | None,
        changed_after: bool,
    ) -> Decision:
        """Return the decision for one instance's stored values and what the hypervisor showed."""
        key = (vm_state, task_state, power_state, missing_count, observed, changed_after)
        decision = self._memo.get(key)
        if decision is None:
            recorded = Recorded(
                VmState(vm_state),
                None if task_state is None else TaskState(task_state),
                PowerState(power_state),
                self._at + _LATER if changed_after else self._at,
                missing_count,
            )
            decision = self._memo[key] = decide(recorded, Observation(observed, self._at), self._policy)
        return decision
