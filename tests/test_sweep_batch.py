"""The sync pass's fast path: decisions per distinct case, and power writes as one batched compare-and-swap."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from lifecycle import Engine, PowerState, TaskState, VmState
from lifecycle.audit import Why
from lifecycle.drivers.base import DomainSpec
from lifecycle.records import Cause
from lifecycle.store.syncrows import PowerWrite, SyncRow
from lifecycle.sweep import sweep_host
from lifecycle.sync import Decider, Observation, Policy, Recorded, Stance, decide
from tests.conftest import Fakes

P, V = PowerState, VmState
AT = datetime(2026, 1, 1, tzinfo=UTC)
WHY = Why(actor="sync", cause=Cause.SYNC, operation="sync", rule="power_state_copied")


@pytest.mark.parametrize("policy", [Policy(), Policy(missing=Stance.RECORD, stopped_but_running=Stance.ADOPT)])
def test_decider_agrees_with_decide_on_every_case(policy: Policy) -> None:
    """The memoised decider returns what decide returns for every stored case, observation and staleness."""
    decider = Decider(policy, AT)
    cases = itertools.product(list(V), [None, "powering-off"], list(P), [0, 2], [None, *P], [False, True])
    for vm, task, power, missing, observed, changed_after in cases:
        changed_at = AT + timedelta(seconds=1) if changed_after else AT - timedelta(seconds=1)
        task_state = None if task is None else TaskState(task)
        expected = decide(Recorded(vm, task_state, power, changed_at, missing), Observation(observed, AT), policy)
        stored = (vm.value, task, int(power), missing, observed, changed_after)
        assert decider(*stored) == expected
        assert decider(*stored) is decider(*stored)  # each case decided once per pass


def test_sync_rows_say_which_rows_changed_after_the_observation(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """host_sync_rows compares updated_at with the observation time in the database, both ways."""
    uuid = new_instance()
    changed = engine.get(uuid).updated_at
    before = [r for rows in engine.store.sync.rows("h1", changed - timedelta(seconds=1)) for r in rows]
    after = [r for rows in engine.store.sync.rows("h1", changed + timedelta(seconds=1)) for r in rows]
    assert [(r.uuid, r.changed_after) for r in before] == [(uuid, True)]
    assert [(r.uuid, r.changed_after) for r in after] == [(uuid, False)]


def test_a_batch_with_a_lost_row_writes_only_the_winners(engine: Engine, new_instance: Callable[..., str]) -> None:
    """record_powers skips a write whose row moved on (False, no audit row) and writes the others with theirs."""
    uuids = [new_instance(f"vm{i}") for i in range(3)]
    rows = {i.uuid: i for i in map(engine.get, uuids)}
    engine.stop(uuids[1])  # moves the row on: the write expecting the old version must lose
    writes = [PowerWrite(u, rows[u].version, V.ACTIVE, "h1", P.RUNNING, P.PAUSED, WHY) for u in uuids]
    assert engine.store.sync.record_powers(writes) == [True, False, True]
    for u in (uuids[0], uuids[2]):
        i = engine.get(u)
        assert (i.power_state, i.version) == (P.PAUSED, rows[u].version + 1)
        assert engine.history(u)[-1].rule == "power_state_copied"
    assert engine.get(uuids[1]).vm_state is V.STOPPED
    assert all(r.cause != "sync" for r in engine.history(uuids[1]))


def test_a_pass_racing_a_user_operation_in_a_batch_loses_only_that_row(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three drifted rows in one chunk, one stopped by a user after the read: two recorded, one lost race."""
    uuids = [new_instance(f"vm{i}") for i in range(3)]
    for u in uuids:
        fakes["h1"].set_power(u, P.PAUSED, event=False)
    real = engine.store.sync.rows

    def read_then_race(host: str, observed_at: datetime, chunk: int = 1000) -> Iterator[list[SyncRow]]:
        for rows in real(host, observed_at, chunk):
            engine.stop(uuids[0])
            yield rows

    monkeypatch.setattr(engine.store.sync, "rows", read_then_race)
    summary = sweep_host(engine.services, "h1", Policy())
    assert (summary.drifted, summary.acted, summary.lost_races) == (3, 2, 1)
    assert [engine.get(u).power_state for u in uuids] == [P.SHUTDOWN, P.PAUSED, P.PAUSED]
    assert [r.rule for r in engine.history(uuids[1]) if r.cause == "sync"] == ["active_but_paused"]


def test_missing_counts_are_kept_in_one_batch_and_reset_when_the_domain_returns(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """Two missing domains count up together; one coming back resets its count without an audit row."""
    a, b = new_instance("a"), new_instance("b")
    fakes["h1"].undefine(a)
    fakes["h1"].undefine(b)
    sweep_host(engine.services, "h1", Policy())
    sweep_host(engine.services, "h1", Policy())
    assert (engine.get(a).missing_count, engine.get(b).missing_count) == (2, 2)
    history = engine.history(a)
    fakes["h1"].spawn(DomainSpec(a, "a", 1, 64, 1, "/x", "qcow2"))
    summary = sweep_host(engine.services, "h1", Policy())
    assert (engine.get(a).missing_count, engine.get(b).missing_count) == (0, 3)
    assert engine.history(a) == history and engine.get(b).vm_state is V.ERROR
    assert summary.rules == {"missing_domain": 1}
