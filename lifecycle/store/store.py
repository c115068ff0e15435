"""The only place SQL lives: reads, and the compare-and-swap writes.

Every state write is one transaction holding a conditional UPDATE of the
instance on its expected (version, vm_state, task_state, task_id), the task and
step-log statements that go with it, and one audit row when any of the three
states changed. An UPDATE that matches no row raises: :class:`Preempted` when
the writer's own task was taken over, :class:`Conflict` otherwise.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from lifecycle.audit import AuditEntry, Why
from lifecycle.errors import (
    AlreadyExists,
    Conflict,
    Fenced,
    HostInUse,
    HostNotFound,
    ImageNotFound,
    InstanceNotFound,
    InvalidInput,
    Preempted,
    TaskNotFound,
)
from lifecycle.records import Cause, Flavor, Host, Image, Instance, Migration, Outcome, Task, TaskStep
from lifecycle.states import PowerState, TaskState, VmState
from lifecycle.store.db import aware, connect, now
from lifecycle.store.tables import (
    AuditRow,
    ClaimRow,
    ConsoleTokenRow,
    HostRow,
    ImageRow,
    InstanceRow,
    MigrationRow,
    TaskRow,
    TaskStepRow,
)
from lifecycle.sync import Recorded

__all__ = ["HostClaim", "Store"]

_I: sa.Table = InstanceRow.__table__  # type: ignore[attr-defined]
_T: sa.Table = TaskRow.__table__  # type: ignore[attr-defined]
_S: sa.Table = TaskStepRow.__table__  # type: ignore[attr-defined]
_A: sa.Table = AuditRow.__table__  # type: ignore[attr-defined]
_H: sa.Table = HostRow.__table__  # type: ignore[attr-defined]
_IM: sa.Table = ImageRow.__table__  # type: ignore[attr-defined]
_C: sa.Table = ConsoleTokenRow.__table__  # type: ignore[attr-defined]
_CL: sa.Table = ClaimRow.__table__  # type: ignore[attr-defined]
_M: sa.Table = MigrationRow.__table__  # type: ignore[attr-defined]

# Lookups for the sync read path, where an Enum(value) call per column per row shows in profiles.
_VM_STATES = {s.value: s for s in VmState}
_TASK_STATES = {t.value: t for t in TaskState}
_POWERS = {int(p): p for p in PowerState}


_RETRYABLE_SQLSTATES = {"40P01", "40001"}  # deadlock detected, serialization failure
_RETRIES = 5

F = TypeVar("F", bound=Callable[..., Any])


def _retry_on_deadlock(method: F) -> F:
    """Re-run a write transaction PostgreSQL aborted for a deadlock or serialization failure.

    Safe because every write is a compare-and-swap: if the other transaction
    committed first, the retry finds the row changed and raises Conflict.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(_RETRIES):
            try:
                return method(*args, **kwargs)
            except OperationalError as exc:
                if getattr(exc.orig, "sqlstate", None) not in _RETRYABLE_SQLSTATES or attempt == _RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


class HostClaim:
    """Exclusive ownership of one host by one process, until released or the process dies.

    PostgreSQL: a session advisory lock held on a dedicated connection (it
    goes away with the connection, so a dead daemon frees its hosts). SQLite:
    an flock on a file next to the database.
    """

    def __init__(self, host: str, release: Callable[[], None]) -> None:
        self.host = host
        self._release = release
        self.released = False

    def release(self) -> None:
        """Give the host up (idempotent)."""
        if not self.released:
            self.released = True
            self._release()


