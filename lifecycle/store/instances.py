"""Instance reads: one instance, the instances of a host or a state, and an instance's audit history."""

from __future__ import annotations

import builtins
from datetime import datetime

import sqlalchemy as sa

from lifecycle.audit import AuditEntry
from lifecycle.errors import InstanceNotFound
from lifecycle.records import Instance
from lifecycle.states import VmState
from lifecycle.store._base import StoreBase
from lifecycle.store._rows import AUDITS, INSTANCES, TASKS, instance_from
from lifecycle.store.db import aware

__all__ = ["Instances"]

_I, _A, _T = INSTANCES, AUDITS, TASKS
_BY_UUID = sa.select(_I).where(_I.c.uuid == sa.bindparam("x_uuid"))


class Instances(StoreBase):
    """Instance rows and their audit rows, read."""

    def get(self, uuid: str) -> Instance:
        """Return the instance (deleted ones included) or raise :class:`InstanceNotFound`."""
        with self._read() as conn:
            row = conn.execute(_BY_UUID, {"x_uuid": uuid}).mappings().first()
        if row is None:
            raise InstanceNotFound(uuid)
        return instance_from(row)

    def list(self, host: str | None = None, *, include_deleted: bool = False) -> builtins.list[Instance]:
        """Return instances by creation time, optionally of one host."""
        query = sa.select(_I).order_by(_I.c.created_at, _I.c.uuid)
        if host is not None:
            query = query.where(_I.c.host == host)
        if not include_deleted:
            query = query.where(_I.c.vm_state != VmState.DELETED.value)
        with self._read() as conn:
            return [instance_from(r) for r in conn.execute(query).mappings()]

    def in_state_since(self, vm_state: VmState, before: datetime) -> builtins.list[Instance]:
        """Return the instances in ``vm_state`` whose last write is older than ``before``, oldest first.

        For a soft-deleted instance that write is the end of its soft delete
        (reclaim); for a building one, any step of its build (build timeout
        measures from the task's start instead: see :meth:`building_since`).
        """
        query = (
            sa.select(_I)
            .where(_I.c.vm_state == vm_state.value, _I.c.updated_at < before)
            .order_by(_I.c.updated_at, _I.c.uuid)
        )
        with self._read() as conn:
            return [instance_from(r) for r in conn.execute(query).mappings()]

    def building_since(self, before: datetime) -> builtins.list[Instance]:
        """Return the instances still building whose create task started before ``before``."""
        query = (
            sa.select(_I)
            .join(_T, _T.c.id == _I.c.task_id)
            .where(_I.c.vm_state == VmState.BUILDING.value, _T.c.started_at < before)
            .order_by(_T.c.started_at, _I.c.uuid)
        )
        with self._read() as conn:
            return [instance_from(r) for r in conn.execute(query).mappings()]

    def history(self, uuid: str) -> builtins.list[AuditEntry]:
        """Return an instance's audit log, oldest first."""
        query = sa.select(_A).where(_A.c.instance_uuid == uuid).order_by(_A.c.id)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        return [AuditEntry(**{**r, "created_at": aware(r["created_at"])}) for r in rows]
