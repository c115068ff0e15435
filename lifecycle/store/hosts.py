"""Hosts: adding, reading, updating and removing the hypervisor hosts instances run on."""

from __future__ import annotations

import builtins
import functools
import json
from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from lifecycle.audit import Activity, Why
from lifecycle.errors import HostInUse, HostNotFound
from lifecycle.records import Cause, Host, Instance
from lifecycle.scheduler import Prefilter
from lifecycle.states import PowerState, VmState
from lifecycle.store._base import Database, StoreBase
from lifecycle.store._cas import audit, cas
from lifecycle.store._rows import CLAIMS, CONSOLE_TOKENS, HOSTS, INSTANCES, host_from, hosts_from
from lifecycle.store.instances import Instances
from lifecycle.store.moves import Moves

__all__ = ["Hosts"]

_H, _I, _CL, _C = HOSTS, INSTANCES, CLAIMS, CONSOLE_TOKENS
_ALL_HOSTS = sa.select(_H).order_by(_H.c.name)


class Hosts(StoreBase):
    """Host rows; removing one looks at its instances and its open moves."""

    def __init__(self, db: Database, instances: Instances, moves: Moves) -> None:
        super().__init__(db)
        self._instances = instances
        self._moves = moves

    def add(self, name: str, driver_uri: str, instances_path: str, **fields: Any) -> Host:
        """Insert a host (resources, zone, capabilities... as keyword fields); AlreadyExists if taken."""
        values = {
            "name": name,
            "driver_uri": driver_uri,
            "instances_path": instances_path,
            "enabled": True,
            "created_at": self.clock.now(),
        }
        for key in ("capabilities", "metrics"):
            if key in fields:
                fields[key] = json.dumps(fields[key], sort_keys=True)
        self._insert_unique(_H, values | fields, "host", name)
        return self.get(name)

    def get(self, name: str) -> Host:
        """Return the host named ``name`` or raise :class:`HostNotFound`."""
        with self._read() as conn:
            row = conn.execute(sa.select(_H).where(_H.c.name == name)).mappings().first()
            if row is None:
                raise HostNotFound(name, conn.execute(sa.select(_H.c.name)).scalars())
        return host_from(row)

    def list(self) -> builtins.list[Host]:
        """Return every host, by name (one query: the scheduler's input)."""
        with self._read() as conn:
            return hosts_from(conn.execute(_ALL_HOSTS))

    def ranked(self, pre: Prefilter, up_since: datetime, offset: int, limit: int) -> builtins.list[Host]:
        """Return one page of the hosts ``pre`` admits, best first for the RAM weigher (see :class:`Prefilter`).

        Fenced hosts are left out; ``up_since`` is the oldest heartbeat a host
        counts as up with (when ``pre.enabled_and_up``). The database scans
        the host rows without turning them into records: only the page is.
        """
        query = _ranked_query(
            bool(pre.exclude),
            pre.availability_zone is not None,
            tuple((total, used, ratio) for total, used, _want, ratio in pre.fits),
            pre.enabled_and_up,
            pre.ram_order,
            pre.ram_allocation_ratio,
        )
        params: dict[str, Any] = {"x_offset": offset, "x_limit": limit, "x_up_since": up_since}
        params |= {f"x_want{i}": want for i, (_t, _u, want, _r) in enumerate(pre.fits)}
        if pre.exclude:
            params["x_exclude"] = sorted(pre.exclude)
        if pre.availability_zone is not None:
            params["x_zone"] = pre.availability_zone
        with self._read() as conn:
            return hosts_from(conn.execute(query, params))

    def update(self, name: str, **values: Any) -> Host:
        """Change a host's settable fields (enabled, metrics, last_heartbeat...)."""
        if "metrics" in values:
            values["metrics"] = json.dumps(values["metrics"], sort_keys=True)
        with self.engine.begin() as conn:
            if conn.execute(sa.update(_H).where(_H.c.name == name).values(**values)).rowcount == 0:
                raise HostNotFound(name)
        return self.get(name)

    def set_fence(self, name: str, by: str | None, reason: str | None) -> Host:
        """Fence the host (``by`` and ``reason`` given: recorded with the time) or unfence it (both None)."""
        at = None if by is None else self.clock.now()
        return self.update(name, fenced_at=at, fenced_by=by, fenced_reason=reason)

    def remove(self, name: str, *, force: bool = False) -> builtins.list[str]:
        """Delete a host row; return the live instances a forced removal orphaned.

        Refused (:class:`HostInUse`) while live instances, claims or open moves
        use the host, unless ``force``: then each idle live instance there goes
        to error with no host (only delete is left for it: a local delete), its
        claims go, and an audit row says the guest may still exist. Instances
        with a running task are never orphaned: :class:`HostInUse` either way.
        Deleted instances forget the host (their history stays).
        """
        self.get(name)
        live = [i for i in self._instances.list(name) if i.vm_state is not VmState.DELETED]
        moving = [m.instance_uuid for m in self._moves.touching(name)]
        # A claim without the instance's host set yet: a build between its claim and its first step there.
        query = sa.select(_I.c.uuid, _I.c.task_id).join(_CL, _CL.c.instance_uuid == _I.c.uuid).where(_CL.c.host == name)
        with self._read() as conn:
            claimed = {uuid: task for uuid, task in conn.execute(query).all()}
        if (live or moving or claimed) and not force:
            raise HostInUse(name, {i.uuid for i in live} | set(moving) | set(claimed))
        busy = [i.uuid for i in live if i.task_id is not None] + moving
        busy += [uuid for uuid, task in claimed.items() if task is not None and uuid not in busy]
        if busy:
            raise HostInUse(name, busy)
        with self.engine.begin() as conn:
            _orphan(conn, name, live, self.clock.now())
            conn.execute(sa.update(_I).where(_I.c.host == name).values(host=None))
            for claim in conn.execute(sa.select(_CL.c.instance_uuid).where(_CL.c.host == name)).scalars().all():
                conn.execute(sa.delete(_CL).where(_CL.c.instance_uuid == claim, _CL.c.host == name))
            conn.execute(sa.delete(_C).where(_C.c.host == name))
            conn.execute(sa.delete(_H).where(_H.c.name == name))
        return [i.uuid for i in live]