class Store:
    """Reads and compare-and-swap writes over one database."""

    def __init__(self, url: str, *, lease_seconds: float = 60.0) -> None:
        self.url = url
        self.engine = connect(url)
        self.lease = timedelta(seconds=lease_seconds)

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect().execution_options(readonly=True) as conn:
            yield conn

    # -- hosts and images -------------------------------------------------

    def add_host(self, name: str, driver_uri: str, instances_path: str, **fields: Any) -> Host:
        """Insert a host (resources, zone, capabilities... as keyword fields); AlreadyExists if taken."""
        values = {
            "name": name,
            "driver_uri": driver_uri,
            "instances_path": instances_path,
            "enabled": True,
            "created_at": now(),
        }
        for key in ("capabilities", "metrics"):
            if key in fields:
                fields[key] = json.dumps(fields[key], sort_keys=True)
        self._insert_unique(_H, values | fields, "host", name)
        return self.get_host(name)

    def get_host(self, name: str) -> Host:
        """Return the host named ``name`` or raise :class:`HostNotFound`."""
        with self._read() as conn:
            row = conn.execute(sa.select(_H).where(_H.c.name == name)).mappings().first()
            if row is None:
                raise HostNotFound(name, conn.execute(sa.select(_H.c.name)).scalars())
        return _host(row)

    def list_hosts(self) -> list[Host]:
        """Return every host, by name (one query: the scheduler's input)."""
        with self._read() as conn:
            rows = conn.execute(sa.select(_H).order_by(_H.c.name)).mappings().all()
        return [_host(r) for r in rows]

    def update_host(self, name: str, **values: Any) -> Host:
        """Change a host's settable fields (enabled, metrics, last_heartbeat...)."""
        if "metrics" in values:
            values["metrics"] = json.dumps(values["metrics"], sort_keys=True)
        with self.engine.begin() as conn:
            if conn.execute(sa.update(_H).where(_H.c.name == name).values(**values)).rowcount == 0:
                raise HostNotFound(name)
        return self.get_host(name)

    @_retry_on_deadlock
    def claim(
        self, uuid: str, host: str, vcpus: int, memory_mb: int, disk_gb: int, ratios: tuple[float, float, float]
    ) -> bool:
        """Reserve resources for an instance on a host within its allocation ratios, atomically.

        One conditional UPDATE adds the usage only if it still fits, so two
        engines can never overcommit a host; the claim row is written in the
        same transaction. A host whose resources are not tracked always fits.
        Returns False (nothing written) when it does not fit.
        """
        cpu_ratio, ram_ratio, disk_ratio = ratios

        def fits(
            total: sa.ColumnElement[Any], used: sa.ColumnElement[Any], want: int, ratio: float
        ) -> sa.ColumnElement[bool]:
            return sa.or_(total.is_(None), used + want <= total * ratio)

        query = (
            sa.update(_H)
            .where(
                _H.c.name == host,
                fits(_H.c.vcpus, _H.c.vcpus_used, vcpus, cpu_ratio),
                fits(_H.c.memory_mb, _H.c.memory_mb_used, memory_mb, ram_ratio),
                fits(_H.c.disk_gb, _H.c.disk_gb_used, disk_gb, disk_ratio),
            )
            .values(
                vcpus_used=_H.c.vcpus_used + vcpus,
                memory_mb_used=_H.c.memory_mb_used + memory_mb,
                disk_gb_used=_H.c.disk_gb_used + disk_gb,
            )
        )
        claim = {
            "instance_uuid": uuid,
            "host": host,
            "vcpus": vcpus,
            "memory_mb": memory_mb,
            "disk_gb": disk_gb,
            "created_at": now(),
        }
        with self.engine.begin() as conn:
            if conn.execute(query).rowcount != 1:
                return False
            conn.execute(sa.insert(_CL), claim)
        return True

    @_retry_on_deadlock
    def release_claims(self, uuid: str, host: str | None = None) -> int:
        """Give back what an instance holds (on one host, or everywhere); return how many claims."""
        where = [_CL.c.instance_uuid == uuid] + ([_CL.c.host == host] if host is not None else [])
        with self.engine.begin() as conn:
            claims = conn.execute(sa.select(_CL).where(*where)).mappings().all()
            for c in claims:
                conn.execute(
                    sa.update(_H)
                    .where(_H.c.name == c["host"])
                    .values(
                        vcpus_used=_H.c.vcpus_used - c["vcpus"],
                        memory_mb_used=_H.c.memory_mb_used - c["memory_mb"],
                        disk_gb_used=_H.c.disk_gb_used - c["disk_gb"],
                    )
                )
            conn.execute(sa.delete(_CL).where(*where))
        return len(claims)

    def claims_of(self, uuid: str) -> list[str]:
        """Return the hosts an instance holds claims on."""
        with self._read() as conn:
            return list(
                conn.execute(sa.select(_CL.c.host).where(_CL.c.instance_uuid == uuid).order_by(_CL.c.host)).scalars()
            )

    def add_image(
        self, name: str, path: str, disk_format: str, min_disk_gb: int = 0, properties: dict[str, str] | None = None
    ) -> Image:
        """Insert an image; :class:`AlreadyExists` if the name is taken."""
        values = {
            "name": name,
            "path": path,
            "disk_format": disk_format,
            "min_disk_gb": min_disk_gb,
            "created_at": now(),
            "properties": json.dumps(properties or {}, sort_keys=True),
        }
        self._insert_unique(_IM, values, "image", name)
        return self.get_image(name)

    def get_image(self, name: str) -> Image:
        """Return the image named ``name`` or raise :class:`ImageNotFound`."""
        with self._read() as conn:
            row = conn.execute(sa.select(_IM).where(_IM.c.name == name)).mappings().first()
            if row is None:
                raise ImageNotFound(name, conn.execute(sa.select(_IM.c.name)).scalars())
        return _image(row)

    def list_images(self) -> list[Image]:
        """Return every image, by name."""
        with self._read() as conn:
            rows = conn.execute(sa.select(_IM).order_by(_IM.c.name)).mappings().all()
        return [_image(r) for r in rows]

    def _insert_unique(self, table: sa.Table, values: dict[str, Any], kind: str, name: str) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(table), values)
        except IntegrityError as exc:
            with self._read() as conn:
                taken = conn.execute(sa.select(table.c.name).where(table.c.name == name)).first() is not None
            if taken:
                raise AlreadyExists(kind, name) from None
            # Another constraint refused the row: say which, in the database's own words.
            raise InvalidInput(f"cannot add {kind} {name!r}: {exc.orig}") from exc

    def remove_host(self, name: str, *, force: bool = False) -> list[str]:
        """Delete a host row; return the live instances a forced removal orphaned.

        Refused (:class:`HostInUse`) while live instances, claims or open moves
        use the host, unless ``force``: then each idle live instance there goes
        to error with no host (only delete is left for it: a local delete), its
        claims go, and an audit row says the guest may still exist. Instances
        with a running task are never orphaned: :class:`HostInUse` either way.
        Deleted instances forget the host (their history stays).
        """
        self.get_host(name)
        live = [i for i in self.list_instances(name) if i.vm_state is not VmState.DELETED]
        moving = [m.instance_uuid for m in self._open_migrations_touching(name)]
        if (live or moving) and not force:
            raise HostInUse(name, {i.uuid for i in live} | set(moving))
        busy = [i.uuid for i in live if i.task_id is not None] + moving
        if busy:
            raise HostInUse(name, busy)
        at = now()
        why = Why(
            actor="operator",
            cause=Cause.API,
            operation="remove_host",
            message=f"host {name} removed by force: the guest may still exist there",
        )
        with self.engine.begin() as conn:
            for i in live:
                after = replace(
                    i,
                    vm_state=VmState.ERROR,
                    power_state=PowerState.NOSTATE,
                    host=None,
                    version=i.version + 1,
                    updated_at=at,
                )
                self._cas(conn, i, after, None)
                self._audit(conn, i, after, why, always=True)
            conn.execute(sa.update(_I).where(_I.c.host == name).values(host=None))
            for claim in conn.execute(sa.select(_CL.c.instance_uuid).where(_CL.c.host == name)).scalars().all():
                conn.execute(sa.delete(_CL).where(_CL.c.instance_uuid == claim, _CL.c.host == name))
            conn.execute(sa.delete(_C).where(_C.c.host == name))
            conn.execute(sa.delete(_H).where(_H.c.name == name))
        return [i.uuid for i in live]

    def _open_migrations_touching(self, host: str) -> list[Migration]:
        query = sa.select(_M).where(
            sa.or_(_M.c.source_host == host, _M.c.dest_host == host),
            _M.c.status.not_in(("confirmed", "reverted", "error", "failed")),
        )
        with self._read() as conn:
            return [_migration(r) for r in conn.execute(query).mappings()]

    # -- instance and task reads -------------------------------------------

    def get_instance(self, uuid: str) -> Instance:
        """Return the instance (deleted ones included) or raise :class:`InstanceNotFound`."""
        with self._read() as conn:
            row = conn.execute(sa.select(_I).where(_I.c.uuid == uuid)).mappings().first()
        if row is None:
            raise InstanceNotFound(uuid)
        return _instance(row)

    def list_instances(self, host: str | None = None, *, include_deleted: bool = False) -> list[Instance]:
        """Return instances by creation time, optionally of one host."""
        query = sa.select(_I).order_by(_I.c.created_at, _I.c.uuid)
        if host is not None:
            query = query.where(_I.c.host == host)
        if not include_deleted:
            query = query.where(_I.c.vm_state != VmState.DELETED.value)
        with self._read() as conn:
            return [_instance(r) for r in conn.execute(query).mappings()]

    def get_task(self, task_id: str) -> Task:
        """Return the task with this id; :class:`TaskNotFound` if there is none."""
        with self._read() as conn:
            row = conn.execute(sa.select(_T).where(_T.c.id == task_id)).mappings().first()
        if row is None:
            raise TaskNotFound(task_id)
        return _task(row)

    def task_by_key(self, key: str) -> Task | None:
        """Return the task started with idempotency key ``key`` (keys are unique across instances), if any."""
        query = sa.select(_T).where(_T.c.idempotency_key == key)
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _task(row)

    def tasks_of(self, uuid: str) -> list[Task]:
        """Return every task of an instance, oldest first."""
        query = sa.select(_T).where(_T.c.instance_uuid == uuid).order_by(_T.c.started_at, _T.c.id)
        with self._read() as conn:
            return [_task(r) for r in conn.execute(query).mappings()]

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
                started_at=_at(r["started_at"]),
                finished_at=aware(r["finished_at"]),
                result=r["result"],
                detail=r["detail"],
            )
            for r in rows
        ]

    def history(self, uuid: str) -> list[AuditEntry]:
        """Return an instance's audit log, oldest first."""
        query = sa.select(_A).where(_A.c.instance_uuid == uuid).order_by(_A.c.id)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        return [AuditEntry(**{**r, "created_at": aware(r["created_at"])}) for r in rows]

    def recoverable_tasks(self, owner: str, *, force: bool = False) -> list[Task]:
        """Return running tasks whose lease has expired; with ``force``, also ``owner``'s live ones."""
        live_ok = (_T.c.owner == owner) if force else sa.false()
        query = (
            sa.select(_T)
            .where(_T.c.outcome == Outcome.RUNNING.value, sa.or_(_T.c.lease_expires_at < now(), live_ok))
            .order_by(_T.c.started_at)
        )
        with self._read() as conn:
            return [_task(r) for r in conn.execute(query).mappings()]

    def live_tasks(self) -> list[Task]:
        """Return running tasks whose lease is still live, soonest expiry first."""
        query = (
            sa.select(_T)
            .where(_T.c.outcome == Outcome.RUNNING.value, _T.c.lease_expires_at >= now())
            .order_by(_T.c.lease_expires_at)
        )
        with self._read() as conn:
            return [_task(r) for r in conn.execute(query).mappings()]

    def take_over(self, task_id: str, owner: str, *, force: bool = False) -> bool:
        """Make ``owner`` the owner of a running task whose lease expired, bumping its epoch; False if lost.

        With ``force``, a live lease held under ``owner``'s own name is taken
        too. The epoch fences the old worker: it stops before its next
        driver call (:meth:`fence`) and its writes fail.
        """
        at = now()
        live_ok = (_T.c.owner == owner) if force else sa.false()
        query = (
            sa.update(_T)
            .where(
                _T.c.id == task_id, _T.c.outcome == Outcome.RUNNING.value, sa.or_(_T.c.lease_expires_at < at, live_ok)
            )
            .values(owner=owner, lease_expires_at=at + self.lease, epoch=_T.c.epoch + 1)
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    def fence(self, task: Task) -> None:
        """Raise unless ``task`` is still running at its epoch: called before each driver call of a worker.

        :class:`Preempted` when another task took the instance over,
        :class:`Fenced` when recovery took this task over.
        """
        query = sa.select(_T.c.outcome, _T.c.preempted_by, _T.c.epoch).where(_T.c.id == task.id)
        with self._read() as conn:
            outcome, preempted_by, epoch = conn.execute(query).one()
        if epoch != task.epoch:
            raise Fenced(task.id, task.instance_uuid, task.epoch, epoch)
        if outcome == Outcome.PREEMPTED.value:
            raise Preempted(task.id, task.instance_uuid, preempted_by)

    def release_lease(self, task_id: str) -> None:
        """Say that a task's worker has ended (its lease ends now): a preemptor waiting on it goes on."""
        with self.engine.begin() as conn:
            conn.execute(sa.update(_T).where(_T.c.id == task_id).values(lease_expires_at=now()))

    def worker_alive(self, task_id: str) -> bool:
        """Whether the task's worker may still be inside a driver call (its lease has not ended)."""
        query = sa.select(_T.c.lease_expires_at).where(_T.c.id == task_id)
        with self._read() as conn:
            lease = conn.execute(query).scalar_one()
        return _at(lease) > now()

    def mark_done(self, task_id: str, seq: int, name: str) -> None:
        """Record that a non-repeatable step of a task completed (recovery will not run it again)."""
        at = now()
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(_S),
                {"task_id": task_id, "seq": seq, "name": name, "started_at": at, "finished_at": at, "result": "ok"},
            )

    def end_orphan(self, task: Task, reason: str) -> None:
        """Close a running task that no longer owns its instance, without touching the instance."""
        at = now()
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(_T)
                .where(_T.c.id == task.id, _T.c.outcome == Outcome.RUNNING.value)
                .values(outcome=Outcome.FAILED.value, finished_at=at, error=reason)
            )
            self._close_steps(conn, task.id, at, "failed", reason)

    def renew_leases(self, owner: str, task_ids: list[str]) -> int:
        """Push the lease of these tasks of ``owner`` forward while their workers live; return how many.

        A preempted task's lease is renewed too while its worker is still in
        a driver call: that is how a preemptor knows the call has not ended.
        """
        if not task_ids:
            return 0
        query = (
            sa.update(_T).where(_T.c.owner == owner, _T.c.id.in_(task_ids)).values(lease_expires_at=now() + self.lease)
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount

    # -- host ownership -----------------------------------------------------------

    def try_claim_host(self, host: str) -> HostClaim | None:
        """Take exclusive ownership of ``host`` if nobody holds it; None if someone does."""
        digest = hashlib.sha1(f"lifecycle-host:{host}".encode()).digest()
        if self.engine.dialect.name == "postgresql":
            key = int.from_bytes(digest[:8], "big", signed=True)
            conn = self.engine.connect()
            got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            conn.commit()
            if not got:
                conn.close()
                return None

            def unlock() -> None:
                with suppress(Exception):  # a dead connection has released the lock already
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
                conn.close()

            return HostClaim(host, unlock)
        database = self.engine.url.database or ""
        path = f"{database or tempfile.gettempdir() + '/lifecycle-memory'}.host-{digest.hex()[:16]}.lock"
        handle = open(path, "a")  # noqa: SIM115 - held open for the claim's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return HostClaim(host, handle.close)

    # -- migrations ---------------------------------------------------------------

    def add_migration(self, migration: Migration) -> None:
        """Insert a migration record."""
        with self.engine.begin() as conn:
            conn.execute(sa.insert(_M), _migration_values(migration))

    def update_migration(self, migration_id: str, **values: Any) -> Migration:
        """Change a migration's status (and dest host, source disk, finished_at...)."""
        values["updated_at"] = now()
        with self.engine.begin() as conn:
            conn.execute(sa.update(_M).where(_M.c.id == migration_id).values(**values))
        return self.get_migration(migration_id)

    def get_migration(self, migration_id: str) -> Migration:
        """Return a migration by id."""
        with self._read() as conn:
            return _migration(conn.execute(sa.select(_M).where(_M.c.id == migration_id)).mappings().one())

    def open_migration(self, uuid: str) -> Migration | None:
        """Return the instance's newest migration not yet confirmed, reverted or failed."""
        query = (
            sa.select(_M)
            .where(_M.c.instance_uuid == uuid, _M.c.status.not_in(("confirmed", "reverted", "error")))
            .order_by(_M.c.created_at.desc())
        )
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _migration(row)

    def migrations_finished_before(self, moment: datetime) -> list[Migration]:
        """Return finished migrations whose finish is older than ``moment`` (the confirm window)."""
        query = sa.select(_M).where(_M.c.status == "finished", _M.c.finished_at < moment).order_by(_M.c.finished_at)
        with self._read() as conn:
            return [_migration(r) for r in conn.execute(query).mappings()]

    # -- console tokens ---------------------------------------------------------

    def add_console_token(
        self, token_hash: str, instance: Instance, console_host: str, port: int, expires_at: datetime
    ) -> None:
        """Store a console token's hash for ``instance`` on its current host."""
        values = {
            "token_hash": token_hash,
            "instance_uuid": instance.uuid,
            "host": instance.host,
            "console_host": console_host,
            "console_port": port,
            "created_at": now(),
            "expires_at": expires_at,
        }
        with self.engine.begin() as conn:
            conn.execute(sa.insert(_C), values)

    def console_token(self, token_hash: str) -> dict[str, Any] | None:
        """Return a live (unrevoked, unexpired) token's row, or None."""
        query = sa.select(_C).where(_C.c.token_hash == token_hash, _C.c.revoked_at.is_(None))
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        if row is None or _at(row["expires_at"]) <= now():
            return None
        return dict(row)

    def revoke_console_tokens(self, uuid: str) -> int:
        """Revoke every live console token of an instance; return how many."""
        query = sa.update(_C).where(_C.c.instance_uuid == uuid, _C.c.revoked_at.is_(None)).values(revoked_at=now())
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount

    # -- compare-and-swap writes --------------------------------------------

    @_retry_on_deadlock
    def create(self, instance: Instance, task: Task, step: str, why: Why) -> Instance:
        """Insert a new instance already owned by ``task``, with its first step and audit row."""
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(_I), _instance_values(instance))
                conn.execute(sa.insert(_T), _task_values(task))
                self._open_step(conn, task.id, 1, step)
                self._audit(conn, None, instance, why)
        except IntegrityError:
            raise AlreadyExists("instance", instance.uuid) from None
        return instance

    @_retry_on_deadlock
    def begin(self, expected: Instance, task: Task, task_state: TaskState, why: Why, preempt: Task | None) -> Instance:
        """Start ``task`` on ``expected``: task row, first task_state, step and audit row.

        With ``preempt``, that running task is marked preempted by this one and
        its open step closed, in the same transaction.
        """
        after = replace(
            expected, task_state=task_state, task_id=task.id, version=expected.version + 1, updated_at=task.started_at
        )
        try:
            with self.engine.begin() as conn:
                # Lock order: the instance row first, then task rows, in every write
                # (a worker's finish does the same), so PostgreSQL never deadlocks on them.
                self._cas(conn, expected, after, None)
                if preempt is not None:
                    self._preempt(conn, preempt, task)
                conn.execute(sa.insert(_T), _task_values(task))
                self._open_step(conn, task.id, 1, task_state.value)
                # Always audited: a takeover (hard reboot over hard reboot) may change no state, only the task.
                self._audit(conn, expected, after, why, always=True)
        except IntegrityError:
            # The one-running-task index: another task started on this instance first.
            raise Conflict(expected.uuid, _expect(expected), self._actual(expected.uuid)) from None
        return after

    @_retry_on_deadlock
    def advance(
        self, expected: Instance, task: Task, seq: int, task_state: TaskState, why: Why, **fields: Any
    ) -> Instance:
        """Move ``task`` to its next task_state (with ``fields``, e.g. host); close step ``seq - 1``, open ``seq``."""
        at = now()
        after = replace(expected, task_state=task_state, version=expected.version + 1, updated_at=at, **fields)
        with self.engine.begin() as conn:
            self._cas(conn, expected, after, task)
            self._close_steps(conn, task.id, at, "ok" if why.message is None else "retried", why.message)
            self._open_step(conn, task.id, seq, task_state.value)
            conn.execute(sa.update(_T).where(_T.c.id == task.id).values(lease_expires_at=at + self.lease))
            self._audit(conn, expected, after, why)
        return after

    @_retry_on_deadlock
    def finish(
        self,
        expected: Instance,
        task: Task,
        *,
        vm_state: VmState,
        power_state: PowerState,
        outcome: Outcome,
        why: Why,
        error: str | None = None,
        traceback: str | None = None,
        **fields: Any,
    ) -> Instance:
        """End ``task``: final states, task idle, task row closed, step closed, audit row."""
        at = now()
        after = replace(
            expected,
            vm_state=vm_state,
            task_state=None,
            task_id=None,
            power_state=power_state,
            version=expected.version + 1,
            updated_at=at,
            **fields,
        )
        step_result = "ok" if outcome is Outcome.SUCCEEDED else "failed"
        with self.engine.begin() as conn:
            self._cas(conn, expected, after, task)
            self._close_steps(conn, task.id, at, step_result, error)
            conn.execute(
                sa.update(_T)
                .where(_T.c.id == task.id)
                .values(outcome=outcome.value, finished_at=at, error=error, traceback=traceback, lease_expires_at=at)
            )
            self._audit(conn, expected, after, why)
        return after

    @_retry_on_deadlock
    def set_power(self, expected: Instance, power_state: PowerState, why: Why) -> Instance:
        """Record a new power_state on an idle instance (a sync write)."""
        after = replace(expected, power_state=power_state, version=expected.version + 1, updated_at=now())
        with self.engine.begin() as conn:
            self._cas(conn, expected, after, None)
            self._audit(conn, expected, after, why)
        return after

    def host_sync_rows(self, host: str, chunk: int = 1000) -> Iterator[list[tuple[str, int, Recorded]]]:
        """Yield (uuid, version, recorded states) of a host's live instances in chunks (keyset paging).

        Only the columns a sync decision needs are read, so a pass over a big
        host costs one light query per chunk; full rows are loaded only for
        the few instances a pass acts on (:meth:`instances_by_uuid`).
        """
        columns = (
            _I.c.uuid,
            _I.c.version,
            _I.c.vm_state,
            _I.c.task_state,
            _I.c.power_state,
            _I.c.updated_at,
            _I.c.missing_count,
        )
        after = ""
        while True:
            query = (
                sa.select(*columns)
                .where(_I.c.host == host, _I.c.vm_state != VmState.DELETED.value, _I.c.uuid > after)
                .order_by(_I.c.uuid)
                .limit(chunk)
            )
            with self._read() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            yield [
                (
                    uuid,
                    version,
                    Recorded(
                        _VM_STATES[vm],
                        None if task is None else _TASK_STATES[task],
                        _POWERS[power],
                        _at(changed),
                        missing,
                    ),
                )
                for uuid, version, vm, task, power, changed, missing in rows
            ]
            after = rows[-1][0]

    def instances_by_uuid(self, uuids: list[str]) -> dict[str, Instance]:
        """Return full rows for ``uuids`` (missing ones are left out), in one query."""
        with self._read() as conn:
            rows = conn.execute(sa.select(_I).where(_I.c.uuid.in_(uuids))).mappings().all()
        return {r["uuid"]: _instance(r) for r in rows}

    @_retry_on_deadlock
    def set_power_many(self, changes: list[tuple[Instance, PowerState, Why]]) -> list[Instance | None]:
        """Record new power states on idle instances in one transaction.

        Each is its own compare-and-swap with its own audit row; one that lost
        its race is skipped (None in the result), never retried or forced.
        """
        results: list[Instance | None] = []
        at = now()
        with self.engine.begin() as conn:
            for expected, power, why in changes:
                after = replace(
                    expected, power_state=power, version=expected.version + 1, updated_at=at, missing_count=0
                )
                try:
                    self._cas(conn, expected, after, None)
                except Conflict:
                    results.append(None)
                    continue
                self._audit(conn, expected, after, why)
                results.append(after)
        return results

    def set_missing_counts(self, counts: list[tuple[str, int, int]]) -> None:
        """Store (uuid, expected version, count) missing counts; bookkeeping: no version bump, no audit row."""
        with self.engine.begin() as conn:
            for uuid, version, count in counts:
                conn.execute(
                    sa.update(_I).where(_I.c.uuid == uuid, _I.c.version == version).values(missing_count=count)
                )

    def note(self, instance: Instance, why: Why) -> None:
        """Write an audit row that changes no state (something done on the hypervisor for this instance)."""
        with self.engine.begin() as conn:
            self._audit(conn, instance, instance, why, always=True)

    @_retry_on_deadlock
    def mark_error(self, expected: Instance, power_state: PowerState, why: Why) -> Instance:
        """Set vm_state error on an idle instance (a sync rule), with its audit row."""
        after = replace(
            expected, vm_state=VmState.ERROR, power_state=power_state, version=expected.version + 1, updated_at=now()
        )
        with self.engine.begin() as conn:
            self._cas(conn, expected, after, None)
            self._audit(conn, expected, after, why)
        return after

    def close_step(self, task_id: str, result: str, detail: str | None) -> None:
        """Close a task's open step without touching the instance (a preempted worker)."""
        with self.engine.begin() as conn:
            self._close_steps(conn, task_id, now(), result, detail)

    def _cas(self, conn: sa.Connection, expected: Instance, after: Instance, task: Task | None) -> None:
        query = (
            sa.update(_I)
            .where(
                _I.c.uuid == expected.uuid,
                _I.c.version == expected.version,
                _I.c.vm_state == expected.vm_state.value,
                _I.c.task_state.is_not_distinct_from(_value(expected.task_state)),
                _I.c.task_id.is_not_distinct_from(expected.task_id),
            )
            .values(_changed(expected, after))
        )
        if conn.execute(query).rowcount == 1:
            return
        if task is not None:
            outcome, preempted_by, epoch = conn.execute(
                sa.select(_T.c.outcome, _T.c.preempted_by, _T.c.epoch).where(_T.c.id == task.id)
            ).one()
            if epoch != task.epoch:
                raise Fenced(task.id, expected.uuid, task.epoch, epoch)
            if outcome == Outcome.PREEMPTED.value:
                raise Preempted(task.id, expected.uuid, preempted_by)
        raise Conflict(expected.uuid, _expect(expected), self._actual(expected.uuid, conn))

    def _actual(self, uuid: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        query = sa.select(_I.c.version, _I.c.vm_state, _I.c.task_state, _I.c.task_id).where(_I.c.uuid == uuid)
        if conn is not None:
            row = conn.execute(query).mappings().first()
        else:
            with self._read() as reader:
                row = reader.execute(query).mappings().first()
        return None if row is None else dict(row)

    def _preempt(self, conn: sa.Connection, old: Task, new: Task) -> None:
        conn.execute(
            sa.update(_T)
            .where(_T.c.id == old.id, _T.c.outcome == Outcome.RUNNING.value)
            .values(outcome=Outcome.PREEMPTED.value, preempted_by=new.id, finished_at=new.started_at)
        )
        self._close_steps(conn, old.id, new.started_at, "preempted", f"preempted by {new.operation} task {new.id}")

    @staticmethod
    def _open_step(conn: sa.Connection, task_id: str, seq: int, name: str) -> None:
        conn.execute(sa.insert(_S), {"task_id": task_id, "seq": seq, "name": name, "started_at": now()})

    @staticmethod
    def _close_steps(conn: sa.Connection, task_id: str, at: datetime, result: str, detail: str | None) -> None:
        conn.execute(
            sa.update(_S)
            .where(_S.c.task_id == task_id, _S.c.finished_at.is_(None))
            .values(finished_at=at, result=result, detail=detail)
        )

    @staticmethod
    def _audit(
        conn: sa.Connection, before: Instance | None, after: Instance, why: Why, *, always: bool = False
    ) -> None:
        if before is not None and before.host != after.host and why.message is None:
            why = replace(why, message=f"host {before.host or 'none'} -> {after.host or 'none'}")
        if (
            not always
            and before is not None
            and (before.vm_state, before.task_state, before.power_state)
            == (
                after.vm_state,
                after.task_state,
                after.power_state,
            )
        ):
            return
        conn.execute(
            sa.insert(_A),
            {
                "instance_uuid": after.uuid,
                "task_id": why.task_id,
                "request_id": why.request_id,
                "actor": why.actor,
                "cause": why.cause.value,
                "operation": why.operation,
                "rule": why.rule,
                "from_vm_state": None if before is None else before.vm_state.value,
                "to_vm_state": after.vm_state.value,
                "from_task_state": None if before is None else _value(before.task_state),
                "to_task_state": _value(after.task_state),
                "from_power_state": None if before is None else int(before.power_state),
                "to_power_state": int(after.power_state),
                "message": why.message,
                "created_at": after.updated_at,
            },
        )


def _value(state: TaskState | VmState | None) -> str | None:
    return None if state is None else state.value


def _expect(instance: Instance) -> dict[str, Any]:
    return {
        "version": instance.version,
        "vm_state": instance.vm_state.value,
        "task_state": _value(instance.task_state),
        "task_id": instance.task_id,
    }


_WRITABLE = (
    "vm_state",
    "task_state",
    "power_state",
    "task_id",
    "previous_vm_state",
    "version",
    "launched_at",
    "updated_at",
    "deleted_at",
    "host",
    "image",
    "missing_count",
)


def _changed(before: Instance, after: Instance) -> dict[str, Any]:
    values = _instance_values(after)
    changed = {k: values[k] for k in _WRITABLE if getattr(before, k) != getattr(after, k) or k == "version"}
    if before.flavor != after.flavor:  # a resize finishing or reverting
        changed |= {k: values[k] for k in ("flavor_name", "vcpus", "memory_mb", "root_gb")}
    return changed


def _instance_values(i: Instance) -> dict[str, Any]:
    return {
        "uuid": i.uuid,
        "name": i.name,
        "host": i.host,
        "flavor_name": i.flavor.name,
        "vcpus": i.flavor.vcpus,
        "memory_mb": i.flavor.memory_mb,
        "root_gb": i.flavor.root_gb,
        "image": i.image,
        "vm_state": i.vm_state.value,
        "task_state": _value(i.task_state),
        "power_state": int(i.power_state),
        "task_id": i.task_id,
        "previous_vm_state": _value(i.previous_vm_state),
        "version": i.version,
        "launched_at": i.launched_at,
        "created_at": i.created_at,
        "updated_at": i.updated_at,
        "deleted_at": i.deleted_at,
        "missing_count": i.missing_count,
    }


def _task_values(t: Task) -> dict[str, Any]:
    return {
        "id": t.id,
        "instance_uuid": t.instance_uuid,
        "operation": t.operation,
        "request_id": t.request_id,
        "idempotency_key": t.idempotency_key,
        "actor": t.actor,
        "cause": t.cause.value,
        "params": json.dumps(t.params, sort_keys=True),
        "outcome": t.outcome.value,
        "preempted_by": t.preempted_by,
        "owner": t.owner,
        "lease_expires_at": t.lease_expires_at,
        "started_at": t.started_at,
        "finished_at": t.finished_at,
        "error": t.error,
        "traceback": t.traceback,
        "epoch": t.epoch,
    }


def _at(value: datetime) -> datetime:
    result = aware(value)
    assert result is not None
    return result


def _instance(r: sa.RowMapping) -> Instance:
    task_state = r["task_state"]
    previous = r["previous_vm_state"]
    return Instance(
        uuid=r["uuid"],
        name=r["name"],
        host=r["host"],
        flavor=Flavor(vcpus=r["vcpus"], memory_mb=r["memory_mb"], root_gb=r["root_gb"], name=r["flavor_name"]),
        image=r["image"],
        vm_state=VmState(r["vm_state"]),
        task_state=None if task_state is None else TaskState(task_state),
        power_state=PowerState(r["power_state"]),
        task_id=r["task_id"],
        previous_vm_state=None if previous is None else VmState(previous),
        version=r["version"],
        launched_at=aware(r["launched_at"]),
        created_at=_at(r["created_at"]),
        updated_at=_at(r["updated_at"]),
        deleted_at=aware(r["deleted_at"]),
        missing_count=r["missing_count"],
    )


def _flavor_json(f: Flavor) -> str:
    return json.dumps({"name": f.name, "vcpus": f.vcpus, "memory_mb": f.memory_mb, "root_gb": f.root_gb})


def _migration_values(m: Migration) -> dict[str, Any]:
    return {
        "id": m.id,
        "instance_uuid": m.instance_uuid,
        "task_id": m.task_id,
        "kind": m.kind,
        "source_host": m.source_host,
        "dest_host": m.dest_host,
        "old_flavor": _flavor_json(m.old_flavor),
        "new_flavor": _flavor_json(m.new_flavor),
        "status": m.status,
        "previous_vm_state": m.previous_vm_state.value,
        "source_disk": m.source_disk,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "finished_at": m.finished_at,
    }


def _migration(r: sa.RowMapping) -> Migration:
    return Migration(
        id=r["id"],
        instance_uuid=r["instance_uuid"],
        task_id=r["task_id"],
        kind=r["kind"],
        source_host=r["source_host"],
        dest_host=r["dest_host"],
        old_flavor=Flavor(**json.loads(r["old_flavor"])),
        new_flavor=Flavor(**json.loads(r["new_flavor"])),
        status=r["status"],
        previous_vm_state=VmState(r["previous_vm_state"]),
        source_disk=r["source_disk"],
        created_at=_at(r["created_at"]),
        updated_at=_at(r["updated_at"]),
        finished_at=aware(r["finished_at"]),
    )


def _host(r: sa.RowMapping) -> Host:
    values = dict(r)
    values["created_at"] = _at(values["created_at"])
    values["last_heartbeat"] = aware(values["last_heartbeat"])
    values["capabilities"] = json.loads(values["capabilities"])
    values["metrics"] = json.loads(values["metrics"])
    return Host(**values)


def _image(r: sa.RowMapping) -> Image:
    return Image(**{**r, "created_at": _at(r["created_at"]), "properties": json.loads(r["properties"])})


def _task(r: sa.RowMapping) -> Task:
    return Task(
        id=r["id"],
        instance_uuid=r["instance_uuid"],
        operation=r["operation"],
        request_id=r["request_id"],
        idempotency_key=r["idempotency_key"],
        actor=r["actor"],
        cause=Cause(r["cause"]),
        params=json.loads(r["params"]),
        outcome=Outcome(r["outcome"]),
        preempted_by=r["preempted_by"],
        owner=r["owner"],
        lease_expires_at=_at(r["lease_expires_at"]),
        started_at=_at(r["started_at"]),
        finished_at=aware(r["finished_at"]),
        error=r["error"],
        traceback=r["traceback"],
        epoch=r["epoch"],
    )
