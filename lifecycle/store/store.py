"""The only place SQL lives: reads, and the compare-and-swap writes.

Every state write is one transaction holding a conditional UPDATE of the
instance on its expected (version, vm_state, task_state, task_id), the task and
step-log statements that go with it, and one audit row when any of the three
states changed. An UPDATE that matches no row raises: :class:`Preempted` when
the writer's own task was taken over, :class:`Conflict` otherwise.

:class:`Store` is the composition of one part per noun, each in its own module:

- :mod:`~lifecycle.store.hosts`, :mod:`~lifecycle.store.images`,
  :mod:`~lifecycle.store.claims`: what instances are placed on and with;
- :mod:`~lifecycle.store.instances`: instance reads and audit history;
- :mod:`~lifecycle.store.tasks`: task reads, step log, leases, takeover, fencing;
- :mod:`~lifecycle.store.ownership`: which process runs each host (:class:`HostClaim`);
- :mod:`~lifecycle.store.moves`: migration records;
- :mod:`~lifecycle.store.consoles`: console tokens;
- :mod:`~lifecycle.store.writes`: the compare-and-swap writes of a task's life;
- :mod:`~lifecycle.store.syncrows`: the sync pass's reads and batch writes;
- :mod:`~lifecycle.store.stats`: counts for metrics;
- :mod:`~lifecycle.store.feed`: the change feed, its retention, and audit queries;
- :mod:`~lifecycle.store.consumers`: the feed's consumers and their positions.

Underneath: ``_base`` (engine, read connections, deadlock retries), ``_rows``
(table handles and row <-> record mapping) and ``_cas`` (the statements a
write transaction is made of).
"""

from __future__ import annotations

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


class Store(
    Hosts, Images, Claims, Instances, Tasks, Ownership, Moves, Consoles, Writes, SyncRows, Stats, Feed, Consumers
):
    """Reads and compare-and-swap writes over one database."""
