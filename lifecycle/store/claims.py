"""Resource claims: what each instance holds on each host, kept within the host's allocation ratios."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa

from lifecycle.errors import Fenced
from lifecycle.records import Task
from lifecycle.store._base import StoreBase, retry_on_deadlock
from lifecycle.store._rows import CLAIMS, HOSTS, TASKS

__all__ = ["Claims", "Hold", "hold", "release_all"]

_H, _CL, _T = HOSTS, CLAIMS, TASKS

Ratios = tuple[float, float, float]
"""cpu, ram and disk allocation ratios."""

_RESOURCES = ("vcpus", "memory_mb", "disk_gb")


class Hold(NamedTuple):
    """The claim an instance must hold on a host before a write goes on (see :func:`hold`)."""

    host: str
    size: tuple[int, int, int]
    """vcpus, memory in MiB, disk in GiB: the flavor the instance has there."""
    ratios: Ratios


class Claims(StoreBase):
    """Claim rows and the host usage counters they add to."""

    @retry_on_deadlock
    def claim(self, uuid: str, host: str, *, vcpus: int, memory_mb: int, disk_gb: int, ratios: Ratios) -> bool:
        """Reserve resources for an instance on a host within its allocation ratios, atomically.

        One conditional UPDATE adds the usage only if it still fits (and the
        host is not fenced), so two engines can never overcommit a host; the
        claim row is written in the same transaction. A host whose resources
        are not tracked always fits. Returns False (nothing written) when it
        does not fit or is fenced.
        """
        with self.engine.begin() as conn:
            return _add(conn, uuid, host, (vcpus, memory_mb, disk_gb), ratios, self.clock.now())

    @retry_on_deadlock
    def claim_first(
        self, uuid: str, candidates: Sequence[str], *, vcpus: int, memory_mb: int, disk_gb: int, ratios: Ratios
    ) -> str | None:
        """Reserve resources on the first of ``candidates``, in their order, that still fits; return its name.

        One UPDATE picks the host and adds the usage, so engines racing for
        the same host settle it inside the database instead of reading the
        hosts again; the claim row is written in the same transaction. The
        fit is checked as :meth:`claim` checks it, on the row as it is when
        locked: no host is ever overcommitted.

        On PostgreSQL the pick locks the row it takes and skips rows other
        transactions hold (``FOR NO KEY UPDATE SKIP LOCKED``), so racing
        engines spread over the next candidates instead of queueing on the
        first; a row locked after a concurrent commit is checked again, and
        passed over when it no longer fits. A skipped row may have room once
        its holder commits, so when that pass claims nothing a second one, in
        a transaction of its own, first waits for the locks of every
        candidate, taken in name order (as :meth:`Claims.release` takes its
        hosts', so waiting claims never deadlock), and picks again: None
        (nothing written) means every candidate was full when looked at.
        SQLite runs one writer at a time, so one pass, without locks, is exact.
        """
        if not candidates:
            return None
        params = _params((vcpus, memory_mb, disk_gb), ratios) | _numbered(candidates)
        postgres = self.engine.dialect.name == "postgresql"
        for waiting in (False, True) if postgres else (False,):
            with self.engine.begin() as conn:
                if waiting:
                    conn.execute(_lock_in_name_order(len(candidates)), _numbered(sorted(candidates)))
                pick = _claim_first(len(candidates), skip_locked=postgres and not waiting)
                host = conn.execute(pick, params).scalar_one_or_none()
                if host is not None:
                    conn.execute(_INSERT_CLAIM, _claim_row(uuid, host, params, self.clock.now()))
                    return str(host)
        return None

    @retry_on_deadlock
    def release(self, uuid: str, host: str | None = None, *, task: Task | None = None) -> int:
        """Give back what an instance holds (on one host, or everywhere); return how many claims.

        With ``task`` (a worker's release), only while that task is still at its
        epoch: a worker whose task was ended by reset-state, a build timeout or
        recovery raises :class:`Fenced` and releases nothing.
        """
        params: dict[str, Any] = {"x_uuid": uuid, "x_host": host}
        if task is not None:
            params |= {"x_task": task.id, "x_epoch": task.epoch}
        with self.engine.begin() as conn:
            gone = conn.execute(_release(host is not None, task is not None), params).all()
            if not gone and task is not None:  # nothing held, or fenced: the task row says which
                epoch = conn.execute(_TASK_EPOCH, params).scalar_one()
                if epoch != task.epoch:
                    raise Fenced(task.id, task.instance_uuid, task.epoch, epoch)
            _give_back(conn, gone)
        return len(gone)

    def of(self, uuid: str) -> list[str]:
        """Return the hosts an instance holds claims on."""
        with self._read() as conn:
            return list(
                conn.execute(sa.select(_CL.c.host).where(_CL.c.instance_uuid == uuid).order_by(_CL.c.host)).scalars()
            )


def hold(conn: sa.Connection, uuid: str, want: Hold, at: datetime) -> str | None:
    """Make sure ``uuid`` holds its claim on ``want.host``, inside the caller's transaction; return why not, or None.

    A claim already there is left as it is; a missing one is taken as
    :meth:`Claims.claim` takes one (within the ratios, never on a fenced
    host). When it cannot be taken nothing is written and the reason is
    returned: the caller raises, and its transaction rolls back.
    """
    if conn.execute(_HELD, {"x_uuid": uuid, "x_host": want.host}).first() is not None:
        return None
    if _add(conn, uuid, want.host, want.size, want.ratios, at):
        return None
    if conn.execute(_FENCED, {"x_host": want.host}).scalar_one_or_none() is not None:
        return "fenced by an operator"
    vcpus, memory_mb, disk_gb = want.size
    return f"no room left for {vcpus} vCPU, {memory_mb} MiB, {disk_gb} GiB within its allocation ratios"


def release_all(conn: sa.Connection, uuid: str) -> int:
    """Give back every claim of ``uuid`` inside the caller's transaction; return how many there were."""
    gone = conn.execute(_release(False, False), {"x_uuid": uuid, "x_host": None}).all()
    _give_back(conn, gone)
    return len(gone)


def _add(conn: sa.Connection, uuid: str, host: str, size: tuple[int, int, int], ratios: Ratios, at: datetime) -> bool:
    """Add the usage to ``host`` if it still fits (and is not fenced), with the claim row; False: nothing written."""
    params = _params(size, ratios) | {"x_host": host}
    if conn.execute(_CLAIM, params).rowcount != 1:
        return False
    conn.execute(_INSERT_CLAIM, _claim_row(uuid, host, params, at))
    return True


def _give_back(conn: sa.Connection, gone: Sequence[sa.Row[Any]]) -> None:
    """Take released claims' usage off their hosts, in one lock order across releases (no deadlock)."""
    for c in sorted(gone, key=lambda c: str(c.host)):
        conn.execute(
            _GIVE_BACK, {"x_host": c.host, "x_vcpus": c.vcpus, "x_memory_mb": c.memory_mb, "x_disk_gb": c.disk_gb}
        )


# The statements, built once per shape (building an expression and its cache key at each call cost more
# client CPU than running it); every value of a call is a parameter: x_vcpus, x_memory_mb and x_disk_gb
# wanted, x_ratio_vcpus... the allocation ratios, x_host one host, x_c0, x_c1... the candidates in order.


def _want(resource: str) -> sa.BindParameter[int]:
    return sa.bindparam(f"x_{resource}", type_=sa.Integer)


def _fits(hosts: sa.FromClause) -> list[sa.ColumnElement[bool]]:
    """Return the claim's conditions: not fenced, and each resource untracked (total NULL) or within total x ratio.

    The fence is checked here too, on the row as the claim finds it: an
    operator fencing a host between a decision's read and its claim (or while
    a claim waits for the row) keeps the host from being used.
    """
    return [hosts.c.fenced_at.is_(None)] + [
        sa.or_(
            hosts.c[r].is_(None),
            hosts.c[f"{r}_used"] + _want(r) <= hosts.c[r] * sa.bindparam(f"x_ratio_{r}", type_=sa.Float),
        )
        for r in _RESOURCES
    ]


_ADD_USAGE = sa.update(_H).values({f"{r}_used": _H.c[f"{r}_used"] + _want(r) for r in _RESOURCES})
_CLAIM = _ADD_USAGE.where(_H.c.name == sa.bindparam("x_host"), *_fits(_H))
"""The single-host claim: add the usage if it still fits (rowcount 0: it does not)."""
_GIVE_BACK = (
    sa.update(_H)
    .values({f"{r}_used": _H.c[f"{r}_used"] - _want(r) for r in _RESOURCES})
    .where(_H.c.name == sa.bindparam("x_host"))
)
_INSERT_CLAIM = sa.insert(_CL)
_HELD = sa.select(_CL.c.host).where(_CL.c.instance_uuid == sa.bindparam("x_uuid"), _CL.c.host == sa.bindparam("x_host"))
_FENCED = sa.select(_H.c.fenced_at).where(_H.c.name == sa.bindparam("x_host"))
_TASK_EPOCH = sa.select(_T.c.epoch).where(_T.c.id == sa.bindparam("x_task"))


def _candidates(column: sa.ColumnElement[str], count: int) -> sa.ColumnElement[bool]:
    return column.in_([sa.bindparam(f"x_c{i}") for i in range(count)])


@functools.lru_cache(maxsize=64)
def _claim_first(count: int, *, skip_locked: bool) -> sa.Executable:
    """UPDATE hosts ... WHERE name = (the first of ``count`` candidates that fits, locked) AND fits RETURNING name."""
    pick = _H.alias("candidate")  # not correlated with the hosts row being updated
    order = sa.case(*((pick.c.name == sa.bindparam(f"x_c{i}"), i) for i in range(count)))
    first = (
        sa.select(pick.c.name)
        .where(_candidates(pick.c.name, count), *_fits(pick))
        .order_by(order)
        .limit(1)
        .with_for_update(key_share=True, skip_locked=skip_locked)  # FOR NO KEY UPDATE, as the UPDATE itself
        .scalar_subquery()
    )
    return _ADD_USAGE.where(_H.c.name == first, *_fits(_H)).returning(_H.c.name)


@functools.lru_cache(maxsize=16)
def _lock_in_name_order(count: int) -> sa.Select[tuple[str]]:
    """SELECT ... FOR NO KEY UPDATE of ``count`` hosts (given sorted), locked one after the other in name order."""
    # Byte order ("C"), whatever the database's collation: the order Python's sorted() gives Claims.release.
    return (
        sa.select(_H.c.name)
        .where(_candidates(_H.c.name, count))
        .order_by(_H.c.name.collate("C"))
        .with_for_update(key_share=True)
    )


@functools.lru_cache(maxsize=4)
def _release(one_host: bool, fenced: bool) -> sa.Executable:
    """DELETE an instance's claims (on x_host) RETURNING what they held; with ``fenced``, only at the task's epoch."""
    where = [_CL.c.instance_uuid == sa.bindparam("x_uuid")]
    if one_host:
        where.append(_CL.c.host == sa.bindparam("x_host"))
    if fenced:  # the fence rides on the DELETE: a moved epoch deletes nothing
        where.append(sa.exists().where(_T.c.id == sa.bindparam("x_task"), _T.c.epoch == sa.bindparam("x_epoch")))
    return sa.delete(_CL).where(*where).returning(_CL.c.host, _CL.c.vcpus, _CL.c.memory_mb, _CL.c.disk_gb)


def _params(want: tuple[int, int, int], ratios: Ratios) -> dict[str, Any]:
    return {f"x_{r}": w for r, w in zip(_RESOURCES, want, strict=True)} | {
        f"x_ratio_{r}": ratio for r, ratio in zip(_RESOURCES, ratios, strict=True)
    }


def _numbered(names: Sequence[str]) -> dict[str, str]:
    return {f"x_c{i}": name for i, name in enumerate(names)}


def _claim_row(uuid: str, host: str, params: dict[str, Any], at: datetime) -> dict[str, Any]:
    return {"instance_uuid": uuid, "host": host, "created_at": at} | {r: params[f"x_{r}"] for r in _RESOURCES}
