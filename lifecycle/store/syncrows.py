"""The sync pass's rows: light keyset-paged reads of a host's instances, and the batch writes a pass makes.

A pass over a big host must cost a small multiple of one select and one
listing, so its reads hand back plain tuples of stored values (no record per
row), and its power writes are one batched compare-and-swap per chunk: one
``UPDATE ... WHERE uuid AND version AND vm_state AND task_state IS NULL AND
task_id IS NULL`` executed for every drifted row, and their audit rows in one
batched INSERT, in one transaction. Each row still matches at most once (uuid
is the key), so when the rows updated add up to the rows sent every
compare-and-swap won; otherwise the batch is rolled back and redone one row
at a time, so the rows that lost their race are known and skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from typing import NamedTuple

import sqlalchemy as sa

from lifecycle.audit import Why
from lifecycle.errors import Conflict
from lifecycle.records import Instance
from lifecycle.states import PowerState, VmState
from lifecycle.store._base import StoreBase, retry_on_deadlock
from lifecycle.store._cas import audit, cas
from lifecycle.store._rows import AUDITS, INSTANCES, instance_from

__all__ = ["PowerWrite", "SyncRow", "SyncRows"]

_I, _A = INSTANCES, AUDITS


class SyncRow(NamedTuple):
    """What a sync decision needs of one instance, as stored (plain values: no record built per row)."""

    uuid: str
    version: int
    vm_state: str
    task_state: str | None
    power_state: int
    missing_count: int
    changed_after: bool
    """The row changed after the pass's observation time (the observation is stale for it)."""


class PowerWrite(NamedTuple):
    """A power state a pass records on an idle instance, expected at ``version`` in ``vm_state`` on ``host``."""

    uuid: str
    version: int
    vm_state: VmState
    host: str
    before: PowerState
    after: PowerState
    why: Why


class _LostRace(Exception):
    """Some row of a batched compare-and-swap did not match: roll the batch back and redo it row by row."""


# Built once: a pass reads one page per chunk, and building a select costs more than running this one.
_SYNC_PAGE = (
    sa.select(
        _I.c.uuid,
        _I.c.version,
        _I.c.vm_state,
        _I.c.task_state,
        _I.c.power_state,
        _I.c.missing_count,
        _I.c.updated_at > sa.bindparam("b_at", type_=_I.c.updated_at.type),
    )
    .where(
        _I.c.host == sa.bindparam("b_host"), _I.c.vm_state != VmState.DELETED.value, _I.c.uuid > sa.bindparam("b_after")
    )
    .order_by(_I.c.uuid)
    .limit(sa.bindparam("b_limit"))
)
_POWER_CAS = (
    sa.update(_I)
    .where(
        _I.c.uuid == sa.bindparam("b_uuid"),
        _I.c.version == sa.bindparam("b_version"),
        _I.c.vm_state == sa.bindparam("b_vm_state"),
        _I.c.task_state.is_(None),
        _I.c.task_id.is_(None),
    )
    .values(
        power_state=sa.bindparam("b_power"),
        version=sa.bindparam("b_version") + 1,
        updated_at=sa.bindparam("b_at"),
        missing_count=0,
    )
)
_MISSING_COUNT = (
    sa.update(_I)
    .where(_I.c.uuid == sa.bindparam("b_uuid"), _I.c.version == sa.bindparam("b_version"))
    .values(missing_count=sa.bindparam("b_count"))
)


