"""The libvirt driver: any libvirt URI (test:///..., qemu:///system, qemu+ssh://...).

``libvirt`` is imported behind a guard, only in this package and the storage
and connection machinery it uses (:mod:`lifecycle.drivers.storage` with
``lifecycle.drivers._busy`` and ``lifecycle.drivers._streams``, and :mod:`lifecycle.drivers._link`).
The driver is one class made of:

- ``_connections``: the connections to the host, apart from per-domain calls:
  a close callback drops one, the next call reconnects with backoff, calls
  made while the daemon is away raise :class:`DriverUnavailable` (transient)
  instead of crashing, and more connections open while every one is busy or
  stuck; the domain events arrive on the first;
- ``_mapping``: the one place libvirt errors become ours (``map_error``), by
  error code, error domain and a re-read of the domain state, never by message
  (the test driver answers code 1 where QEMU answers 55), every mapped error
  keeping libvirt's own message and having the libvirt error as its
  ``__cause__``; and ``POWER``, the one table from libvirt domain states to
  :class:`PowerState`;
- ``_xml``: domain XML built with ElementTree from the instance, so a hostile
  name is data, never markup, and read back;
- ``_core``: the driver's state and the steps its calls share, the ownership
  rules among them; ``_lifecycle``: spawn, destroy, power, reboot, rescue and
  the reads; ``_disks``: a move's two sides, snapshots and the disks' clean-up.

Domains are named ``lifecycle-<uuid>``; the instance's own name lives in
``<title>`` and in the lifecycle ``<metadata>``.

Ownership reaches the hypervisor: the metadata also stamps the attempt (task
id, epoch, move) that made the domain or last took it over, and a root
volume is named ``<uuid>.<task tag>-<epoch>`` after the attempt that made it.
A call adopts only a domain of its own task (or one using the disk the
database records as current), never one of another attempt (StaleObject), and
one a later epoch took stops it (Fenced); clean-ups delete only volumes named
after their own attempt, and the epoch is checked (``Attempt.holds``) right
before each define, start, undefine and delete of a long call. What is left
between that check and the libvirt call itself is a window of one round trip.
"""

from __future__ import annotations

from lifecycle.drivers.libvirt._connections import libvirt_available
from lifecycle.drivers.libvirt._disks import DiskCalls
from lifecycle.drivers.libvirt._lifecycle import LifecycleCalls
from lifecycle.drivers.libvirt._mapping import POWER
from lifecycle.drivers.libvirt._xml import METADATA_NS as METADATA_NS
from lifecycle.drivers.libvirt._xml import domain_xml

__all__ = ["LibvirtDriver", "domain_xml", "libvirt_available"]

_POWER = POWER
"""The state table under the name it had when this package was one module (tests import it)."""


class LibvirtDriver(LifecycleCalls, DiskCalls):
    """One libvirt host, reached only through its libvirt connection (local or remote).

    ``instances_path`` is a path on the host, never opened here: the driver
    keeps the host's image cache and instance disks in two libvirt ``dir``
    pools under it (:mod:`lifecycle.drivers.storage`). ``domain_type`` is the
    libvirt domain type (``kvm``, ``qemu`` for TCG, and
    always ``test`` on a ``test:///`` URI). ``soft_reboot_seconds`` bounds the
    wait for a guest to go down on a soft reboot before a hard one (Nova: 120).
    ``reconnect_seconds`` bounds a reopen of a lost connection, ``call_seconds``
    a call in flight that does not return, and ``connections`` (1 to 64) the
    connections kept to the host (the constructor: :class:`~lifecycle.drivers.libvirt._core.Core`).
    """
