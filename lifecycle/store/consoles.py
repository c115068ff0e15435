"""Console tokens: stored as hashes, bound to an instance on its current host, revocable."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from lifecycle.records import Instance
from lifecycle.store._base import StoreBase
from lifecycle.store._rows import CONSOLE_TOKENS, stamp

__all__ = ["Consoles"]

_C = CONSOLE_TOKENS


class Consoles(StoreBase):
    """Console token rows."""

    def add_token(
        self, token_hash: str, instance: Instance, console_host: str, port: int, expires_at: datetime
    ) -> None:
        """Store a console token's hash for ``instance`` on its current host."""
        values = {
            "token_hash": token_hash,
            "instance_uuid": instance.uuid,
            "host": instance.host,
            "console_host": console_host,
            "console_port": port,
            "created_at": self.clock.now(),
            "expires_at": expires_at,
        }
        with self.engine.begin() as conn:
            conn.execute(sa.insert(_C), values)

    def token(self, token_hash: str) -> dict[str, Any] | None:
        """Return a live (unrevoked, unexpired) token's row, or None."""
        query = sa.select(_C).where(_C.c.token_hash == token_hash, _C.c.revoked_at.is_(None))
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        if row is None or stamp(row["expires_at"]) <= self.clock.now():
            return None
        return dict(row)

    def revoke_tokens(self, uuid: str) -> int:
        """Revoke every live console token of an instance; return how many."""
        query = (
            sa.update(_C)
            .where(_C.c.instance_uuid == uuid, _C.c.revoked_at.is_(None))
            .values(revoked_at=self.clock.now())
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount
