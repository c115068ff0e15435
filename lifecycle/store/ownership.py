"""Host ownership: which process runs a host's loops, held as a lock the process loses when it dies."""

from __future__ import annotations

import fcntl
import hashlib
import tempfile
from collections.abc import Callable
from contextlib import suppress

import sqlalchemy as sa

from lifecycle.store._base import StoreBase

__all__ = ["HostClaim", "Ownership"]


class HostClaim:
    """Exclusive ownership of one host by one process, until released or the process dies.

    PostgreSQL: a session advisory lock held on a dedicated connection (it
    goes away with the connection, so a dead daemon frees its hosts). SQLite:
    an flock on a file next to the database.
    """

    def __init__(self, host: str, release: Callable[[], None]) -> None:
        self.host = host
        self._release = release
        self.released = False

    def release(self) -> None:
        """Give the host up (idempotent)."""
        if not self.released:
            self.released = True
            self._release()


class Ownership(StoreBase):
    """Host claims: advisory locks on PostgreSQL, lock files on SQLite."""

    def try_claim_host(self, host: str) -> HostClaim | None:
        """Take exclusive ownership of ``host`` if nobody holds it; None if someone does."""
        digest = hashlib.sha1(f"lifecycle-host:{host}".encode()).digest()
        if self.engine.dialect.name == "postgresql":
            return self._advisory_lock(host, int.from_bytes(digest[:8], "big", signed=True))
        return self._lock_file(host, digest.hex()[:16])

    def _advisory_lock(self, host: str, key: int) -> HostClaim | None:
        conn = self.engine.connect()
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
        conn.commit()
        if not got:
            conn.close()
            return None

        def unlock() -> None:
            with suppress(Exception):  # a dead connection has released the lock already
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
            conn.close()

        return HostClaim(host, unlock)

    def _lock_file(self, host: str, name: str) -> HostClaim | None:
        database = self.engine.url.database or ""
        path = f"{database or tempfile.gettempdir() + '/lifecycle-memory'}.host-{name}.lock"
        handle = open(path, "a")  # noqa: SIM115 - held open for the claim's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return HostClaim(host, handle.close)
