"""Running one task: its walk through task_states and the writes it may make on the way.

A :class:`TaskRun` owns an instance between the task's first compare-and-swap
and its last. Every write it makes expects the instance exactly as it left it
(same version, same task id). When another task took the instance over, the
write raises :class:`Preempted` and the run stops without touching the
instance again: the preemptor already closed this task and its open step.
How the run ends is its :class:`lifecycle.ending.Ending`, written by
:mod:`lifecycle.execute`.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from lifecycle import graph, preemption
from lifecycle.audit import Why
from lifecycle.config import Settings
from lifecycle.drivers.base import Attempt, DomainSpec, Driver, HostObject
from lifecycle.ending import Ending
from lifecycle.errors import DomainNotFound
from lifecycle.logs import get_logger
from lifecycle.records import Cause, Flavor, Image, Instance, Migration, Task, TaskStep
from lifecycle.slots import BuildSlots
from lifecycle.states import MigrationStatus, PowerState, TaskState
from lifecycle.store import Store

__all__ = ["Hook", "Steps", "TaskRun"]

log = get_logger(__name__)

Steps = Callable[["TaskRun"], None]
Hook = Callable[["TaskRun"], None]
"""Work an operation registers beside its steps: its preparation before the task runs, its roll-back in recovery."""


class TaskRun:
    """The worker side of one task: the instance it owns and the writes it may make."""

    def __init__(
        self,
        store: Store,
        driver_for: Callable[[str], Driver],
        *,
        settings: Settings,
        instance: Instance,
        task: Task,
        image: Image,
        source_vm_state: Any,
    ) -> None:
        self.store = store
        self.driver_for = driver_for
        self.settings = settings
        self.instance = instance
        self.task = task
        self.image = image
        self.source_vm_state = source_vm_state
        """The vm_state before the task began (None for create)."""
        self.ending = Ending()
        """What the task's last write sets, as its steps decide it, then how it ended (see :mod:`lifecycle.ending`)."""
        self.before_power = instance.power_state
        self.power_read = False
        """Whether ``before_power`` came from the hypervisor (execute's read before the steps), not the database."""
        self.schedule: Callable[[list[str]], str] | None = None
        """Pick and claim a host, avoiding the ones tried (set by the operation's preparation: create, moves)."""
        self.attempts = 1
        """For create: how many hosts a failing spawn may be tried on."""
        self.recovering = False
        """Set when recovery resumes this task after its owner died: writes say cause recovery."""
        self.done: set[str] = set()
        """Non-repeatable steps already completed (from the step log, when resuming)."""
        self.preempted: Task | None = None
        """The task this one took over when it began, if any (see :mod:`lifecycle.preemption`)."""
        self.touched: set[str] = set()
        """Hosts this run drove or claimed: where a late call of a preempted worker may have left something."""
        self.build_slots: BuildSlots | None = None
        """The runner's build slots per host (set when it launches the task): see :meth:`build_slot`."""
        self._seq = 1
        self._progress_at = 0.0
        self._verified = True
        """The last write of this task proved it ours, and no driver call has been made since."""
        self._position = 0
        self._written = self._walk_index(instance.task_state)

    @property
    def driver(self) -> Driver:
        """The driver of the host the instance is on now, for a call this task makes (see :meth:`on`)."""
        if self.instance.host is None:
            raise DomainNotFound(self.instance.uuid, call="driver")
        return self.on(self.instance.host)

    def on(self, host: str) -> Driver:
        """Return the driver of ``host`` for a call this task makes, once the task is known to be still ours.

        Every driver call of a task goes through here: a worker whose task was
        preempted or taken over by recovery (a newer epoch) stops before its
        next call instead of acting on a guest it no longer owns.
        """
        self._fence()
        self.touched.add(host)
        return self.driver_for(host)

    @contextmanager
    def build_slot(self, host: str) -> Iterator[None]:
        """Hold one of ``host``'s build slots for the block; while all are taken, wait in turn as a queued step."""
        slots = self.build_slots
        if slots is None:
            yield
            return
        seq = [0]

        def queued(running: int) -> None:
            self._seq += 1
            seq[0] = self._seq
            detail = f"waiting for a build slot on {host}: {running} builds running there (max_concurrent_builds)"
            self.store.tasks.open_step(self.task.id, self._seq, "queued_for_build_slot", detail)
            log.info("build_queued", host=host, running=running, limit=slots.limit)

        def granted() -> None:
            self.store.tasks.end_step(self.task.id, seq[0])
            self._verified = False  # a takeover may have come while it waited: the next driver call checks
            log.debug("build_slot_granted", host=host)

        with slots.slot(host, queued=queued, granted=granted, check=self.store_fence):
            yield

    def store_fence(self) -> None:
        """Raise as :meth:`Store.tasks.fence` when this task is no longer ours (taken over, deleted, recovered)."""
        self.store.tasks.fence(self.task)

    def _fence(self) -> None:
        # Right after this task's own write (its start, a step, a takeover) the write itself proved the
        # task was ours; only a second call with no write between needs to read the task again.
        if self._verified:
            self._verified = False
            return
        self.store.tasks.fence(self.task)

    @property
    def params(self) -> dict[str, Any]:
        """The operation's arguments as stored on the task."""
        return self.task.params

    @property
    def spec(self) -> DomainSpec:
        """What the driver needs to define this instance's domain, on its disk, for this attempt."""
        i = self.instance
        return DomainSpec(
            uuid=i.uuid,
            name=i.name,
            vcpus=i.flavor.vcpus,
            memory_mb=i.flavor.memory_mb,
            root_gb=i.flavor.root_gb,
            image_path=self.image.path,
            image_format=self.image.disk_format,
            disk=i.disk,
            attempt=self.attempt(),
        )

    def attempt(self, migration_id: str | None = None) -> Attempt:
        """Return the attempt of this worker: what its driver calls stamp, and the epoch check before destroying."""
        return Attempt(self.task.id, self.task.epoch, migration_id, holds=self._holds)

    def _holds(self) -> None:
        self.store.tasks.fence(self.task)

    def clear_leftovers(self, host: str, keep: frozenset[str] = frozenset(), why: str = "") -> list[str]:
        """Destroy, on ``host``, what another attempt left of this instance (never this task's, nor ``keep``).

        Called before this task makes a copy of the instance where it does not
        live: an earlier life's domain and disk (an evacuated copy, a failed
        move's) are destroyed first, never adopted nor started, and the audit
        log says so. Returns the names destroyed.
        """
        driver = self.on(host)
        attempt = self.attempt()
        found = driver.objects(self.instance.uuid)
        used = {v for o in found for v in o.volumes}
        stale = [o for o in found if _leftover(o, attempt, keep, used)]
        if not stale:
            return []
        removed = self.on(host).remove(self.instance.uuid, stale)
        if removed:
            names = ", ".join(removed)
            message = (
                f"destroyed on {host}, before {why or 'making a copy'}, what another attempt left of this instance"
                f" (never adopted nor started): {names}; by {self.task.operation} task {self.task.id}"
            )
            # A note beside the task's own rows (no task id: it changes no state of the task's walk), on the row as
            # it is now (a delete may have taken the instance over meanwhile).
            self.store.writes.note(
                self.store.instances.get(self.instance.uuid), replace(self.why(message), task_id=None)
            )
            log.warning("leftovers_destroyed", host=host, removed=removed)
        return removed

    def why(self, message: str | None = None) -> Why:
        """Return the audit reason for writes of this task."""
        t = self.task
        return Why(
            actor=f"recovery:{t.owner}" if self.recovering else t.actor,
            cause=Cause.RECOVERY if self.recovering else t.cause,
            operation=t.operation,
            task_id=t.id,
            request_id=t.request_id,
            rule=t.params.get("rule"),
            message=message,
        )

    def read_power(self) -> PowerState:
        """Ask the driver for the guest's power now; a missing domain (or no host) is NOSTATE.

        When the task is about to move the instance (a ``host`` field to write),
        the new host is the one asked.
        """
        host = self.ending.fields.get("host", self.instance.host)
        if host is None:
            return PowerState.NOSTATE
        try:
            return self.driver_for(host).get_info(self.instance.uuid)
        except DomainNotFound:
            return PowerState.NOSTATE

    def wait_for_preempted(self) -> None:
        """Under the WAIT rule, block until the worker of the task this one took over has ended.

        Bounded by ``preempt_wait_seconds``: a worker hung in a hypervisor call
        must not hold this task forever; past the bound it goes on, logged.
        """
        old = self.preempted
        if old is None or preemption.rule(self.task.operation, old.operation) is not preemption.Rule.WAIT:
            return
        deadline = time.monotonic() + self.settings.preempt_wait_seconds
        while self.store.tasks.worker_alive(old.id):
            if time.monotonic() >= deadline:
                log.warning("preempted_worker_still_busy", preempted_task_id=old.id)
                return
            time.sleep(0.02)  # a preemption is rare and short: polling one row is cheap and simple
        log.debug("preempted_worker_ended", preempted_task_id=old.id)

    def resume_from(self, steps: list[TaskStep]) -> None:
        """Prepare to resume after a crash: writes say recovery, completed steps are not redone."""
        self.recovering = True
        self.done = {s.name for s in steps if s.finished_at is not None}
        self._seq = max((s.seq for s in steps), default=1)

    def _walk_index(self, state: TaskState | None) -> int:
        walk = graph.operation(self.task.operation).walk
        return walk.index(state) if state in walk else 0

    def resumed_past(self, state: TaskState) -> bool:
        """Whether a resumed run finds ``state`` already behind it (its work was done before the crash)."""
        return self._written > self._walk_index(state)

    def advance(self, state: TaskState, message: str | None = None, **fields: Any) -> None:
        """Enter ``state``, the next task_state of the walk (a CAS under this task's id), writing ``fields``.

        Naming the state makes each step read as what it writes; naming one
        that is not next in the table's walk is a programming error. A
        resumed run passes over the task_states written before the crash
        without writing them again.
        """
        walk = graph.operation(self.task.operation).walk
        expected = walk[self._position + 1] if self._position + 1 < len(walk) else None
        if state is not expected:
            raise AssertionError(f"{self.task.operation} enters {expected} next, not {state}")
        self._position += 1
        if self._position <= self._written:
            return
        self._step(state, message, fields)
        self._written = self._position

    def record_migration(
        self,
        kind: str,
        source: str,
        dest: str | None,
        *,
        new_flavor: Flavor | None = None,
        status: MigrationStatus = MigrationStatus.PRE_MIGRATING,
    ) -> Migration:
        """Write this task's migration record (a move, an evacuation); a record with an end status is finished."""
        at = self.store.clock.now()
        migration = Migration(
            id=str(uuidlib.uuid4()),
            instance_uuid=self.instance.uuid,
            task_id=self.task.id,
            kind=kind,
            source_host=source,
            dest_host=dest,
            old_flavor=self.instance.flavor,
            new_flavor=new_flavor or self.instance.flavor,
            status=status,
            previous_vm_state=self.source_vm_state,
            source_disk=None,
            created_at=at,
            updated_at=at,
            finished_at=None if status is MigrationStatus.PRE_MIGRATING else at,
        )
        self.store.moves.add(migration)
        return migration

    def migration_status(self, migration_id: str, status: Any, **values: Any) -> None:
        """Write a move's status for this task, once the task is known to be still ours (as a driver call is)."""
        self._fence()
        self.store.moves.update(migration_id, status=status, **values)

    def copy_progress(self, done: int, total: int) -> None:
        """Record how far this step's disk copy got (at most every quarter second, and at its end).

        Each record also checks the task is still ours: a delete that took the
        instance over, or recovery that took the task over, stops the copy here.
        """
        moment = time.monotonic()
        if done < total and moment - self._progress_at < 0.25:
            return
        self._progress_at = moment
        self.store.tasks.record_progress(self.task, done, total)

    def power_off(self, timeout: float | None = None) -> None:
        """Shut the guest down cleanly within ``timeout`` (default ``shutdown_timeout``), then hard."""
        self.driver.power_off(
            self.instance.uuid,
            timeout=self.settings.shutdown_timeout if timeout is None else timeout,
            retry_interval=self.settings.shutdown_retry_interval,
        )

    def retry(self, message: str, **fields: Any) -> None:
        """Go back to the first step of the walk (a reschedule), recording why."""
        assert self.instance.task_state is not None
        self._step(graph.retry_task_state(self.task.operation, self.instance.task_state), message, fields, retried=True)
        self._position = self._written = 0

    def once(self, name: str, action: Callable[[], object]) -> None:
        """Run a step that must never run twice for this task, and record that it completed.

        A resumed run skips it when the step log says it completed before the crash.
        """
        if name in self.done:
            return
        action()
        self._seq += 1
        self.store.tasks.mark_done(self.task.id, self._seq, name)
        self.done.add(name)

    def _step(
        self, task_state: TaskState, message: str | None, fields: dict[str, Any], *, retried: bool = False
    ) -> None:
        self._seq += 1
        self.instance = self.store.writes.advance(
            self.instance, self.task, self._seq, task_state, self.why(message), retried=retried, **fields
        )
        self._verified = True
        log.debug("task_step", task_state=task_state.value, seq=self._seq, message=message)


def _leftover(obj: HostObject, attempt: Attempt, keep: frozenset[str], used: set[str]) -> bool:
    """Whether a hypervisor object is another attempt's: not ``attempt``'s task's, nor a disk in ``keep``.

    An earlier epoch of the task left it too when it is a volume no domain
    uses (a copy cut short by a crash or a takeover): its domain, and the
    disk that domain uses, are what a resumed run takes over.
    """
    if obj.name in keep or set(obj.volumes) & keep:
        return False
    if not obj.of_task(attempt):
        return True
    partial = obj.kind == "volume" and obj.name not in used
    return partial and obj.epoch is not None and obj.epoch < attempt.epoch
