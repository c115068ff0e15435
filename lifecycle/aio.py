"""The engine for asyncio applications: every operation and read of :class:`lifecycle.Engine` as an awaitable.

``AsyncEngine(engine)`` never blocks the event loop. Database reads and the
start of a task (arguments, guard, the compare-and-swap) run on a bounded
pool of threads the AsyncEngine owns (``threads``, by default the engine's
``workers`` setting); the task itself runs on the engine's worker pool, as
with ``wait=False``. An operation awaited with ``wait=True`` (the default)
then awaits the task's end without holding a thread while the task runs
here, and reads the database every few hundred milliseconds at most while
another process runs it; it returns or raises exactly as the blocking call
does (:func:`lifecycle.execute.outcome_of`). ``wait=False`` returns the
running task at once: ``await aengine.wait(task.id)`` or ``aengine.task(id)``
later (the 202 pattern).

Cancelling an awaiting call (a client that went away) never cancels the
task: it runs to its end and the database records it. The groups by noun
(``engine.hosts``, ``engine.feed`` ...) stay blocking: call them with
:func:`asyncio.to_thread`. One :class:`lifecycle.Engine`, and so one
AsyncEngine, is safe to share between every request of the application.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, Unpack

from lifecycle import validation
from lifecycle.engine import CallOptions, Engine
from lifecycle.errors import InvalidInput
from lifecycle.execute import outcome_of
from lifecycle.records import Cause, Task
from lifecycle.states import VmState
from lifecycle.waiting import Watch, ended, left_behind

if TYPE_CHECKING:
    from lifecycle.audit import AuditEntry
    from lifecycle.records import Flavor, Instance, Migration, TaskStep
    from lifecycle.recovery import Recovered

__all__ = ["AsyncEngine"]

P = ParamSpec("P")
R = TypeVar("R")

_admitted: contextvars.ContextVar[bool] = contextvars.ContextVar("lifecycle_aio_admitted", default=False)
"""Whether the running code is inside a call the AsyncEngine let in: its further reads go on after :meth:`aclose`."""


class AsyncEngine:
    """An :class:`lifecycle.Engine` for ``async`` code; see the module docstring.

    ``async with AsyncEngine(engine) as aengine`` (or :meth:`aclose`) shuts its
    threads down at the end; the engine stays open, its owner closes it.
    """

    def __init__(self, engine: Engine, *, threads: int | None = None) -> None:
        if not isinstance(engine, Engine):
            raise InvalidInput(f"engine must be a lifecycle.Engine, got {type(engine).__name__}")
        size = engine.settings.workers if threads is None else validation.count("threads", threads, low=1, high=1024)
        self.engine = engine
        """The blocking engine underneath (its groups: ``aengine.engine.hosts`` ...)."""
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="lifecycle-aio")
        self._closed = False

    async def aclose(self) -> None:
        """Refuse new calls, wait for those on the AsyncEngine's threads, then stop them (the engine stays open).

        A call awaited when it closes ends as it would have (an operation
        awaiting its task reads it on the loop's default executor); a call
        made after is refused (:class:`InvalidInput`). Closing twice is harmless.
        """
        self._closed = True  # on the loop's thread, before any await: no call admitted later uses the pool
        await asyncio.to_thread(self._threads.shutdown)

    def _admit(self) -> contextvars.Token[bool]:
        """Let a call in (or one made within a call already admitted); refuse a new one once closed."""
        if self._closed and not _admitted.get():
            raise InvalidInput("the AsyncEngine is closed: make a new one (the engine itself may still be open)")
        return _admitted.set(True)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def _call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a blocking engine call on the AsyncEngine's threads, in the caller's context (its bound log ids)."""
        token = self._admit()
        try:
            context = contextvars.copy_context()

            def call() -> R:
                return context.run(fn, *args, **kwargs)

            threads = None if self._closed else self._threads  # closed: an admitted call ends on the default executor
            return await asyncio.get_running_loop().run_in_executor(threads, call)
        finally:
            _admitted.reset(token)

    async def _start(self, fn: Callable[..., Task], /, *args: Any, wait: bool = True, **kwargs: Any) -> Task:
        """Start a task on the threads (``wait=False``), then await its end unless ``wait`` is False."""
        if not isinstance(wait, bool):
            raise InvalidInput(f"wait must be True or False, got {wait!r}")
        token = self._admit()
        try:
            task = await self._call(fn, *args, wait=False, **kwargs)
            # a repeat of a call whose owner died is not waited for, as Engine's own repeat does not
            return await self._await_end(Watch(task.id, None), abandoned_ends=True) if wait else task
        finally:
            _admitted.reset(token)

    async def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """Await the end of task ``task_id``: what :meth:`lifecycle.Engine.wait` returns or raises, awaited."""
        watch = Watch(task_id, timeout)
        token = self._admit()
        try:
            return await self._await_end(watch)
        finally:
            _admitted.reset(token)

    async def _await_end(self, watch: Watch, *, abandoned_ends: bool = False) -> Task:
        """Read the watched task until it ended (woken by its end when it runs here); return its outcome.

        ``abandoned_ends``: give up on a task whose owner stopped renewing its lease (:func:`left_behind`).
        """
        started = time.monotonic()
        while True:
            task = await self._call(self.engine.task, watch.task_id)
            if ended(task):
                return outcome_of(task)
            left = left_behind(self.engine.runner, task, started) if abandoned_ends else None
            if left is not None:
                raise left
            future = self.engine.runner.future_of(task.id)
            if future is None or future.done():
                await asyncio.sleep(watch.pause(task))
            else:  # ours: woken by its end, then read again (it may have been taken over meanwhile)
                await _ended(future, watch.left(task))

    # -- reads ------------------------------------------------------------------------

    async def get(self, uuid: str) -> Instance:
        """Await :meth:`lifecycle.Engine.get`."""
        return await self._call(self.engine.get, uuid)

    async def list(
        self,
        host: str | None = None,
        *,
        vm_state: VmState | str | None = None,
        status: str | None = None,
        project_id: str | None = None,
        include_deleted: bool = False,
        limit: int | None = None,
        marker: str | None = None,
    ) -> builtins.list[Instance]:
        """Await :meth:`lifecycle.Engine.list`."""
        return await self._call(
            self.engine.list,
            host,
            vm_state=vm_state,
            status=status,
            project_id=project_id,
            include_deleted=include_deleted,
            limit=limit,
            marker=marker,
        )

    async def task(self, task_id: str) -> Task:
        """Await :meth:`lifecycle.Engine.task`."""
        return await self._call(self.engine.task, task_id)

    async def tasks(self, uuid: str) -> builtins.list[Task]:
        """Await :meth:`lifecycle.Engine.tasks`."""
        return await self._call(self.engine.tasks, uuid)

    async def migrations(self, host: str | None = None) -> builtins.list[Migration]:
        """Await :meth:`lifecycle.Engine.migrations`."""
        return await self._call(self.engine.migrations, host)

    async def migration(self, migration_id: str) -> Migration:
        """Await :meth:`lifecycle.Engine.migration`."""
        return await self._call(self.engine.migration, migration_id)

    async def steps(self, task_id: str) -> builtins.list[TaskStep]:
        """Await :meth:`lifecycle.Engine.steps`."""
        return await self._call(self.engine.steps, task_id)

    async def history(self, uuid: str) -> builtins.list[AuditEntry]:
        """Await :meth:`lifecycle.Engine.history`."""
        return await self._call(self.engine.history, uuid)

    async def recover(self, *, force: bool = False, owner: str | None = None) -> builtins.list[Recovered]:
        """Await :meth:`lifecycle.Engine.recover` (the recovered tasks run on the AsyncEngine's threads)."""
        return await self._call(self.engine.recover, force=force, owner=owner)

    async def waiting_for_lease(self) -> builtins.list[Task]:
        """Await :meth:`lifecycle.Engine.waiting_for_lease`."""
        return await self._call(self.engine.waiting_for_lease)

    # -- operations -------------------------------------------------------------

    async def create(
        self,
        name: str,
        *,
        flavor: Flavor,
        image: str,
        host: str | None = None,
        availability_zone: str | None = None,
        uuid: str | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        actor: str = "api",
        wait: bool = True,
        project_id: str | None = None,
        user_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Task:
        """Await :meth:`lifecycle.Engine.create`."""
        return await self._start(
            self.engine.create,
            name,
            flavor=flavor,
            image=image,
            host=host,
            availability_zone=availability_zone,
            uuid=uuid,
            request_id=request_id,
            idempotency_key=idempotency_key,
            actor=actor,
            wait=wait,
            project_id=project_id,
            user_id=user_id,
            metadata=metadata,
        )

    async def start(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.start`."""
        return await self._start(self.engine.start, uuid, **options)

    async def stop(self, uuid: str, *, timeout: float | None = None, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.stop`."""
        return await self._start(self.engine.stop, uuid, timeout=timeout, **options)

    async def reboot(self, uuid: str, *, hard: bool = False, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.reboot`."""
        return await self._start(self.engine.reboot, uuid, hard=hard, **options)

    async def pause(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.pause`."""
        return await self._start(self.engine.pause, uuid, **options)

    async def unpause(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.unpause`."""
        return await self._start(self.engine.unpause, uuid, **options)

    async def suspend(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.suspend`."""
        return await self._start(self.engine.suspend, uuid, **options)

    async def resume(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.resume`."""
        return await self._start(self.engine.resume, uuid, **options)

    async def rescue(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.rescue`."""
        return await self._start(self.engine.rescue, uuid, **options)

    async def unrescue(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.unrescue`."""
        return await self._start(self.engine.unrescue, uuid, **options)

    async def rebuild(self, uuid: str, *, image: str | None = None, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.rebuild`."""
        return await self._start(self.engine.rebuild, uuid, image=image, **options)

    async def resize(self, uuid: str, flavor: Flavor, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.resize`."""
        return await self._start(self.engine.resize, uuid, flavor, **options)

    async def migrate(self, uuid: str, *, host: str | None = None, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.migrate`."""
        return await self._start(self.engine.migrate, uuid, host=host, **options)

    async def confirm_resize(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.confirm_resize`."""
        return await self._start(self.engine.confirm_resize, uuid, **options)

    async def revert_resize(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.revert_resize`."""
        return await self._start(self.engine.revert_resize, uuid, **options)

    async def evacuate(self, uuid: str, *, host: str | None = None, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.evacuate`."""
        return await self._start(self.engine.evacuate, uuid, host=host, **options)

    async def shelve(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.shelve`."""
        return await self._start(self.engine.shelve, uuid, **options)

    async def shelve_offload(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.shelve_offload`."""
        return await self._start(self.engine.shelve_offload, uuid, **options)

    async def unshelve(self, uuid: str, *, host: str | None = None, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.unshelve`."""
        return await self._start(self.engine.unshelve, uuid, host=host, **options)

    async def delete(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.delete`."""
        return await self._start(self.engine.delete, uuid, **options)

    async def force_delete(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.force_delete`."""
        return await self._start(self.engine.force_delete, uuid, **options)

    async def soft_delete(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.soft_delete`."""
        return await self._start(self.engine.soft_delete, uuid, **options)

    async def restore(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Await :meth:`lifecycle.Engine.restore`."""
        return await self._start(self.engine.restore, uuid, **options)

    async def run(
        self,
        operation: str,
        uuid: str,
        *,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        actor: str = "api",
        cause: Cause = Cause.API,
        wait: bool = True,
        override_lock: bool = False,
    ) -> Task:
        """Await :meth:`lifecycle.Engine.run`."""
        return await self._start(
            self.engine.run,
            operation,
            uuid,
            params=params,
            request_id=request_id,
            idempotency_key=idempotency_key,
            actor=actor,
            cause=cause,
            wait=wait,
            override_lock=override_lock,
        )

    async def lock(self, uuid: str, *, reason: str, actor: str = "api") -> Instance:
        """Await :meth:`lifecycle.Engine.lock`."""
        return await self._call(self.engine.lock, uuid, reason=reason, actor=actor)

    async def unlock(self, uuid: str, *, actor: str = "api", override_lock: bool = False) -> Instance:
        """Await :meth:`lifecycle.Engine.unlock`."""
        return await self._call(self.engine.unlock, uuid, actor=actor, override_lock=override_lock)

    async def reset_state(
        self, uuid: str, *, reason: str, state: VmState = VmState.ERROR, actor: str = "admin"
    ) -> Instance:
        """Await :meth:`lifecycle.Engine.reset_state`."""
        return await self._call(self.engine.reset_state, uuid, reason=reason, state=state, actor=actor)


async def _ended(future: Future[Task], timeout: float | None) -> None:
    """Return when ``future`` is done or after ``timeout`` seconds, holding no thread meanwhile."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def wake(_: Future[Task]) -> None:
        with suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(done.set)

    future.add_done_callback(wake)
    with suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout)