def _orphan(conn: sa.Connection, name: str, live: builtins.list[Instance], at: datetime) -> None:
    """Put each idle live instance of a host removed by force in error with no host, audited."""
    why = Why(
        actor="operator",
        cause=Cause.API,
        operation=Activity.REMOVE_HOST,
        message=f"host {name} removed by force: the guest may still exist there",
    )
    for i in live:
        after = replace(
            i,
            vm_state=VmState.ERROR,
            power_state=PowerState.NOSTATE,
            host=None,
            version=i.version + 1,
            updated_at=at,
        )
        cas(conn, i, after, None)
        audit(conn, i, after, why, always=True)


@functools.lru_cache(maxsize=64)
def _ranked_query(
    exclude: bool,
    zone: bool,
    fits: tuple[tuple[str, str, float], ...],
    enabled_and_up: bool,
    ram_order: int,
    ram_allocation_ratio: float,
) -> sa.Select[Any]:
    """Build once per shape the query of :meth:`Hosts.ranked` (the values a decision changes are parameters)."""
    where: builtins.list[sa.ColumnElement[bool]] = [_H.c.fenced_at.is_(None)]
    if exclude:
        where.append(_H.c.name.not_in(sa.bindparam("x_exclude", expanding=True)))
    if zone:
        where.append(_H.c.availability_zone == sa.bindparam("x_zone"))
    for i, (total, used, ratio) in enumerate(fits):
        where.append(sa.or_(_H.c[total].is_(None), _H.c[used] + sa.bindparam(f"x_want{i}") <= _H.c[total] * ratio))
    if enabled_and_up:
        where += [_H.c.enabled.is_(True), _H.c.last_heartbeat >= sa.bindparam("x_up_since")]
    free = sa.case((_H.c.memory_mb.is_(None), 0.0), else_=_H.c.memory_mb * ram_allocation_ratio - _H.c.memory_mb_used)
    order = [free.desc()] if ram_order > 0 else [free.asc()] if ram_order < 0 else []
    return (
        sa.select(_H)
        .where(*where)
        .order_by(*order, _H.c.name)
        .offset(sa.bindparam("x_offset", type_=sa.Integer))
        .limit(sa.bindparam("x_limit", type_=sa.Integer))
    )
