"""The sync sweep on fake hosts: what it changes, what it leaves alone, and how it races."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest

from lifecycle import Engine, PowerState, Settings, VmState
from lifecycle.drivers.base import DomainSpec
from lifecycle.store.syncrows import SyncRow
from lifecycle.sweep import sweep_host
from lifecycle.sync import Policy, Stance
from tests.conftest import Fakes
from tests.invariants import check_invariants

P, V = PowerState, VmState


def _sync(engine: Engine, policy: Policy | None = None, chunk: int = 1000):  # type: ignore[no-untyped-def]
    return sweep_host(engine.services, "h1", policy or Policy(), chunk=chunk)


def test_steady_state_changes_nothing(engine: Engine, new_instance: Callable[..., str]) -> None:
    """With nothing drifted a pass counts everything in sync and writes no audit row."""
    uuids = [new_instance(f"vm{i}") for i in range(3)]
    before = {u: engine.history(u) for u in uuids}
    summary = _sync(engine)
    assert (summary.instances, summary.in_sync, summary.drifted, summary.acted) == (3, 3, 0, 0)
    assert {u: engine.history(u) for u in uuids} == before


def test_guest_shut_down_out_of_band_becomes_stopped_through_a_sync_task(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """active + shutdown runs the stop operation as a task with actor sync and the rule in the audit rows."""
    uuid = new_instance()
    fakes["h1"].set_power(uuid, P.SHUTDOWN)
    summary = _sync(engine)
    assert (summary.drifted, summary.acted, summary.rules) == (1, 1, {"active_but_off:adopt": 1})
    i = engine.get(uuid)
    assert (i.vm_state, i.power_state, i.task_state) == (V.STOPPED, P.SHUTDOWN, None)
    rows = engine.history(uuid)[-2:]
    assert [(r.cause, r.actor, r.operation, r.rule) for r in rows] == [
        ("sync", "sync", "stop", "active_but_off:adopt")
    ] * 2
    assert engine.tasks(uuid)[-1].actor == "sync"


@pytest.mark.parametrize(
    ("policy", "vm_state", "guest"),
    [(Policy(), V.STOPPED, P.SHUTDOWN), (Policy(stopped_but_running=Stance.ADOPT), V.ACTIVE, P.RUNNING)],
)
def test_stopped_guest_started_out_of_band_is_powered_off_or_adopted(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str], policy: Policy, vm_state: VmState, guest: PowerState
) -> None:
    """stopped + running: Nova's default powers it off again; the adopt stance makes the instance active."""
    uuid = new_instance()
    engine.stop(uuid)
    fakes["h1"].set_power(uuid, P.RUNNING)
    _sync(engine, policy)
    assert (engine.get(uuid).vm_state, fakes["h1"].get_info(uuid)) == (vm_state, guest)