class SyncRows(StoreBase):
    """What a sync pass reads and writes, in chunks and batches."""

    def rows(self, host: str, observed_at: datetime, chunk: int = 1000) -> Iterator[list[SyncRow]]:
        """Yield the :class:`SyncRow` of each of a host's live instances, in chunks (keyset paging by uuid).

        Only the columns a sync decision needs are read, and whether the row
        changed after ``observed_at`` is compared by the database, so a pass
        over a big host costs one light query per chunk and no datetime per
        row; full rows are loaded only for the few instances a pass runs an
        operation on (:meth:`instances_by_uuid`).
        """
        after = ""
        while True:
            page = {"b_host": host, "b_after": after, "b_at": observed_at, "b_limit": chunk}
            with self._read() as conn:
                rows = conn.execute(_SYNC_PAGE, page).all()
            if not rows:
                return
            yield list(map(SyncRow._make, rows))
            after = rows[-1][0]

    def instances_by_uuid(self, uuids: list[str]) -> dict[str, Instance]:
        """Return full rows for ``uuids`` (missing ones are left out), in one query."""
        with self._read() as conn:
            rows = conn.execute(sa.select(_I).where(_I.c.uuid.in_(uuids))).mappings().all()
        return {r["uuid"]: instance_from(r) for r in rows}

    @retry_on_deadlock
    def set_power_many(self, changes: list[tuple[Instance, PowerState, Why]]) -> list[Instance | None]:
        """Record new power states on idle instances in one transaction.

        Each is its own compare-and-swap with its own audit row; one that lost
        its race is skipped (None in the result), never retried or forced.
        """
        results: list[Instance | None] = []
        at = self.clock.now()
        with self.engine.begin() as conn:
            for expected, power, why in changes:
                after = replace(
                    expected, power_state=power, version=expected.version + 1, updated_at=at, missing_count=0
                )
                try:
                    cas(conn, expected, after, None)
                except Conflict:
                    results.append(None)
                    continue
                audit(conn, expected, after, why)
                results.append(after)
        return results

    @retry_on_deadlock
    def record_powers(self, writes: Sequence[PowerWrite]) -> list[bool]:
        """Record new power states on idle instances with one batched compare-and-swap; return which won.

        Each write expects the row at its version and vm_state with no task,
        and adds its audit row in the same transaction. A write whose row
        changed since the pass read it lost its race: it is skipped (False),
        never retried or forced.
        """
        if not writes:
            return []
        at = self.clock.now()
        try:
            with self.engine.begin() as conn:
                return self._powers_batched(conn, writes, at)
        except _LostRace:
            with self.engine.begin() as conn:
                return self._powers_one_by_one(conn, writes, at)

    def _powers_batched(self, conn: sa.Connection, writes: Sequence[PowerWrite], at: datetime) -> list[bool]:
        updated = conn.execute(_POWER_CAS, [_cas_params(w, at) for w in writes]).rowcount
        if not conn.dialect.supports_sane_multi_rowcount or updated != len(writes):
            raise _LostRace
        who = _attribution(conn, writes)
        conn.execute(sa.insert(_A), [_audit_row(w, at, who) for w in writes])
        return [True] * len(writes)

    def _powers_one_by_one(self, conn: sa.Connection, writes: Sequence[PowerWrite], at: datetime) -> list[bool]:
        won = [conn.execute(_POWER_CAS, _cas_params(w, at)).rowcount == 1 for w in writes]
        who = _attribution(conn, writes)
        audits = [_audit_row(w, at, who) for w, ok in zip(writes, won, strict=True) if ok]
        if audits:
            conn.execute(sa.insert(_A), audits)
        return won

    def set_missing_counts(self, counts: list[tuple[str, int, int]]) -> None:
        """Store (uuid, expected version, count) missing counts in one batch; bookkeeping: no version bump, no audit.

        A row whose version moved on is left alone (its writer reset or owns it).
        """
        if not counts:
            return
        with self.engine.begin() as conn:
            conn.execute(_MISSING_COUNT, [{"b_uuid": u, "b_version": v, "b_count": c} for u, v, c in counts])


def _cas_params(w: PowerWrite, at: datetime) -> dict[str, object]:
    return {
        "b_uuid": w.uuid,
        "b_version": w.version,
        "b_vm_state": w.vm_state.value,
        "b_power": int(w.after),
        "b_at": at,
    }


def _attribution(conn: sa.Connection, writes: Sequence[PowerWrite]) -> dict[str, tuple[str | None, str | None]]:
    """Return the project and user of the written instances, by uuid, for their audit rows (one select a batch)."""
    query = sa.select(_I.c.uuid, _I.c.project_id, _I.c.user_id).where(_I.c.uuid.in_([w.uuid for w in writes]))
    return {uuid: (project, user) for uuid, project, user in conn.execute(query)}


def _audit_row(w: PowerWrite, at: datetime, who: dict[str, tuple[str | None, str | None]]) -> dict[str, object]:
    """Return the audit row :func:`lifecycle.store._cas.audit` writes for a power change of an idle instance."""
    project, user = who.get(w.uuid, (None, None))
    return {
        "project_id": project,
        "user_id": user,
        "instance_uuid": w.uuid,
        "task_id": w.why.task_id,
        "request_id": w.why.request_id,
        "actor": w.why.actor,
        "cause": w.why.cause.value,
        "operation": w.why.operation,
        "rule": w.why.rule,
        "from_vm_state": w.vm_state.value,
        "to_vm_state": w.vm_state.value,
        "from_task_state": None,
        "to_task_state": None,
        "from_power_state": int(w.before),
        "to_power_state": int(w.after),
        "message": w.why.message,
        "created_at": at,
        "host": w.host,
    }
