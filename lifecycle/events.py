"""The event path: hypervisor lifecycle events fed to the same decision as the sweep.

Events arrive on the driver's thread; :meth:`EventProcessor.on_event` only
queues them. A STOPPED event is held for ``delay`` seconds and cancelled by
any later event for the same domain, so a reboot (STOPPED then STARTED) never
turns into a stop (Nova bug 1443186). Only STOPPED is delayed: delaying
STARTED once hid a later STOPPED (bug 1433049). Before acting, the live power
state is read again and an event it contradicts is dropped as stale (bug
1468431); an event older than the instance's last change is ignored.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from lifecycle.drivers.base import LifecycleEvent, Transition
from lifecycle.errors import DomainNotFound, InstanceNotFound, LifecycleError
from lifecycle.logs import get_logger
from lifecycle.records import Cause
from lifecycle.states import PowerState
from lifecycle.sweep import apply_decision
from lifecycle.sync import Action, Observation, Policy, Recorded, decide

if TYPE_CHECKING:
    from lifecycle.context import Context

__all__ = ["EventProcessor"]

log = get_logger(__name__)

_POWER = {
    Transition.STOPPED: PowerState.SHUTDOWN,
    Transition.STARTED: PowerState.RUNNING,
    Transition.RESUMED: PowerState.RUNNING,
    Transition.PAUSED: PowerState.PAUSED,
    Transition.SUSPENDED: PowerState.SUSPENDED,
}


class EventProcessor:
    """Queues one host's events, delays STOPPED, and applies the sync decision to each."""

    def __init__(
        self,
        ctx: Context,
        host: str,
        policy: Policy,
        *,
        delay: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctx = ctx
        self.host = host
        self.policy = policy
        self.delay = delay
        self.clock = clock
        self._cond = threading.Condition()
        self._held: dict[str, tuple[float, LifecycleEvent]] = {}
        self._ready: deque[LifecycleEvent] = deque()

    def on_event(self, event: LifecycleEvent) -> None:
        """Queue an event (called on the driver's thread; never blocks on the database)."""
        with self._cond:
            cancelled = self._held.pop(event.uuid, None)
            if cancelled is not None:
                log.info("stopped_event_cancelled", instance_uuid=event.uuid, by=event.transition.value)
            if event.transition is Transition.STOPPED and self.delay > 0:
                self._held[event.uuid] = (self.clock() + self.delay, event)
            else:
                self._ready.append(event)
            self._cond.notify_all()

    def process_due(self) -> list[str]:
        """Handle every event that is ready now; return what became of each (for tests and logs)."""
        outcomes = []
        for event in self._take_due():
            outcomes.append(self._handle(event))
        return outcomes

    def run(self, stop: threading.Event) -> None:
        """Handle events until ``stop`` is set; sleeps only on the condition, never polls."""
        while not stop.is_set():
            with self._cond:
                wait = self._next_wait()
                if wait is None or wait > 0:
                    self._cond.wait(timeout=0.5 if wait is None else min(wait, 0.5))
            self.process_due()

    def wake(self) -> None:
        """Wake a waiting ``run`` loop (used at shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def _next_wait(self) -> float | None:
        if self._ready:
            return 0.0
        if not self._held:
            return None
        return min(due for due, _ in self._held.values()) - self.clock()

    def _take_due(self) -> list[LifecycleEvent]:
        with self._cond:
            moment = self.clock()
            for uuid, (due, event) in list(self._held.items()):
                if due <= moment:
                    del self._held[uuid]
                    self._ready.append(event)
            events = list(self._ready)
            self._ready.clear()
        return events

    def _handle(self, event: LifecycleEvent) -> str:
        with structlog.contextvars.bound_contextvars(instance_uuid=event.uuid, transition=event.transition.value):
            try:
                outcome = self._decide_and_apply(event)
            except LifecycleError as exc:  # contained per event, like the sweep per instance
                log.warning("event_not_applied", error=str(exc), error_type=type(exc).__name__)
                outcome = "error"
        self.ctx.metrics.observe_event(self.host, event.at, outcome)
        return outcome

    def _decide_and_apply(self, event: LifecycleEvent) -> str:
        expected = _POWER[event.transition]
        try:
            live = self.ctx.driver(self.host).get_info(event.uuid)
        except DomainNotFound:
            return "gone"
        if live is not expected:
            log.info("stale_event_dropped", expected=int(expected), live=int(live))
            return "stale"
        try:
            instance = self.ctx.store.instances.get(event.uuid)
        except InstanceNotFound:
            return "unknown"
        if instance.host != self.host:
            return "other_host"
        recorded = Recorded(
            instance.vm_state, instance.task_state, instance.power_state, instance.updated_at, instance.missing_count
        )
        decision = decide(recorded, Observation(live, event.at, source="event"), self.policy)
        if decision.action in (Action.RUN, Action.MARK_ERROR, Action.UPDATE_POWER, Action.RECORD):
            apply_decision(self.ctx, instance, decision, Cause.EVENT, "sync")
            log.info("event_applied", rule=decision.rule, action=decision.action.value)
            return decision.rule
        return decision.action.value
