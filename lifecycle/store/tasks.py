"""Tasks: reads, the step log, leases, takeover by recovery and the fencing of old workers."""

from __future__ import annotations

import sqlalchemy as sa

from lifecycle.errors import Fenced, Preempted, TaskNotFound
from lifecycle.records import Outcome, Task, TaskStep
from lifecycle.store._base import StoreBase
from lifecycle.store._cas import TASK_STATUS, close_steps
from lifecycle.store._rows import STEPS, TASKS, stamp, task_from
from lifecycle.store.db import aware

__all__ = ["Tasks"]

_T, _S = TASKS, STEPS


class Tasks(StoreBase):
    """Task rows and step rows."""

    def get(self, task_id: str) -> Task:
        """Return the task with this id; :class:`TaskNotFound` if there is none."""
        with self._read() as conn:
            row = conn.execute(sa.select(_T).where(_T.c.id == task_id)).mappings().first()
        if row is None:
            raise TaskNotFound(task_id)
        return task_from(row)

    def by_key(self, key: str) -> Task | None:
        """Return the task started with idempotency key ``key`` (keys are unique across instances), if any."""
        query = sa.select(_T).where(_T.c.idempotency_key == key)
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else task_from(row)

    def of(self, uuid: str) -> list[Task]:
        """Return every task of an instance, oldest first."""
        query = sa.select(_T).where(_T.c.instance_uuid == uuid).order_by(_T.c.started_at, _T.c.id)
        with self._read() as conn:
            return [task_from(r) for r in conn.execute(query).mappings()]

    def steps(self, task_id: str) -> list[TaskStep]:
        """Return a task's step log in order."""
        query = sa.select(_S).where(_S.c.task_id == task_id).order_by(_S.c.seq)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            TaskStep(
                task_id=r["task_id"],
                seq=r["seq"],
                name=r["name"],
                started_at=stamp(r["started_at"]),
                finished_at=aware(r["finished_at"]),
                result=r["result"],
                detail=r["detail"],
                bytes_done=r["bytes_done"],
                bytes_total=r["bytes_total"],
            )
            for r in rows
        ]

    def recoverable(self, owner: str, *, force: bool = False) -> list[Task]:
        """Return running tasks whose lease has expired; with ``force``, also ``owner``'s live ones."""
        live_ok = (_T.c.owner == owner) if force else sa.false()
        query = (
            sa.select(_T)
            .where(_T.c.outcome == Outcome.RUNNING.value, sa.or_(_T.c.lease_expires_at < self.clock.now(), live_ok))
            .order_by(_T.c.started_at)
        )
        with self._read() as conn:
            return [task_from(r) for r in conn.execute(query).mappings()]

    def live(self) -> list[Task]:
        """Return running tasks whose lease is still live, soonest expiry first."""
        query = (
            sa.select(_T)
            .where(_T.c.outcome == Outcome.RUNNING.value, _T.c.lease_expires_at >= self.clock.now())
            .order_by(_T.c.lease_expires_at)
        )
        with self._read() as conn:
            return [task_from(r) for r in conn.execute(query).mappings()]

    def take_over(self, task: Task, owner: str, *, force: bool = False, of_owner: str | None = None) -> Task | None:
        """Make ``owner`` the owner of ``task`` as read, bumping its epoch; return it taken over, or None if lost.

        A compare-and-swap on the epoch ``task`` was read at: the task must
        still be running at that epoch, with an expired lease (with ``force``,
        a live lease held under ``of_owner``'s name, by default ``owner``'s, is taken too). Of two
        recoveries that read the same epoch, even under one owner name, one
        wins and the other gets None; a read made stale by any takeover since
        takes nothing. The new epoch fences the old worker: it stops before
        its next driver call (:meth:`fence`) and its writes fail.
        """
        at = self.clock.now()
        live_ok = (_T.c.owner == (of_owner or owner)) if force else sa.false()
        query = (
            sa.update(_T)
            .where(
                _T.c.id == task.id,
                _T.c.epoch == task.epoch,
                _T.c.outcome == Outcome.RUNNING.value,
                sa.or_(_T.c.lease_expires_at < at, live_ok),
            )
            .values(owner=owner, lease_expires_at=at + self.lease, epoch=_T.c.epoch + 1)
            .returning(*_T.c)
        )
        with self.engine.begin() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else task_from(row)

    def fence(self, task: Task) -> None:
        """Raise unless ``task`` is still running at its epoch: called before each driver call of a worker.

        :class:`Preempted` when another task took the instance over,
        :class:`Fenced` when recovery took this task over.
        """
        with self._read() as conn:
            outcome, preempted_by, epoch = conn.execute(TASK_STATUS, {"x_id": task.id}).one()
        if epoch != task.epoch:
            raise Fenced(task.id, task.instance_uuid, task.epoch, epoch)
        if outcome == Outcome.PREEMPTED.value:
            raise Preempted(task.id, task.instance_uuid, preempted_by)

    def record_progress(self, task: Task, done: int, total: int) -> None:
        """Write how far the open step's disk copy got, then raise as :meth:`fence` when the task is no longer ours."""
        query = sa.update(_S).where(_S.c.task_id == task.id, _S.c.finished_at.is_(None))
        with self.engine.begin() as conn:
            conn.execute(query.values(bytes_done=done, bytes_total=total))
        self.fence(task)

    def release_lease(self, task_id: str) -> None:
        """Say that a task's worker has ended (its lease ends now): a preemptor waiting on it goes on."""
        with self.engine.begin() as conn:
            conn.execute(sa.update(_T).where(_T.c.id == task_id).values(lease_expires_at=self.clock.now()))

    def worker_alive(self, task_id: str) -> bool:
        """Whether the task's worker may still be inside a driver call (its lease has not ended)."""
        query = sa.select(_T.c.lease_expires_at).where(_T.c.id == task_id)
        with self._read() as conn:
            lease = conn.execute(query).scalar_one()
        return stamp(lease) > self.clock.now()

    def open_step(self, task_id: str, seq: int, name: str, detail: str) -> None:
        """Record a step of a task that is under way beside its task_state step (a build waiting for its slot)."""
        values = {"task_id": task_id, "seq": seq, "name": name, "started_at": self.clock.now(), "detail": detail}
        with self.engine.begin() as conn:
            conn.execute(sa.insert(_S), values)

    def end_step(self, task_id: str, seq: int) -> None:
        """Close the step ``seq`` of a task opened by :meth:`open_step` (if nothing closed it meanwhile)."""
        query = sa.update(_S).where(_S.c.task_id == task_id, _S.c.seq == seq, _S.c.finished_at.is_(None))
        with self.engine.begin() as conn:
            conn.execute(query.values(finished_at=self.clock.now(), result="ok"))

    def mark_done(self, task_id: str, seq: int, name: str) -> None:
        """Record that a non-repeatable step of a task completed (recovery will not run it again)."""
        at = self.clock.now()
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(_S),
                {"task_id": task_id, "seq": seq, "name": name, "started_at": at, "finished_at": at, "result": "ok"},
            )

    def end_orphan(self, task: Task, reason: str) -> None:
        """Close a running task that no longer owns its instance, without touching the instance."""
        at = self.clock.now()
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(_T)
                .where(_T.c.id == task.id, _T.c.outcome == Outcome.RUNNING.value)
                .values(outcome=Outcome.FAILED.value, finished_at=at, error=reason)
            )
            close_steps(conn, task.id, at, "failed", reason)

    def renew_leases(self, owner: str, task_ids: list[str]) -> int:
        """Push the lease of these tasks of ``owner`` forward while their workers live; return how many.

        A preempted task's lease is renewed too while its worker is still in
        a driver call: that is how a preemptor knows the call has not ended.
        """
        if not task_ids:
            return 0
        query = (
            sa.update(_T)
            .where(_T.c.owner == owner, _T.c.id.in_(task_ids))
            .values(lease_expires_at=self.clock.now() + self.lease)
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount
