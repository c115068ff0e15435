"""Where libvirt's numbers become ours: domain states, lifecycle events and errors.

- :data:`POWER`, the one table from libvirt domain states to :class:`PowerState`;
- :data:`EVENTS`, libvirt lifecycle event types to our transitions;
- :func:`map_error`, the one place libvirt errors become ours, by error code,
  error domain and a re-read of the domain state, never by message (the test
  driver answers code 1 where QEMU answers 55); every mapped error keeps
  libvirt's own message, and the driver raises it from the libvirt error (its
  ``__cause__``).
"""

from __future__ import annotations

from typing import Any

from lifecycle.drivers.base import Transition
from lifecycle.drivers.storage import busy
from lifecycle.errors import DomainNotFound, DriverError, DriverUnavailable
from lifecycle.states import PowerState

try:
    import libvirt
except ImportError:  # pragma: no cover - exercised where libvirt-python is absent
    libvirt = None

__all__ = [
    "ERR_INTERNAL",
    "ERR_NO_DOMAIN",
    "ERR_OPERATION_INVALID",
    "EVENTS",
    "POWER",
    "alive",
    "link_error",
    "map_error",
    "message",
    "power_of",
]

# libvirt virDomainState -> PowerState, as Nova maps it (nova/virt/libvirt/guest.py).
POWER = {
    0: PowerState.NOSTATE,  # VIR_DOMAIN_NOSTATE
    1: PowerState.RUNNING,  # VIR_DOMAIN_RUNNING
    2: PowerState.RUNNING,  # VIR_DOMAIN_BLOCKED (idle vCPU)
    3: PowerState.PAUSED,  # VIR_DOMAIN_PAUSED
    4: PowerState.SHUTDOWN,  # VIR_DOMAIN_SHUTDOWN (going down)
    5: PowerState.SHUTDOWN,  # VIR_DOMAIN_SHUTOFF
    6: PowerState.CRASHED,  # VIR_DOMAIN_CRASHED
    7: PowerState.SUSPENDED,  # VIR_DOMAIN_PMSUSPENDED
}
# libvirt lifecycle event types -> our transitions (Nova's mapping); others are dropped.
EVENTS = {2: Transition.STARTED, 3: Transition.PAUSED, 4: Transition.RESUMED, 5: Transition.STOPPED}

ERR_NO_DOMAIN = 42  # VIR_ERR_NO_DOMAIN
ERR_OPERATION_INVALID = 55  # VIR_ERR_OPERATION_INVALID: wrong state (QEMU)
ERR_INTERNAL = 1  # VIR_ERR_INTERNAL_ERROR: wrong state (test driver), or a closed socket
_CONNECTION_CODES = {4, 39, 45}  # VIR_ERR_NO_CONNECT, VIR_ERR_RPC, VIR_ERR_AUTH_FAILED: always the link
# VIR_ERR_SYSTEM_ERROR is any OS error (a missing disk file answers it from the
# storage domain on a live connection); like Nova, only the remote and RPC
# domains make it a lost connection.
_ERR_SYSTEM = 38  # VIR_ERR_SYSTEM_ERROR
_FROM_STORAGE = 18  # VIR_FROM_STORAGE: the storage driver's errors (busy answers: drivers.storage)
_LINK_DOMAINS = {7, 13}  # VIR_FROM_RPC, VIR_FROM_REMOTE


def power_of(dom: Any) -> PowerState:
    """Return a domain's power state, read fresh."""
    return POWER.get(dom.state()[0], PowerState.NOSTATE)


def map_error(exc: Any, call: str, uuid: str | None, conn: Any, *, lost: bool, uri: str) -> DriverError:
    """Map a libvirt error to ours, keeping libvirt's message.

    A lost connection (``lost``: the caller has checked the connection and
    dropped it, so the next call reconnects) is :class:`DriverUnavailable`; a
    missing domain is :class:`DomainNotFound`; anything else is a permanent
    :class:`DriverError`, naming the domain's state re-read when the code
    means "wrong state".
    """
    code, text = exc.get_error_code(), message(exc)
    if lost:
        return DriverUnavailable(f"{call}: connection to {uri} lost: {text}", uuid=uuid, call=call)
    if code == ERR_NO_DOMAIN and uuid is not None:
        return _not_found(uuid, call, text)
    where = f"code {code}, error domain {exc.get_error_domain()}"
    if exc.get_error_domain() == _FROM_STORAGE:  # about a pool or a volume: never a sign of a missing domain
        if busy(exc):
            where += "; a busy answer of the storage driver (transient, see drivers.storage), still busy here"
        return DriverError(f"{call} failed in libvirt ({where}): {text}", uuid=uuid, call=call)
    if uuid is not None and code in (ERR_OPERATION_INVALID, ERR_INTERNAL):
        try:
            where += f"; domain is {power_of(conn.lookupByUUIDString(uuid)).name.lower()}"
        except libvirt.libvirtError as gone:
            if gone.get_error_code() == ERR_NO_DOMAIN:
                return _not_found(uuid, call, text)
    return DriverError(f"{call} failed in libvirt ({where}): {text}", uuid=uuid, call=call)


def link_error(exc: Any) -> bool:
    """Return whether a libvirt error is about the connection itself, by code and error domain."""
    code = exc.get_error_code()
    return code in _CONNECTION_CODES or (code == _ERR_SYSTEM and exc.get_error_domain() in _LINK_DOMAINS)


def message(exc: Any) -> str:
    """Return libvirt's own message for ``exc`` (the exception text when libvirt set none)."""
    return str(exc.get_error_message() or exc)


def alive(conn: Any) -> bool:
    """Return whether ``conn`` answers its liveness check (a dead link or a libvirt error: not alive)."""
    try:
        return bool(conn.isAlive())
    except (libvirt.libvirtError, DriverUnavailable):
        return False


def _not_found(uuid: str, call: str, text: str) -> DomainNotFound:
    """Return :class:`DomainNotFound` for ``uuid`` whose message also names ``call`` and libvirt's text."""
    error = DomainNotFound(uuid, call=call)
    # DomainNotFound's constructor has no room for a detail; its message is its args.
    error.args = (f"{call}: {error}: {text}",)
    return error
