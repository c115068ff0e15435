"""Resource claims: what each instance holds on each host, kept within the host's allocation ratios."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from lifecycle.errors import Fenced
from lifecycle.records import Task
from lifecycle.store._base import StoreBase, retry_on_deadlock
from lifecycle.store._rows import CLAIMS, HOSTS, TASKS
from lifecycle.store.db import now

__all__ = ["Claims"]

_H, _CL, _T = HOSTS, CLAIMS, TASKS


class Claims(StoreBase):
    """Claim rows and the host usage counters they add to."""

    @retry_on_deadlock
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
        query = (
            sa.update(_H)
            .where(
                _H.c.name == host,
                _fits(_H.c.vcpus, _H.c.vcpus_used, vcpus, cpu_ratio),
                _fits(_H.c.memory_mb, _H.c.memory_mb_used, memory_mb, ram_ratio),
                _fits(_H.c.disk_gb, _H.c.disk_gb_used, disk_gb, disk_ratio),
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

    @retry_on_deadlock
    def release_claims(self, uuid: str, host: str | None = None, *, task: Task | None = None) -> int:
        """Give back what an instance holds (on one host, or everywhere); return how many claims.

        With ``task`` (a worker's release), only while that task is still at its
        epoch: a worker whose task was ended by reset-state, a build timeout or
        recovery raises :class:`Fenced` and releases nothing.
        """
        where = [_CL.c.instance_uuid == uuid] + ([_CL.c.host == host] if host is not None else [])
        with self.engine.begin() as conn:
            if task is not None:
                epoch = conn.execute(sa.select(_T.c.epoch).where(_T.c.id == task.id)).scalar_one()
                if epoch != task.epoch:
                    raise Fenced(task.id, task.instance_uuid, task.epoch, epoch)
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


def _fits(total: sa.ColumnElement[Any], used: sa.ColumnElement[Any], want: int, ratio: float) -> sa.ColumnElement[bool]:
    return sa.or_(total.is_(None), used + want <= total * ratio)
