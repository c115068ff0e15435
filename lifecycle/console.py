"""Console access: random tokens, stored only as hashes, with an expiry.

A token is 256 random bits (``secrets``), handed to the caller once inside an
access URL and stored as its SHA-256. ``check`` answers with the connection
info only while the token is unrevoked, unexpired, and its instance still
lives, idle or busy with anything but a delete, on the host it was issued for.
Delete and move revoke an instance's tokens; :func:`purge` (a daemon duty)
deletes the revoked ones and those expired more than :data:`EXPIRED_GRACE` ago.

A remote host (a qemu URI with a transport, or naming another machine: see
:func:`requires_console_address`) must have a console address: its guests'
VNC servers listen on that machine, so the address libvirt reports for them
(``vnc_listen``, 127.0.0.1 by default) would lead the proxy to a port of its
own machine, perhaps another guest's screen. No token is issued for such a
host without one, and a token issued before is never honoured. Nor may that address
lead back to the proxy's machine (:func:`check_console_address`): loopback,
``localhost`` and the unspecified address are refused for such a host.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, parse_qsl, quote, urlsplit

import sqlalchemy as sa

from lifecycle.errors import DriverError, DriverUnavailable, InvalidInput, InvalidState
from lifecycle.logs import get_logger
from lifecycle.records import Host, Instance
from lifecycle.states import TaskState, VmState
from lifecycle.store import Store
from lifecycle.store._rows import CONSOLE_TOKENS

if TYPE_CHECKING:  # drivers import this package's leaves; a runtime import would cycle
    from lifecycle.drivers.base import Driver

__all__ = [
    "EXPIRED_GRACE",
    "ConsoleAccess",
    "ConsoleConnection",
    "TokenClaim",
    "check",
    "check_console_address",
    "issue",
    "lookup",
    "purge",
    "requires_console_address",
    "serving",
    "token_hash",
]

log = get_logger(__name__)

EXPIRED_GRACE = 3600.0
"""Seconds an expired token's row is kept, so a console refused as expired can still be explained."""
_REFUSED_TASKS = frozenset({TaskState.DELETING})
_REFUSED_VM = frozenset({VmState.DELETED, VmState.SOFT_DELETED, VmState.BUILDING, VmState.SHELVED_OFFLOADED})
_CONSOLE_VM = frozenset(VmState) - _REFUSED_VM
_CONSOLE_TASKS = frozenset({None, *(set(TaskState) - _REFUSED_TASKS)})
_LOCAL_NAMES = frozenset({"", "localhost", "127.0.0.1", "::1"})
_TLS_PORT = 16514  # libvirt's transport (and so its port) for a qemu URI naming a host without one
_SYSTEM_SOCKETS = frozenset({"/run/libvirt/libvirt-sock", "/var/run/libvirt/libvirt-sock"})
_SESSION_SOCKET = re.compile(r"/run/user/[0-9]+/libvirt/libvirt-sock")


@dataclass(frozen=True, slots=True)
class ConsoleAccess:
    """What a user gets: the URL to open (it embeds the token) and when it expires."""

    instance_uuid: str
    url: str
    token: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ConsoleConnection:
    """What a console proxy gets for a valid token: where to connect."""

    instance_uuid: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class TokenClaim:
    """A token the database holds as valid, before the hypervisor is asked whether its guest still serves it."""

    connection: ConsoleConnection
    host: str
    """The instance's host: the hypervisor to ask."""
    issued_port: int


