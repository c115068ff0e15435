"""Console access: random tokens, stored only as hashes, with an expiry.

A token is 256 random bits (``secrets``), handed to the caller once inside an
access URL and stored as its SHA-256. ``check`` answers with the connection
info only while the token is unrevoked, unexpired, and its instance still
lives, idle or busy with anything but a delete, on the host it was issued for.
Delete and move revoke an instance's tokens.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import quote

import structlog

from lifecycle.errors import DriverError, DriverUnavailable, InvalidInput, InvalidState
from lifecycle.records import Instance
from lifecycle.states import TaskState, VmState
from lifecycle.store import Store
from lifecycle.store.db import now

if TYPE_CHECKING:  # drivers import this package's leaves; a runtime import would cycle
    from drivers.base import Driver

__all__ = ["ConsoleAccess", "ConsoleConnection", "TokenClaim", "check", "issue", "lookup", "serving", "token_hash"]

log = structlog.get_logger(__name__)

_REFUSED_TASKS = frozenset({TaskState.DELETING})
_REFUSED_VM = frozenset({VmState.DELETED, VmState.SOFT_DELETED, VmState.BUILDING})


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
    """Read the console's address from the driver and issue a token for it."""
    if instance.vm_state in _REFUSED_VM or instance.task_state in _REFUSED_TASKS or instance.host is None:
        raise InvalidState(
            "get_vnc_console",
            instance.uuid,
            instance.vm_state,
            instance.task_state,
            set(VmState) - _REFUSED_VM,
            {None, *(set(TaskState) - _REFUSED_TASKS)},
            reason="the instance has no host, so no console" if instance.host is None else None,
        )
    console = driver_for(instance.host).get_vnc_console(instance.uuid)
    address = store.get_host(instance.host).console_address or console.host  # a remote host's own address
    token = secrets.token_urlsafe(32)
    expires_at = now() + timedelta(seconds=ttl_seconds)
    store.add_console_token(token_hash(token), instance, address, console.port, expires_at)
    url = f"{base_url}?path={quote(f'?token={token}', safe='')}"
    return ConsoleAccess(instance.uuid, url, token, expires_at)


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
    row = store.console_token(token_hash(token))
    if row is None:
        return None
    instance = store.get_instance(row["instance_uuid"])
    moved = instance.host != row["host"]
    if moved or instance.host is None or instance.vm_state in _REFUSED_VM or instance.task_state in _REFUSED_TASKS:
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
