"""Starting tasks and running their workers: the machinery between the facade and the steps.

:class:`Runner` checks an operation's guard, honours idempotency keys, starts
the task with a compare-and-swap (taking over a task it may preempt, retried
when it loses a race to another preemptor), and runs the task's steps in the
caller's thread or on its worker pool. While a worker runs, a heartbeat
renews that task's lease, and only that task's: a task whose worker died
expires and recovery finishes it. Recovery resumes tasks through
:meth:`Runner.resume` and :meth:`Runner.work`.
"""

from __future__ import annotations

import json
import threading
import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from lifecycle import graph, snapshots, validation
from lifecycle.admission import admit, refuse_if_locked
from lifecycle.asks import Ask, new_instance
from lifecycle.config import Settings
from lifecycle.drivers.base import Driver
from lifecycle.errors import AlreadyExists, Conflict, IdempotencyMismatch, InvalidInput, InvalidState, NoValidHost
from lifecycle.execute import execute, outcome_of
from lifecycle.logs import get_logger
from lifecycle.operations import definition
from lifecycle.records import Cause, Image, Instance, Outcome, Task
from lifecycle.registry import Call
from lifecycle.slots import BuildSlots
from lifecycle.states import VmState
from lifecycle.store import Store
from lifecycle.tasks import TaskRun

__all__ = ["Runner", "check_call"]

log = get_logger(__name__)


