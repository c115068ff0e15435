"""Instance reads: one instance, a filtered page of them, those of a state, and an instance's audit history."""

from __future__ import annotations

import builtins
from datetime import datetime

import sqlalchemy as sa

from lifecycle.audit import AuditEntry
from lifecycle.errors import InstanceNotFound, InvalidInput
from lifecycle.listing import Listing
from lifecycle.records import Instance
from lifecycle.states import StatusPairs, VmState, status_pairs
from lifecycle.store._base import StoreBase
from lifecycle.store._rows import AUDITS, INSTANCES, TASKS, instance_from
from lifecycle.store.db import aware

__all__ = ["Instances"]

_I, _A, _T = INSTANCES, AUDITS, TASKS
_BY_UUID = sa.select(_I).where(_I.c.uuid == sa.bindparam("x_uuid"))
_M = _I.alias("marker")


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
        return self.page(Listing(host, include_deleted=include_deleted))

    def page(self, listing: Listing) -> builtins.list[Instance]:
        """Return the page of instances ``listing`` asks for, by (created_at, uuid), in one query.

        Raises :class:`InvalidInput` when its marker is no instance, or one of
        another project than the listing's ``project_id`` (the same words
        either way: a listing says nothing of other projects' instances). A
        marker deleted since its page was read still marks the place.
        """
        query = sa.select(_I).where(*_filters(listing)).order_by(_I.c.created_at, _I.c.uuid).limit(listing.limit)
        with self._read() as conn:
            rows = [instance_from(r) for r in conn.execute(query).mappings()]
            if (
                not rows
                and listing.marker is not None
                and conn.execute(sa.select(_M.c.uuid).where(*_marker(listing))).first() is None
            ):
                raise InvalidInput(f"marker {listing.marker} is not a known instance (the last uuid of a page)")
        return rows

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


def _filters(listing: Listing) -> builtins.list[sa.ColumnElement[bool]]:
    """Return the conditions of a listing: its filters, then the keyset after its marker."""
    found: builtins.list[sa.ColumnElement[bool]] = []
    if listing.host is not None:
        found.append(_I.c.host == listing.host)
    if listing.vm_state is not None:
        found.append(_I.c.vm_state == VmState(listing.vm_state).value)
    if listing.status is not None:
        found.append(sa.or_(*(_pairs(p) for p in status_pairs(listing.status))))
    if listing.project_id is not None:
        found.append(_I.c.project_id == listing.project_id)
    if not listing.include_deleted:
        found.append(_I.c.vm_state != VmState.DELETED.value)
    if listing.marker is not None:
        at = sa.select(_M.c.created_at).where(*_marker(listing)).scalar_subquery()
        # A row value: one range of the (created_at, uuid) index, read in order until the limit.
        found.append(sa.tuple_(_I.c.created_at, _I.c.uuid) > sa.tuple_(at, sa.literal(listing.marker)))
    return found


def _marker(listing: Listing) -> builtins.list[sa.ColumnElement[bool]]:
    """Return the conditions of a listing's marker row: its uuid, and the listing's project when it names one."""
    found = [_M.c.uuid == listing.marker]
    if listing.project_id is not None:
        found.append(_M.c.project_id == listing.project_id)
    return found


def _pairs(p: StatusPairs) -> sa.ColumnElement[bool]:
    """Return the condition of one vm_state's (vm_state, task_state) pairs of a status."""
    tasks = sorted(t.value for t in p.task_states)
    if not p.default:
        return sa.and_(_I.c.vm_state == p.vm_state.value, _I.c.task_state.in_(tasks))
    if not tasks:
        return _I.c.vm_state == p.vm_state.value
    others = sa.or_(_I.c.task_state.is_(None), _I.c.task_state.not_in(tasks))
    return sa.and_(_I.c.vm_state == p.vm_state.value, others)
