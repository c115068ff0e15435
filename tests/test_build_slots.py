"""Many builds on one host: a burst queues for ``max_concurrent_builds`` slots, and a busy storage pool is waited out.

Fast tier (fake hosts): the engine's per-host build slots (queued builds show
as an open ``queued_for_build_slot`` step), and the fake's busy pool, which
answers as libvirt's storage driver does while another call builds a volume.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from lifecycle import Engine
from lifecycle.cli import main
from lifecycle.drivers.fake import FakeDriver
from lifecycle.errors import DomainNotFound, TaskFailed
from lifecycle.slots import BuildSlots
from tests.conftest import FLAVOR, Fakes, holds_for, library_logging_kept, make_engine, wait_until


@pytest.fixture
def slots_engine(db_url: str, fakes: Fakes) -> Iterator[Engine]:
    """An engine with two build slots per host and eight workers, over fake hosts h1 and h2."""
    engine = make_engine(db_url, fakes, shutdown_timeout=0.0, max_concurrent_builds=2, workers=8)
    for host in ("h1", "h2"):
        engine.hosts.heartbeat(host)
    yield engine
    engine.close()


def _queued(engine: Engine, task_id: str) -> list[str]:
    """The results of a task's queued_for_build_slot steps ('running' while it waits)."""
    return [s.result or "running" for s in engine.steps(task_id) if s.name == "queued_for_build_slot"]


