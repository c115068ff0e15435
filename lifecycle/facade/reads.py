"""The engine's reads: instances (one, or a filtered page), their tasks, step logs, moves and audit history.

:class:`lifecycle.Engine` inherits them; they read the store and change nothing.
"""

from __future__ import annotations

import builtins

from lifecycle import validation
from lifecycle.audit import AuditEntry
from lifecycle.facade.hosts import Hosts
from lifecycle.listing import Listing
from lifecycle.records import Instance, Migration, Task, TaskStep
from lifecycle.states import VmState
from lifecycle.store import Store

__all__ = ["Reads"]


class Reads:
    """The reads of :class:`lifecycle.Engine`, over its ``store`` and ``hosts``."""

    store: Store
    hosts: Hosts

    def get(self, uuid: str) -> Instance:
        """Return the instance (deleted ones too); :class:`InstanceNotFound` otherwise."""
        return self.store.instances.get(validation.uuid(uuid))

    def list(
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
        """Return instances oldest first (by created_at, then uuid), filtered, a page at a time.

        Filters: ``host``, ``vm_state``, ``status`` (a status word such as ``SHUTOFF``, matched on the
        states it derives from), ``project_id``; deleted instances only with ``include_deleted``. A page
        is at most ``limit`` instances (1 to 1000; None: all) after ``marker``, the uuid of the last
        instance of the previous page (Nova's paging); a marker that is no instance is
        :class:`InvalidInput`, as is any bad filter.
        """
        return self.store.instances.page(Listing(host, vm_state, status, project_id, include_deleted, limit, marker))

    def task(self, task_id: str) -> Task:
        """Return a task by id; :class:`TaskNotFound` otherwise."""
        return self.store.tasks.get(validation.uuid(task_id, "task"))

    def tasks(self, uuid: str) -> builtins.list[Task]:
        """Return every task of an instance, oldest first; :class:`InstanceNotFound` for an unknown one."""
        return self.store.tasks.of(self.get(uuid).uuid)

    def steps(self, task_id: str) -> builtins.list[TaskStep]:
        """Return a task's step log."""
        return self.store.tasks.steps(self.task(task_id).id)

    def history(self, uuid: str) -> builtins.list[AuditEntry]:
        """Return an instance's audit log, oldest first."""
        return self.store.instances.history(self.get(uuid).uuid)

    def migrations(self, host: str | None = None) -> builtins.list[Migration]:
        """Return cold migrations and resizes, newest first, optionally those from or to ``host``."""
        if host is not None:
            self.hosts.get(host)
        return self.store.moves.list(host)

    def migration(self, migration_id: str) -> Migration:
        """Return one migration by id; :class:`MigrationNotFound` otherwise."""
        return self.store.moves.get(validation.uuid(migration_id, "migration"))

    def waiting_for_lease(self) -> builtins.list[Task]:
        """Return the running tasks ``recover`` leaves alone because their lease is still live."""
        return self.store.tasks.live()