def token_hash(token: str) -> str:
    """Return the SHA-256 (hex) a token is stored and logged as: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue(
    store: Store, driver_for: Callable[[str], Driver], instance: Instance, base_url: str, ttl_seconds: float
) -> ConsoleAccess:
    """Read the console's address from the driver and issue a token for it.

    Refused (:class:`InvalidState`) for an instance deleted, being deleted, building, offloaded, or with
    no host; refused (:class:`InvalidInput`, nothing asked of the hypervisor) when its host is remote and has
    no console address.
    """
    host = store.hosts.get(_console_host(instance))
    if requires_console_address(host.driver_uri) and host.console_address is None:
        raise InvalidInput(_no_console_address(host))
    console = driver_for(host.name).get_vnc_console(instance.uuid)
    address = host.console_address or console.host
    token = secrets.token_urlsafe(32)
    expires_at = store.clock.now() + timedelta(seconds=ttl_seconds)
    store.consoles.add_token(token_hash(token), instance, address, console.port, expires_at)
    url = f"{base_url}?path={quote(f'?token={token}', safe='')}"
    return ConsoleAccess(instance.uuid, url, token, expires_at)


def _console_host(instance: Instance) -> str:
    """Return the instance's host; raise :class:`InvalidState` if no guest of it can serve a console, saying why."""
    vm, task = instance.vm_state, instance.task_state
    if vm in _REFUSED_VM or task in _REFUSED_TASKS:
        raise InvalidState("get_vnc_console", instance.uuid, vm, task, _CONSOLE_VM, _CONSOLE_TASKS)
    if instance.host is None:  # an instance in error has a console only while on a host: not listed as allowed
        raise InvalidState(
            "get_vnc_console",
            instance.uuid,
            vm,
            task,
            _CONSOLE_VM - {vm},
            _CONSOLE_TASKS,
            reason=(
                f"the instance has no host, so no console: in vm_state {vm.value} it has one only while on a host"
                " (it was never built, or its host was removed)"
            ),
        )
    return instance.host


def requires_console_address(uri: str) -> bool:
    """Say whether a host reached through ``uri`` must be registered with a console address.

    True for a qemu URI with a network transport (``qemu+tcp``, ``+tls``, ``+ssh``, ``+libssh``,
    ``+libssh2``, any but ``+unix``), naming a machine other than this one (``qemu://host/system``:
    libvirt's default transport is TLS), or tunnelled (a local name with a port other than 16514, a
    ``socket=`` other than libvirt's own); its guests' VNC servers listen on that machine. False for
    the machine's own libvirtd and for the test and fake drivers. Raises :class:`InvalidInput` for a
    URI that does not parse.
    """
    if not isinstance(uri, str):
        raise InvalidInput(f"driver URI must be a string, got {type(uri).__name__}")
    try:
        parts = urlsplit(uri.strip())
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018  # parsing the port is part of the check
    except ValueError as exc:
        raise InvalidInput(f"invalid hypervisor URI {uri!r}: it does not parse ({exc})") from None
    driver, _, transport = parts.scheme.lower().partition("+")
    if driver != "qemu":
        return False
    return (transport != "" and transport != "unix") or host not in _LOCAL_NAMES or _tunnelled(parts)


def _tunnelled(parts: SplitResult) -> bool:
    """Say whether a URI naming this machine may still reach another one's libvirtd through a tunnel.

    A local name with a port other than libvirt's (``qemu://localhost:16515/system``) is a
    forwarded port, and a ``socket=`` other than libvirt's own for the path is a forwarded
    socket (``ssh -L``): either may end on any machine.
    """
    if parts.port is not None and parts.port != _TLS_PORT:
        return True
    own = _SYSTEM_SOCKETS if parts.path == "/system" else frozenset()
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        path = os.path.normpath(value) if value else value
        if key == "socket" and path not in own and not (parts.path == "/session" and _SESSION_SOCKET.fullmatch(path)):
            return True
    return False


def check_console_address(uri: str, address: str) -> None:
    """Refuse (:class:`InvalidInput`) a console address that leads a remote host's consoles to the proxy's machine.

    For a host that needs a console address (:func:`requires_console_address`), a loopback
    address, ``localhost`` (or a name under it) and the unspecified address (``0.0.0.0``,
    ``::``) all reach the proxy's own machine, perhaps another guest's screen. One exception:
    the loopback address the URI itself names (``qemu+tcp://127.0.0.2/system`` with
    ``127.0.0.2``), a libvirtd listening there, whose guests are on this machine too.
    """
    if not requires_console_address(uri) or not _leads_here(address):
        return
    here = _ip(address)
    if here is not None and not here.is_unspecified and here == _ip(urlsplit(uri.strip()).hostname or ""):
        return
    raise InvalidInput(
        f"console address {address!r} is this machine (loopback, localhost or unspecified), but the host's URI {uri}"
        " may reach another machine: console tokens would lead to a port of the console proxy's own machine, perhaps"
        " another guest's screen; give the host's management address, where its guests' VNC servers listen"
    )


