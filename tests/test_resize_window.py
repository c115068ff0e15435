"""The resize confirm window: finished moves are confirmed (or reverted) once the window passed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lifecycle import Engine, Flavor, Settings, VmState
from lifecycle.clock import Clock, ManualClock
from lifecycle.errors import DriverUnavailable
from tests.conftest import Fakes
from tests.images import fake_image
from tests.invariants import check_invariants


def _cloud(url: str, fakes: Fakes, clock: Clock | None = None, **settings: object) -> Engine:
    engine = Engine(url, driver_factory=fakes.factory, settings=Settings(**settings), clock=clock)  # type: ignore[arg-type]
    for name in ("a", "b"):
        engine.hosts.add(name, "fake://", vcpus=8, memory_mb=8192, disk_gb=80)
        engine.hosts.heartbeat(name)
    engine.images.add("cirros", fake_image("cirros"))
    return engine


@pytest.fixture
def moved(sqlite_url: str, fakes: Fakes, clock: ManualClock) -> Iterator[tuple[Engine, str]]:
    """An instance migrated a -> b whose move finished an hour ago on the test's clock, with a 60 s window."""
    engine = _cloud(sqlite_url, fakes, clock, resize_confirm_window=60.0)
    uuid = engine.create("vm", host="a", flavor=Flavor(1, 512, 1), image="cirros").instance_uuid
    engine.migrate(uuid)
    clock.advance(3600)
    yield engine, uuid
    check_invariants(engine.store)
    engine.close()


def test_an_expired_window_confirms_with_the_timer_as_actor(moved: tuple[Engine, str]) -> None:
    """A move finished longer ago than the window is confirmed by a task with cause timer."""
    engine, uuid = moved
    assert [r.outcome for r in engine.duties.poll_unconfirmed_resizes()] == ["done"]
    assert engine.get(uuid).vm_state is VmState.ACTIVE
    assert engine.tasks(uuid)[-1].actor == "resize_window" and engine.history(uuid)[-1].cause == "timer"


def test_a_fresh_move_waits(sqlite_url: str, fakes: Fakes, clock: ManualClock) -> None:
    """A move finished within the window (a second short of it) is left alone; a window of 0 turns the timer off."""
    engine = _cloud(sqlite_url, fakes, clock, resize_confirm_window=3600.0)
    uuid = engine.create("vm", host="a", flavor=Flavor(1, 512, 1), image="cirros").instance_uuid
    engine.migrate(uuid)
    clock.advance(3599)
    assert engine.duties.poll_unconfirmed_resizes() == []
    engine.close()
    engine = Engine(sqlite_url, driver_factory=fakes.factory)
    assert engine.settings.resize_confirm_window == 0 and engine.duties.poll_unconfirmed_resizes() == []
    assert engine.get(uuid).vm_state is VmState.RESIZED
    engine.close()


def test_the_window_can_revert_instead(sqlite_url: str, fakes: Fakes, clock: ManualClock) -> None:
    """With resize_window_action=revert the expired move goes back to the source."""
    engine = _cloud(sqlite_url, fakes, clock, resize_confirm_window=60.0, resize_window_action="revert")
    uuid = engine.create("vm", host="a", flavor=Flavor(1, 512, 1), image="cirros").instance_uuid
    engine.migrate(uuid)
    clock.advance(61)
    engine.duties.poll_unconfirmed_resizes()
    assert (engine.get(uuid).vm_state, engine.get(uuid).host) == (VmState.ACTIVE, "a")
    engine.close()


def test_an_unreachable_source_is_retried_next_pass(moved: tuple[Engine, str], fakes: Fakes) -> None:
    """When the source cannot be reached the move stays finished and the next pass confirms it."""
    engine, uuid = moved
    fakes["a"].faults.fail_next("confirm_migration", DriverUnavailable("a is down"))
    assert [r.outcome for r in engine.duties.poll_unconfirmed_resizes()] == ["retry"]
    assert engine.store.moves.open_of(uuid).status == "finished"  # type: ignore[union-attr]
    assert [r.outcome for r in engine.duties.poll_unconfirmed_resizes()] == ["done"]


def test_an_instance_being_deleted_is_skipped(moved: tuple[Engine, str], fakes: Fakes) -> None:
    """While a delete runs on a resized instance the window keeps out of its way; the delete confirms."""
    engine, uuid = moved
    gate = fakes["b"].faults.hold("power_off")  # the delete's first step, before it confirms the move itself
    engine.delete(uuid, wait=False)
    try:
        assert gate.wait_entered()
        assert [r.outcome for r in engine.duties.poll_unconfirmed_resizes()] == ["skipped"]
    finally:
        gate.release()
        engine.runner.wait_idle()
    assert engine.get(uuid).vm_state is VmState.DELETED and fakes["a"].kept_disks() == []