def test_paused_guest_destroyed_is_force_stopped(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """paused + shutdown (Nova bug 1265494) ends stopped through force_stop."""
    uuid = new_instance()
    engine.pause(uuid)
    fakes["h1"].set_power(uuid, P.SHUTDOWN)
    summary = _sync(engine)
    assert summary.rules == {"paused_but_off:adopt": 1}
    assert (engine.get(uuid).vm_state, engine.tasks(uuid)[-1].operation) == (V.STOPPED, "force_stop")


def test_active_but_paused_is_recorded_once(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """active + paused only records the power state with a warning rule, once, and keeps the vm_state."""
    uuid = new_instance()
    fakes["h1"].set_power(uuid, P.PAUSED)
    _sync(engine)
    _sync(engine)
    rows = [r for r in engine.history(uuid) if r.cause == "sync"]
    assert [(r.rule, r.to_power_state) for r in rows] == [("active_but_paused", 3)]
    assert engine.get(uuid).vm_state is V.ACTIVE


def test_undefined_domain_is_marked_only_after_three_passes(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A domain undefined behind our back changes nothing for two passes, then the instance goes to error."""
    uuid = new_instance()
    fakes["h1"].undefine(uuid)
    history = engine.history(uuid)
    for expected in (1, 2):
        _sync(engine)
        assert engine.get(uuid).missing_count == expected and engine.history(uuid) == history
    _sync(engine)
    i = engine.get(uuid)
    assert (i.vm_state, i.power_state) == (V.ERROR, P.NOSTATE)
    assert engine.history(uuid)[-1].rule == "missing_domain"


def test_unknown_domains_are_reported_never_touched(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """Foreign domains and lifecycle domains with no row are listed in the summary and left running."""
    new_instance()
    stray = str(uuidlib.uuid4())
    fakes["h1"].spawn(DomainSpec(stray, "stray", 1, 64, 1, "/x", "qcow2"))
    fakes["h1"].add_foreign("someone-else")
    summary = _sync(engine)
    assert summary.unknown_domains == [stray, "someone-else"]
    assert fakes["h1"].get_info(stray) is P.RUNNING


def test_instance_with_a_task_is_skipped(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """While a user stop is stuck in the hypervisor the sweep leaves the instance to it."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("power_off")
    engine.stop(uuid, wait=False)
    assert gate.wait_entered()
    fakes["h1"].set_power(uuid, P.CRASHED, event=False)  # drift while the task runs
    summary = _sync(engine)
    gate.release()
    engine.runner.wait_idle()
    assert summary.skipped == 1 and engine.get(uuid).vm_state is V.STOPPED


def test_a_racing_user_operation_wins(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user stop that commits between the sweep's read and its write wins; the sweep's write is skipped."""
    uuid = new_instance()
    fakes["h1"].set_power(uuid, P.PAUSED)
    real = engine.store.sync.rows

    def read_then_race(host: str, observed_at: datetime, chunk: int = 1000) -> Iterator[list[SyncRow]]:
        for rows in real(host, observed_at, chunk):
            engine.stop(uuid)
            yield rows

    monkeypatch.setattr(engine.store.sync, "rows", read_then_race)
    summary = _sync(engine)
    assert summary.lost_races == 1 and summary.acted == 0
    assert (engine.get(uuid).vm_state, engine.get(uuid).power_state) == (V.STOPPED, P.SHUTDOWN)
    check_invariants(engine.store)


def test_errors_are_contained_per_instance(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """One instance whose sync action fails does not stop the pass for the others."""
    a, b = new_instance("a"), new_instance("b")
    for uuid in (a, b):
        engine.stop(uuid)
        fakes["h1"].set_power(uuid, P.RUNNING)
    fakes["h1"].faults.fail_next("power_off")
    summary = _sync(engine)
    assert (summary.errors, summary.acted) == (1, 1)
    outcomes = sorted((engine.tasks(u)[-1].outcome.value, fakes["h1"].get_info(u)) for u in (a, b))
    assert outcomes == [("failed", P.RUNNING), ("succeeded", P.SHUTDOWN)]
    assert {engine.get(u).vm_state for u in (a, b)} == {V.STOPPED}  # the failed one: guest unchanged, state kept


def test_chunks_cover_every_instance(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """With a chunk size of 2, five drifted instances are all seen and fixed."""
    uuids = [new_instance(f"vm{i}") for i in range(5)]
    for uuid in uuids:
        fakes["h1"].set_power(uuid, P.CRASHED)
    summary = _sync(engine, chunk=2)
    assert summary.instances == 5 and summary.acted == 5
    assert {engine.get(u).vm_state for u in uuids} == {V.STOPPED}


def test_engine_sync_covers_every_enabled_host(sqlite_url: str, fakes: Fakes) -> None:
    """engine.hosts.sync() passes over each host once with the configured policy."""
    from tests.conftest import FLAVOR, make_engine

    eng = make_engine(sqlite_url, fakes)
    eng.create("a", host="h1", flavor=FLAVOR, image="cirros")
    eng.create("b", host="h2", flavor=FLAVOR, image="cirros")
    assert [(s.host, s.instances) for s in eng.hosts.sync()] == [("h1", 1), ("h2", 1)]
    eng.close()
    assert Settings().sync_policy == Policy()