class Runner:
    """Starts and runs the tasks of one engine (its ``owner`` name in every lease)."""

    def __init__(self, store: Store, settings: Settings, driver_for: Callable[[str], Driver], owner: str) -> None:
        self.store = store
        self.settings = settings
        self.driver_for = driver_for
        self.build_slots = BuildSlots(settings.max_concurrent_builds)
        """At most ``max_concurrent_builds`` spawns per host at once in this engine."""
        self.owner = owner
        self.active: set[str] = set()
        """Ids of the tasks a worker of this runner is running now: only their leases are renewed."""
        self._images: dict[str, Image] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future[Task]] = {}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def close(self) -> None:
        """Wait for the background tasks, then stop the heartbeat."""
        self.wait_idle()
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()

    def wait_idle(self) -> None:
        """Block until every task started with ``wait=False`` has ended (the pool is made anew on next use)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def start(
        self,
        operation: str,
        uuid: str | None,
        *,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        actor: str = "api",
        cause: Cause = Cause.API,
        wait: bool = True,
        override_lock: bool = False,
        only_idle_in: VmState | None = None,
    ) -> Task:
        """Start ``operation`` on instance ``uuid`` and run it (see :meth:`lifecycle.Engine.run`).

        Every operation starts here, one that creates its instance too (its
        arguments then carry the new instance's name, flavor and image).
        With ``only_idle_in`` (a timer's duty), start only while the instance is
        idle in that vm_state, never preempting a task (a restore racing the
        reclaim): otherwise :class:`InvalidState`, and nothing is written.
        ``uuid`` None is for an operation that creates its instance: it gets a
        fresh one, and an ``idempotency_key`` then names the call by its other
        arguments alone (a retry finds the instance the first call made).
        """
        defined = definition(operation)
        if not isinstance(cause, Cause) or not isinstance(wait, bool) or not isinstance(override_lock, bool):
            raise InvalidInput(
                f"cause must be a Cause, wait and override_lock bools, got {cause!r}, {wait!r}, {override_lock!r}"
            )
        if params is not None and not isinstance(params, dict):
            raise InvalidInput(f"params must be a dict, got {type(params).__name__}")
        check_call(request_id, idempotency_key, actor)
        chosen = uuid is not None or not defined.row.creates
        uuid = validation.uuid(uuid) if chosen else str(uuidlib.uuid4())
        checked = defined.params(params or {})
        if checked.get("image") is not None:
            self.image(checked["image"])
        ask = Ask(
            defined, uuid, checked, request_id, idempotency_key, actor, cause, override_lock, only_idle_in, chosen
        )
        if defined.row.creates:
            return self._create(ask, wait)
        for attempt in range(self.settings.preempt_retries + 1):
            try:
                run = self._take(ask)
            except Conflict:
                replayed = self._replayed(ask)
                if replayed is not None:
                    return self._repeat(replayed, wait)
                if not defined.row.preempts or attempt == self.settings.preempt_retries:
                    raise
                continue
            if isinstance(run, Task):
                return self._repeat(run, wait)  # an idempotent repeat
            self.prepare(run)
            return self.launch(run, wait)
        raise AssertionError("unreachable")

    def _replayed(self, ask: Ask) -> Task | None:
        if ask.key is None:
            return None
        return self.replay(ask.key, ask.defined.name, ask.uuid if ask.uuid_chosen else None, ask.params)

    def _create(self, ask: Ask, wait: bool) -> Task:
        """Write a new instance with its operation's first task_state (a create), then run it.

        With an idempotency key, a repeat of the call returns the first call's
        task, and a repeat racing the first one finds it when its own write loses.
        """
        replayed = self._replayed(ask)
        if replayed is not None:
            return self._repeat(replayed, wait)
        name = ask.defined.name
        first = graph.begin(name, ask.uuid, None, None)
        image = self.image(ask.params["image"])
        task = self.new_task(ask.uuid, name, **ask.task_fields())
        instance = new_instance(ask, image, first, task)
        if ask.defined.guard is not None:
            ask.defined.guard(Call(self.store, self.settings, instance, ask.params, image, ask.cause))
        try:
            self.store.writes.create(instance, task, first.value, ask.why(task, None, None))
        except AlreadyExists:
            replayed = self._replayed(ask)  # the same key written meanwhile by a concurrent repeat
            if replayed is None:
                raise
            return self._repeat(replayed, wait)
        run = self._worker(instance, task, image, None)
        self.prepare(run)
        return self.launch(run, wait)

    def _take(self, ask: Ask) -> TaskRun | Task:
        """Begin the task on the instance as read now (taking over a task it may preempt): its worker, or a replay.

        Raises :class:`Conflict` when the instance changed between the read and the write.
        """
        name, uuid = ask.defined.name, ask.uuid
        instance = self.store.instances.get(uuid)
        replayed = self._replayed(ask)
        if replayed is not None:
            return replayed
        if ask.defined.row.lock_applies:
            refuse_if_locked(name, instance, ask.cause, ask.override_lock)
        idle_in = ask.only_idle_in
        if idle_in is not None and (instance.vm_state is not idle_in or instance.task_id is not None):
            reason = f"this duty runs only on an idle {idle_in.value} instance"
            raise InvalidState(name, uuid, instance.vm_state, instance.task_state, [idle_in], [None], reason=reason)
        first = graph.begin(name, uuid, instance.vm_state, instance.task_state)
        image = self.image(ask.params.get("image") or instance.image)
        if ask.defined.guard is not None:
            ask.defined.guard(Call(self.store, self.settings, instance, ask.params, image, ask.cause))
        claim = admit(self.store, self.settings, ask.defined.row, instance, ask.cause)
        preempt = None if instance.task_id is None else self.store.tasks.get(instance.task_id)
        task = self.new_task(uuid, name, **ask.task_fields())
        why = ask.why(task, preempt, instance if ask.override_lock else None)
        try:
            after = self.store.writes.begin(instance, task, first, why, preempt, claim=claim)
        except NoValidHost as exc:
            assert claim is not None
            held = f"{instance.vm_state.value} instance {uuid} holds no claim on {claim.host}"
            raise NoValidHost(
                {
                    h: f"{held} and cannot get one ({reason}): {name} would run it uncounted there"
                    for h, reason in exc.reasons.items()
                }
            ) from None
        if preempt is not None:
            log.info(
                "task_preempted_by",
                instance_uuid=uuid,
                task_id=task.id,
                request_id=task.request_id,
                preempted_task_id=preempt.id,
                operation=name,
            )
        run = self._worker(after, task, image, instance.vm_state)
        run.preempted = preempt
        return run

    def replay(self, key: str, operation: str, uuid: str | None, params: dict[str, Any]) -> Task | None:
        """Return the task an earlier call with ``key`` started, as it is now (see :meth:`_repeat` for the answer).

        A key names one call: reusing it for another operation, instance or
        arguments is refused, never silently answered with the first call's
        task. ``uuid`` None (a create that chose no uuid) matches the first call's instance.
        """
        existing = self.store.tasks.by_key(key)
        if existing is None:
            return None
        asked = (operation, existing.instance_uuid if uuid is None else uuid, _canonical(params))
        if (existing.operation, existing.instance_uuid, _canonical(existing.params)) != asked:
            raise IdempotencyMismatch(key, existing, operation, uuid or "a new instance")
        return existing

    def _repeat(self, first: Task, wait: bool) -> Task:
        """Answer a repeated call as the first call answers: the same return or the same exception.

        With ``wait=True``: an ended task answers at once (the task,
        :class:`TaskFailed` or :class:`Preempted`), and a running one is waited
        for to its end, as the first call waits (a retry racing it blocks until
        it ends); a task whose owner stopped renewing its lease is not waited
        for: :class:`~lifecycle.waiting.TaskWaitTimeout` says recovery must
        take it over first. With ``wait=False`` (the 202 pattern) the task is
        returned as it is now, ended or not, as a first call would return it.
        """
        if not wait:
            return first
        if first.outcome is Outcome.RUNNING:
            from lifecycle.waiting import wait as wait_for  # waiting builds on the runner: imported when used

            return wait_for(self, first.id, abandoned_ends=True)
        return outcome_of(first)

    def _worker(self, row: Instance, task: Task, image: Image, source: Any) -> TaskRun:
        """Return the worker of ``task`` on ``row``, with this runner's store, drivers and settings."""
        store, settings = self.store, self.settings
        return TaskRun(
            store, self.driver_for, settings=settings, instance=row, task=task, image=image, source_vm_state=source
        )

    def new_task(
        self,
        uuid: str,
        operation: str,
        *,
        params: dict[str, Any],
        request_id: str | None,
        key: str | None,
        actor: str,
        cause: Cause,
    ) -> Task:
        """Return a new running task record owned by this runner (not yet written)."""
        at = self.store.clock.now()
        return Task(
            id=str(uuidlib.uuid4()),
            instance_uuid=uuid,
            operation=operation,
            request_id=request_id or f"req-{uuidlib.uuid4()}",
            idempotency_key=key,
            actor=actor,
            cause=cause,
            params=params,
            outcome=Outcome.RUNNING,
            preempted_by=None,
            owner=self.owner,
            lease_expires_at=at + self.store.lease,
            started_at=at,
            finished_at=None,
            error=None,
            traceback=None,
        )

    def launch(self, run: TaskRun, wait: bool) -> Task:
        """Run ``run`` here (``wait``) and return it finished, or on the pool and return it running."""
        self.ensure_heartbeat()
        run.build_slots = self.build_slots
        if wait:
            return self.work(run)
        with self._lock:
            self.active.add(run.task.id)  # before the submit: the task is ours from now on
        future = self.pool().submit(self.work, run)
        with self._lock:
            self._futures[run.task.id] = future
        future.add_done_callback(_log_background_failure)
        future.add_done_callback(lambda _: self._forget(run.task.id))
        return replace(run.task)

    def future_of(self, task_id: str) -> Future[Task] | None:
        """Return the future of a task this runner's pool runs now (started with ``wait=False``), else None."""
        with self._lock:
            return self._futures.get(task_id)

    def _forget(self, task_id: str) -> None:
        with self._lock:
            self._futures.pop(task_id, None)

    def work(self, run: TaskRun) -> Task:
        """Run a task's steps; its lease is renewed exactly while this runs.

        Should the worker die without ending the task (the database gone at
        the last write), the lease then runs out and recovery finishes it.
        """
        with self._lock:
            self.active.add(run.task.id)
        try:
            return execute(run, definition(run.task.operation).steps)
        finally:
            with self._lock:
                self.active.discard(run.task.id)

    def prepare(self, run: TaskRun) -> None:
        """Run the operation's preparation hook, if it has one (a move gets its scheduler)."""
        hook = definition(run.task.operation).prepare
        if hook is not None:
            hook(run)

    def resume(self, task: Task, instance: Instance) -> TaskRun:
        """Build the worker for a task recovery resumes after taking it over."""
        image = self.image(task.params.get("image") or instance.image)
        source = None if graph.operation(task.operation).creates else instance.vm_state
        run = self._worker(instance, task, image, source)
        run.build_slots = self.build_slots
        run.resume_from(self.store.tasks.steps(task.id))
        self.prepare(run)
        return run

    def image(self, name: object) -> Image:
        """Return an image row (cached: image rows are never updated, no API changes one)."""
        # Image rows are never updated (no API changes one), so caching is safe.
        validation.name("image", name)
        assert isinstance(name, str)
        if name.startswith(snapshots.PREFIX):
            raise InvalidInput(f"image {name!r} is a shelve snapshot: only its own instance's unshelve uses it")
        image = self._images.get(name)
        if image is None:
            image = self._images[name] = self.store.images.get(name)
        return image

    def pool(self) -> ThreadPoolExecutor:
        """Return the worker pool for tasks started with ``wait=False`` (made on first use)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="lifecycle-task")
            return self._executor

    def ensure_heartbeat(self) -> None:
        """Start the lease-renewing heartbeat thread once."""
        with self._lock:
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._renew_leases, name="lifecycle-heartbeat", daemon=True)
                self._heartbeat.start()

    def _renew_leases(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            with self._lock:
                active = list(self.active)
            try:
                self.store.tasks.renew_leases(self.owner, active)
            except Exception:  # one failed renewal must not end the heartbeat
                log.exception("lease_renewal_failed")


def check_call(request_id: object, key: object, actor: object) -> None:
    """Refuse request ids, idempotency keys and actors that are not short printable strings."""
    for kind, value in (("request id", request_id), ("idempotency key", key)):
        if value is not None:
            validation.name(kind, value)
    validation.name("actor", actor)


def _canonical(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _log_background_failure(future: Future[Task]) -> None:
    exc = future.exception()
    if exc is not None and not isinstance(exc, InvalidState):
        log.info("background_task_ended", error=str(exc), error_type=type(exc).__name__)
