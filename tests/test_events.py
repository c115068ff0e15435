"""The event path: delayed STOPPED, cancellation, live re-read, stale and foreign events."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from lifecycle import Engine, PowerState, VmState
from lifecycle.drivers.base import LifecycleEvent, Transition
from lifecycle.events import EventProcessor
from lifecycle.sync import Policy
from tests.conftest import Fakes, wait_until

P, V = PowerState, VmState


class Clock:
    """A hand-moved monotonic clock, so no test waits for real."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _processor(engine: Engine, clock: Clock, delay: float = 15.0) -> EventProcessor:
    return EventProcessor(engine.services, "h1", Policy(), delay=delay, clock=clock)


def _event(uuid: str, transition: Transition) -> LifecycleEvent:
    return LifecycleEvent(uuid, transition, datetime.now(UTC))


def test_stopped_event_is_held_then_applied(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """A guest shutdown becomes a stop only after the delay, with cause event and the rule in the audit log."""
    uuid = new_instance()
    clock = Clock()
    proc = _processor(engine, clock)
    fakes["h1"].set_power(uuid, P.SHUTDOWN, event=False)
    proc.on_event(_event(uuid, Transition.STOPPED))
    assert proc.process_due() == [] and engine.get(uuid).vm_state is V.ACTIVE
    clock.t += 15
    assert proc.process_due() == ["active_but_off:adopt"]
    assert engine.get(uuid).vm_state is V.STOPPED
    assert {(r.cause, r.rule) for r in engine.history(uuid)[-2:]} == {("event", "active_but_off:adopt")}


def test_a_reboot_never_turns_into_a_stop(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """STOPPED then STARTED (a reboot): STARTED cancels the held STOPPED and nothing changes."""
    uuid = new_instance()
    history = engine.history(uuid)
    clock = Clock()
    proc = _processor(engine, clock)
    proc.on_event(_event(uuid, Transition.STOPPED))
    proc.on_event(_event(uuid, Transition.STARTED))
    clock.t += 60
    assert proc.process_due() == ["nothing"]
    assert engine.get(uuid).vm_state is V.ACTIVE and engine.history(uuid) == history


def test_stale_event_is_dropped_after_a_live_reread(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A STOPPED event whose guest runs again by the time it is handled is dropped."""
    uuid = new_instance()
    proc = _processor(engine, Clock(), delay=0)
    proc.on_event(_event(uuid, Transition.STOPPED))
    assert proc.process_due() == ["stale"]
    assert engine.get(uuid).vm_state is V.ACTIVE


def test_event_older_than_the_last_change_is_ignored(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """An event emitted before the instance last changed does not act, even if the guest agrees with it."""
    uuid = new_instance()
    old = LifecycleEvent(uuid, Transition.STOPPED, engine.get(uuid).updated_at - timedelta(seconds=5))
    fakes["h1"].set_power(uuid, P.SHUTDOWN, event=False)
    proc = _processor(engine, Clock(), delay=0)
    proc.on_event(old)
    assert proc.process_due() == ["skip"]
    assert engine.get(uuid).vm_state is V.ACTIVE


def test_events_for_unknown_or_moved_instances_are_ignored(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """Events for a domain with no row, or whose instance lives on another host, change nothing."""
    uuid = new_instance(host="h2")
    fakes.factory(engine.store.hosts.get("h1"))
    fakes["h1"].copy_domain_from(fakes["h2"], uuid)
    proc = _processor(engine, Clock(), delay=0)
    proc.on_event(_event(uuid, Transition.STARTED))
    assert proc.process_due() == ["other_host"]


def test_events_flow_from_the_driver_thread(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """With the processor running on its thread, an out-of-band stop reaches the database without a sync pass."""
    uuid = new_instance()
    proc = _processor(engine, Clock(), delay=0)
    stop = threading.Event()
    worker = threading.Thread(target=proc.run, args=(stop,))
    worker.start()
    fakes["h1"].register_event_listener(proc.on_event)
    fakes["h1"].set_power(uuid, P.SHUTDOWN)
    wait_until("the out-of-band stop recorded", lambda: engine.get(uuid).vm_state is V.STOPPED, interval=0.02)
    stop.set()
    proc.wake()
    worker.join(5)
    fakes["h1"].register_event_listener(None)
    assert engine.get(uuid).vm_state is V.STOPPED
