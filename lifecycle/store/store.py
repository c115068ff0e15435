"""The only place SQL lives: reads, and the compare-and-swap writes.

Every state write is one transaction holding a conditional UPDATE of the
instance on its expected (version, vm_state, task_state, task_id), the task and
step-log statements that go with it, and one audit row when any of the three
states changed. An UPDATE that matches no row raises: :class:`Preempted` when
the writer's own task was taken over, :class:`Conflict` otherwise.

:class:`Store` is a composition of repositories, one per noun, each in its own
module and each an attribute of the store (``store.hosts``, ``store.tasks``,
``store.writes``...):

- :mod:`~lifecycle.store.hosts`, :mod:`~lifecycle.store.images`,
  :mod:`~lifecycle.store.claims`: what instances are placed on and with;
- :mod:`~lifecycle.store.instances`: instance reads and audit history;
- :mod:`~lifecycle.store.tasks`: task reads, step log, leases, takeover, fencing;
- :mod:`~lifecycle.store.ownership`: which process runs each host (:class:`HostClaim`);
- :mod:`~lifecycle.store.moves`: migration records;
- :mod:`~lifecycle.store.consoles`: console tokens;
- :mod:`~lifecycle.store.writes`: the compare-and-swap writes of a task's life;
- :mod:`~lifecycle.store.syncrows` (``store.sync``): the sync pass's reads and batch writes;
- :mod:`~lifecycle.store.stats`: counts for metrics;
- :mod:`~lifecycle.store.feed`: the change feed, its retention, and audit queries;
- :mod:`~lifecycle.store.consumers`: the feed's consumers and their positions.

Underneath: ``_base`` (the shared :class:`Database`, read connections, deadlock retries), ``_rows``
(table handles and row <-> record mapping) and ``_cas`` (the statements a
write transaction is made of).
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from lifecycle.clock import Clock
from lifecycle.store._base import Database
from lifecycle.store.claims import Claims
from lifecycle.store.consoles import Consoles
from lifecycle.store.consumers import Consumers
from lifecycle.store.feed import Feed
from lifecycle.store.hosts import Hosts
from lifecycle.store.images import Images
from lifecycle.store.instances import Instances
from lifecycle.store.moves import Moves
from lifecycle.store.ownership import HostClaim, Ownership
from lifecycle.store.stats import Stats
from lifecycle.store.syncrows import SyncRows
from lifecycle.store.tasks import Tasks
from lifecycle.store.writes import Writes

__all__ = ["HostClaim", "Store"]


class Store:
    """Reads and compare-and-swap writes over one database: one repository per noun, sharing its connections."""

    def __init__(self, url: str, *, lease_seconds: float = 60.0, clock: Clock | None = None) -> None:
        self.db = Database(url, lease_seconds=lease_seconds, clock=clock)
        """The database every repository reads and writes (engine, lease length, clock, read options)."""
        self.instances = Instances(self.db)
        """Instance reads and audit history."""
        self.moves = Moves(self.db)
        """Migration records."""
        self.hosts = Hosts(self.db, self.instances, self.moves)
        """Host rows (removing one looks at its instances and moves)."""
        self.images = Images(self.db)
        """Image rows."""
        self.claims = Claims(self.db)
        """Resource claims on hosts."""
        self.tasks = Tasks(self.db)
        """Task reads, the step log, leases, takeover and fencing."""
        self.ownership = Ownership(self.db)
        """Which process runs each host."""
        self.consoles = Consoles(self.db)
        """Console tokens."""
        self.writes = Writes(self.db)
        """The compare-and-swap writes of a task's life."""
        self.sync = SyncRows(self.db)
        """The power sync's reads and batch writes."""
        self.stats = Stats(self.db)
        """Counts for metrics."""
        self.feed = Feed(self.db)
        """The change feed's reads, its retention, and audit queries."""
        self.consumers = Consumers(self.db)
        """The feed's consumers and their positions."""

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine of the database."""
        return self.db.engine

    @property
    def url(self) -> str:
        """The database URL the store was opened with."""
        return self.db.url

    @property
    def clock(self) -> Clock:
        """Where every time the store writes or compares with comes from (:mod:`lifecycle.clock`)."""
        return self.db.clock

    @property
    def lease(self) -> timedelta:
        """How long a task's lease lasts."""
        return self.db.lease

    def close(self) -> None:
        """Release every pooled connection."""
        self.db.close()
