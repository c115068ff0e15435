"""An in-memory hypervisor with the contract's reference semantics and scripted faults.

Used for fast tests and for fault injection; it passes the same contract suite
as the libvirt driver. Faults are scripted on ``fake.faults``:

- ``fail_next(call, error)``: the next ``call`` raises ``error`` before acting;
- ``fail_after(call, error)``: the next ``call`` acts, then raises ``error``
  (the hypervisor did part of the work and reported a failure);
- ``hold(call)``: the next ``call`` blocks until the returned gate is released;
- ``hold("copy")`` and the others above on ``"copy"``: a move's disk copy
  calls ``copy`` once per chunk it moves, so a fault there strikes with the
  copy in flight;
- ``crash_after(call)``: the next ``call`` acts, then raises
  :class:`SimulatedCrash` (a ``BaseException``, so nothing in the engine
  catches it: the caller behaves as if its process died there);
- on the driver itself, ``set_power`` and ``undefine``: change a domain behind the engine's back;
- ``fake.unreachable = True``: every call raises :class:`DriverUnavailable` (a host
  whose hypervisor does not answer) until it is set back to False;
- ``busy_pool(answers)``: the next ``answers`` calls that work on the host's
  storage pool are refused as busy first, as libvirt's storage driver refuses
  a pool call while another call builds a volume there (see
  :mod:`lifecycle.drivers.storage`); the driver waits each out as the libvirt driver
  does (:func:`lifecycle.drivers.base.wait_out`), and past ``busy_seconds`` the call
  fails as a :class:`DriverError` naming the busy pool, never as a missing
  domain.

Disks are volumes with a content (a string): a new one holds its image's
name, ``write`` appends a data marker to a running guest's disk, and a move or
a snapshot carries the content over, so a test can check no data is lost.
Domains carry the stamp of the attempt that made or last took them, and
volumes are named after it, as on libvirt.

With ``state_path`` the domains are kept in a JSON file, so separate processes
(the CLI) see one hypervisor.

The driver is one class made of: ``_faults`` (the script above, ``fake.faults``,
and how a call meets it), ``_host`` (the model, the knobs that change it behind the
engine's back, events, reads), ``_calls`` (spawn, destroy, power, reboot,
rescue) and ``_moves`` (a move's two sides, snapshots).
"""

from __future__ import annotations

from lifecycle.drivers.fake._calls import Calls
from lifecycle.drivers.fake._faults import Gate, SimulatedCrash
from lifecycle.drivers.fake._host import Domain
from lifecycle.drivers.fake._moves import Moves

__all__ = ["FakeDriver", "Gate", "SimulatedCrash"]

_Domain = Domain
"""The fake domain under the name it had when this package was one module (bench/sync.py fills hosts with it)."""


class FakeDriver(Calls, Moves):
    """One fake host. Thread-safe; held calls block outside the state lock.

    ``FakeDriver(name="fake", *, state_path=None)`` (the constructor:
    :class:`~lifecycle.drivers.fake._host.Host`); with ``state_path`` the host is kept
    in that JSON file.
    """
