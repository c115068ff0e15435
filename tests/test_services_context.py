"""The services run on a context made of the engine's parts (store, drivers, settings, runner, metrics), not on it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from lifecycle import Engine, PowerState, VmState, duties, evacuation
from lifecycle.context import Services
from lifecycle.drivers.base import LifecycleEvent, Transition
from lifecycle.events import EventProcessor
from lifecycle.sweep import sweep_host
from lifecycle.sync import Policy
from tests.conftest import Fakes


def _parts(engine: Engine) -> Services:
    """A context assembled from the engine's parts by hand, as a worker that holds no engine would."""
    return Services(engine.store, engine.settings, engine.runner, engine.metrics, engine.hosts.driver, engine.clock)


def test_a_sync_pass_runs_its_operations_through_the_runner_of_the_context(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A guest shut down behind the engine's back is stopped by a pass given only the context (actor sync)."""
    uuid = new_instance()
    fakes["h1"].set_power(uuid, PowerState.SHUTDOWN, event=False)
    summary = sweep_host(_parts(engine), "h1", Policy())
    assert (summary.drifted, summary.acted, engine.get(uuid).vm_state) == (1, 1, VmState.STOPPED)
    assert [t.actor for t in engine.tasks(uuid)][-1] == "sync"


def test_duties_evacuation_and_events_take_the_context(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """Lock, fence and an event's decision all work on a context (the engine's own one too)."""
    uuid = new_instance()
    ctx = _parts(engine)
    assert duties.lock(ctx, uuid, reason="maintenance", actor="ops").locked_by == "ops"
    assert evacuation.fence(engine.services, "h2", reason="dead", actor="ops").fenced
    processor = EventProcessor(ctx, "h1", Policy(), delay=0)
    fakes["h1"].set_power(uuid, PowerState.SHUTDOWN, event=False)
    processor.on_event(LifecycleEvent(uuid, Transition.STOPPED, datetime.now(UTC)))
    assert processor.process_due() == ["active_but_off:adopt"]  # a sync stop: the lock never blocks sync
    assert engine.get(uuid).vm_state is VmState.STOPPED
