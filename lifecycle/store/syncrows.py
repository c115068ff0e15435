"""The sync pass's rows: light keyset-paged reads of a host's instances, and the batch writes a pass makes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import sqlalchemy as sa

from lifecycle.audit import Why
from lifecycle.errors import Conflict
from lifecycle.records import Instance, Recorded
from lifecycle.states import PowerState, TaskState, VmState
from lifecycle.store._base import StoreBase, retry_on_deadlock
from lifecycle.store._cas import audit, cas
from lifecycle.store._rows import INSTANCES, instance_from, stamp
from lifecycle.store.db import now

__all__ = ["SyncRows"]

_I = INSTANCES

# Lookups for the sync read path, where an Enum(value) call per column per row shows in profiles.
_VM_STATES = {s.value: s for s in VmState}
_TASK_STATES = {t.value: t for t in TaskState}
_POWERS = {int(p): p for p in PowerState}

_SYNC_COLUMNS = (
    _I.c.uuid,
    _I.c.version,
    _I.c.vm_state,
    _I.c.task_state,
    _I.c.power_state,
    _I.c.updated_at,
    _I.c.missing_count,
)


class SyncRows(StoreBase):
    """What a sync pass reads and writes, in chunks and batches."""

    def host_sync_rows(self, host: str, chunk: int = 1000) -> Iterator[list[tuple[str, int, Recorded]]]:
        """Yield (uuid, version, recorded states) of a host's live instances in chunks (keyset paging).

        Only the columns a sync decision needs are read, so a pass over a big
        host costs one light query per chunk; full rows are loaded only for
        the few instances a pass acts on (:meth:`instances_by_uuid`).
        """
        after = ""
        while True:
            query = (
                sa.select(*_SYNC_COLUMNS)
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
                        stamp(changed),
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
        return {r["uuid"]: instance_from(r) for r in rows}

    @retry_on_deadlock
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
                    cas(conn, expected, after, None)
                except Conflict:
                    results.append(None)
                    continue
                audit(conn, expected, after, why)
                results.append(after)
        return results

    def set_missing_counts(self, counts: list[tuple[str, int, int]]) -> None:
        """Store (uuid, expected version, count) missing counts; bookkeeping: no version bump, no audit row."""
        with self.engine.begin() as conn:
            for uuid, version, count in counts:
                conn.execute(
                    sa.update(_I).where(_I.c.uuid == uuid, _I.c.version == version).values(missing_count=count)
                )