def _leads_here(address: str) -> bool:
    """Say whether connecting to ``address`` reaches this machine whatever machine it is said on."""
    name = address.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    ip = _ip(address)
    return ip is not None and (ip.is_loopback or ip.is_unspecified)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return the address ``text`` spells, legacy IPv4 forms (``127.1``, ``0``) and IPv4-mapped IPv6 included."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        try:  # what connect() would make of it: inet_aton reads 127.1, 0x7f.1 and 0 too
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _no_console_address(host: Host) -> str:
    return (
        f"host {host.name} ({host.driver_uri}) is remote and has no console address: its guests' VNC servers"
        " listen on that machine, and the address libvirt reports for them would lead to this machine instead;"
        f" register it with its management address: lifecycle host add {host.name} --uri {host.driver_uri}"
        " --console-address ADDR"
    )


def check(store: Store, token: str, driver_for: Callable[[str], Driver] | None = None) -> ConsoleConnection | None:
    """Return where to connect for ``token``, or None when it is not (or no longer) valid.

    With ``driver_for``, the hypervisor is asked too (Nova's ``validate_console_port``): the
    instance's domain must still serve its console on the port the token was issued for. A
    guest stopped since has none, and libvirt gives a freed port to the next guest started:
    an old token must never reach that other guest's screen.
    """
    claim = lookup(store, token)
    if claim is None or driver_for is None:
        return None if claim is None else claim.connection
    try:
        return serving(claim, driver_for)
    except DriverUnavailable as exc:  # the host does not answer: nothing to bridge to now
        log.info("console_not_served", instance_uuid=claim.connection.instance_uuid, error=str(exc))
        return None


def lookup(store: Store, token: str) -> TokenClaim | None:
    """Check the database's half of :func:`check`: the token is valid, its instance still where it was issued."""
    if not isinstance(token, str) or not token or len(token) > 256:
        raise InvalidInput("a console token is a non-empty string of at most 256 characters")
    row = store.consoles.token(token_hash(token))
    if row is None:
        return None
    instance = store.instances.get(row["instance_uuid"])
    moved = instance.host != row["host"]
    if moved or instance.host is None or instance.vm_state in _REFUSED_VM or instance.task_state in _REFUSED_TASKS:
        return None
    host = store.hosts.get(instance.host)
    if requires_console_address(host.driver_uri) and host.console_address is None:  # a token issued before the rule
        log.warning("console_no_address", instance_uuid=instance.uuid, host=host.name, fix=_no_console_address(host))
        return None
    connection = ConsoleConnection(instance.uuid, row["console_host"], row["console_port"])
    return TokenClaim(connection, instance.host, row["console_port"])


def serving(claim: TokenClaim, driver_for: Callable[[str], Driver]) -> ConsoleConnection | None:
    """Check the hypervisor's half of :func:`check`: the guest still serves its console on the issued port.

    Raises :class:`DriverUnavailable` when the host does not answer (try
    again later); any other driver error means there is nothing to bridge to.
    """
    uuid = claim.connection.instance_uuid
    try:
        now_serving = driver_for(claim.host).get_vnc_console(uuid)
    except DriverUnavailable:
        raise
    except DriverError as exc:  # no domain, or not running: nothing to bridge to
        log.info("console_not_served", instance_uuid=uuid, error=f"{type(exc).__name__}: {exc}")
        return None
    if now_serving.port != claim.issued_port:
        log.info("console_port_changed", instance_uuid=uuid, issued=claim.issued_port)
        return None
    return claim.connection


def purge(store: Store, *, grace: float = EXPIRED_GRACE, at: datetime | None = None) -> int:
    """Delete the revoked tokens and those expired more than ``grace`` seconds before ``at`` (now); return how many.

    Neither can ever be honoured again: deleting them changes no answer of :func:`check`. The daemon
    runs this every minute; each run is one transaction, logged with its counts (``console_tokens_purged``).
    """
    cutoff = (store.clock.now() if at is None else at) - timedelta(seconds=grace)
    t = CONSOLE_TOKENS
    # Kept here until the store offers it (Consoles.delete_console_tokens); the SQL is the store's kind.
    with store.engine.begin() as conn:
        revoked = conn.execute(sa.delete(t).where(t.c.revoked_at.is_not(None))).rowcount
        expired = conn.execute(sa.delete(t).where(t.c.expires_at < cutoff.astimezone(UTC))).rowcount
    if revoked or expired:
        log.info("console_tokens_purged", expired=expired, revoked=revoked, grace=grace)
    return int(revoked + expired)