def test_a_burst_onto_one_host_runs_at_most_the_slots_and_queues_the_rest(
    slots_engine: Engine, fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    """Five creates onto h1 with two slots: two spawn at once, three wait as a queued step (`lifecycle tasks` shows it)."""
    engine = slots_engine
    h1 = fakes.setdefault("h1", FakeDriver("h1"))
    gates = [h1.faults.hold("spawn") for _ in range(5)]
    tasks = [engine.create(f"vm{i}", host="h1", flavor=FLAVOR, image="cirros", wait=False) for i in range(5)]
    wait_until("two spawns in flight", lambda: sum(g.wait_entered(0) for g in gates) == 2)
    wait_until("three queued builds", lambda: sum(_queued(engine, t.id) == ["running"] for t in tasks) == 3)
    holds_for("no third spawn while both slots are taken", lambda: sum(g.wait_entered(0) for g in gates) == 2, 0.3)
    waiting = next(t for t in tasks if _queued(engine, t.id) == ["running"])
    with library_logging_kept():  # the CLI configures logging globally
        assert (
            main(
                [
                    "--db",
                    str(engine.store.engine.url.render_as_string(hide_password=False)),
                    "tasks",
                    waiting.instance_uuid,
                ]
            )
            == 0
        )
    shown = capsys.readouterr().out
    assert "queued_for_build_slot running: waiting for a build slot on h1: 2 builds running there" in shown, shown
    for gate in gates:
        gate.release()
    engine.runner.wait_idle()
    assert [engine.get(t.instance_uuid).vm_state.value for t in tasks] == ["active"] * 5
    assert sorted(r for t in tasks for r in _queued(engine, t.id)) == ["ok"] * 3
    assert engine.runner.build_slots.running("h1") == 0


def test_slots_are_per_host(slots_engine: Engine, fakes: Fakes) -> None:
    """With h1's two slots held, a build onto h2 spawns at once instead of queueing behind them."""
    engine = slots_engine
    h1 = fakes.setdefault("h1", FakeDriver("h1"))
    gates = [h1.faults.hold("spawn") for _ in range(2)]
    held = [engine.create(f"vm{i}", host="h1", flavor=FLAVOR, image="cirros", wait=False) for i in range(2)]
    wait_until("both h1 slots taken", lambda: all(g.wait_entered(0) for g in gates))
    other = engine.create("vm-h2", host="h2", flavor=FLAVOR, image="cirros")
    assert engine.get(other.instance_uuid).vm_state.value == "active"
    assert _queued(engine, other.id) == []
    for gate in gates:
        gate.release()
    engine.runner.wait_idle()
    assert all(engine.get(t.instance_uuid).vm_state.value == "active" for t in held)


def test_deleting_a_queued_build_ends_its_wait_and_frees_nothing_it_did_not_take(
    slots_engine: Engine, fakes: Fakes
) -> None:
    """A delete of a build waiting for a slot takes it over at once; the slots held by others stay theirs."""
    engine = slots_engine
    h1 = fakes.setdefault("h1", FakeDriver("h1"))
    gates = [h1.faults.hold("spawn") for _ in range(2)]
    held = [engine.create(f"vm{i}", host="h1", flavor=FLAVOR, image="cirros", wait=False) for i in range(2)]
    wait_until("both h1 slots taken", lambda: all(g.wait_entered(0) for g in gates))
    queued = engine.create("vm-queued", host="h1", flavor=FLAVOR, image="cirros", wait=False)
    wait_until("the third build queued", lambda: _queued(engine, queued.id) == ["running"])
    started = time.monotonic()
    engine.delete(queued.instance_uuid)
    assert time.monotonic() - started < 5.0
    wait_until("the queued build's worker leaving the line", lambda: engine.runner.build_slots.queued("h1") == 0)
    assert engine.runner.build_slots.running("h1") == 2
    for gate in gates:
        gate.release()
    engine.runner.wait_idle()
    assert all(engine.get(t.instance_uuid).vm_state.value == "active" for t in held)
    assert not h1.domain_exists(queued.instance_uuid)


def test_build_slots_are_granted_in_the_order_asked() -> None:
    """With one slot, builds waiting for it get it first come, first served."""
    slots, order, inside = BuildSlots(1), [], threading.Event()

    def build(name: str, ready: threading.Event) -> None:
        with slots.slot("h", queued=lambda _n: ready.set(), granted=lambda: None, check=lambda: None):
            order.append(name)
            inside.wait(5)

    first = threading.Thread(target=build, args=("first", threading.Event()))
    first.start()
    wait_until("the first build holding the slot", lambda: slots.running("h") == 1)
    waiters = []
    for name in ("second", "third", "fourth"):
        ready = threading.Event()
        thread = threading.Thread(target=build, args=(name, ready))
        thread.start()
        assert ready.wait(5)
        waiters.append(thread)
    inside.set()
    for thread in [first, *waiters]:
        thread.join(5)
    assert order == ["first", "second", "third", "fourth"]
    assert slots.running("h") == 0


def test_a_busy_pool_is_waited_out_by_a_build_and_a_delete(engine: Engine, fakes: Fakes) -> None:
    """Busy answers of the host's pool (another call building a volume) delay a create and a delete, never fail them."""
    h1 = fakes.setdefault("h1", FakeDriver("h1"))
    engine.hosts.heartbeat("h1")
    h1.faults.busy_pool(3)
    task = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros")
    assert engine.get(task.instance_uuid).vm_state.value == "active"
    assert h1.busy_answers == 3
    h1.faults.busy_pool(3)
    engine.delete(task.instance_uuid)
    assert h1.busy_answers == 6
    assert not h1.domain_exists(task.instance_uuid)
    assert h1.volumes() == {}


def test_a_pool_busy_past_the_bound_fails_the_build_with_its_cause_not_as_a_missing_domain(
    engine: Engine, fakes: Fakes
) -> None:
    """A pool still busy after the retries fails the spawn as a DriverError carrying the busy answer."""
    h1 = fakes.setdefault("h1", FakeDriver("h1"))
    engine.hosts.heartbeat("h1")
    h1.busy_seconds = 0.2
    h1.faults.busy_pool(10_000)
    with pytest.raises(TaskFailed) as failed:
        engine.create("vm", host="h1", flavor=FLAVOR, image="cirros")
    h1.faults.busy_pool(
        -h1.faults.busy
    )  # the host is quiet again: the failed build's clean-up and teardown checks go on
    error = failed.value.task.error or ""
    assert "has asynchronous jobs running" in error and "still busy" in error
    assert DomainNotFound.__name__ not in error
    assert engine.get(failed.value.task.instance_uuid).vm_state.value == "error"


@pytest.mark.parametrize("failing", ["queued", "granted", "check"])
def test_a_callback_that_raises_gives_the_slot_or_the_place_in_line_back(failing: str) -> None:
    """Whatever queued, granted or check raises (a database gone), the next build still gets a slot."""
    slots, release = BuildSlots(1), threading.Event()

    def holder() -> None:
        with slots.slot("h", queued=lambda _n: None, granted=lambda: None, check=lambda: None):
            release.wait(5)

    first = threading.Thread(target=holder)
    first.start()
    wait_until("the first build holding the slot", lambda: slots.running("h") == 1)

    def boom(*_args: object) -> None:
        raise RuntimeError(f"{failing} failed")

    calls = {name: (boom if name == failing else (lambda *_a: None)) for name in ("queued", "granted", "check")}
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            with slots.slot("h", queued=calls["queued"], granted=calls["granted"], check=calls["check"]):
                pass
        except RuntimeError as exc:
            errors.append(exc)

    second = threading.Thread(target=waiter)
    second.start()
    if failing == "granted":  # it fails only once the slot is handed over: it must be in line first
        wait_until("the second build in line", lambda: slots.queued("h") == 1)
    else:  # queued fails at once; check once the first wait ends
        wait_until(f"{failing} raising", lambda: bool(errors))
    release.set()
    first.join(5)
    second.join(5)
    assert [str(e) for e in errors] == [f"{failing} failed"]
    assert (slots.running("h"), slots.queued("h")) == (0, 0)
    with slots.slot("h", queued=boom, granted=boom, check=boom):  # free at once: no callback runs
        assert slots.running("h") == 1
