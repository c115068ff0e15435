"""The change feed's consumers: each one's name, position and (a webhook's) URL.

A position only moves forward (:meth:`Consumers.save_position`), and retention
(:meth:`lifecycle.store.feed.Feed.prune`) never passes the lowest one.
"""

from __future__ import annotations

import builtins
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from lifecycle.audit import Consumer, Position
from lifecycle.errors import InvalidInput
from lifecycle.store._base import StoreBase
from lifecycle.store._follower import unavailable
from lifecycle.store._rows import stamp as row_stamp
from lifecycle.store.tables import FEED_CONSUMERS

__all__ = ["Consumers"]

_C = FEED_CONSUMERS


def _consumer(r: sa.Row[Any]) -> Consumer:
    return Consumer(r.name, Position(r.tx, r.seq), row_stamp(r.created_at), row_stamp(r.updated_at))


class Consumers(StoreBase):
    """Followers' names, positions and webhook URLs."""

    def register(self, name: str, at: Position, *, url: str | None = None) -> tuple[Consumer, bool]:
        """Return the consumer ``name``, registered at ``at`` if new, and whether it was new.

        ``url`` (a webhook's) is stored with it, also when it was registered without one.
        """
        stamp = self.clock.now()
        values = {"name": name, "tx": at.tx, "seq": at.id, "created_at": stamp, "updated_at": stamp, "url": url}
        with unavailable(self.engine.dialect):
            try:
                with self.engine.begin() as conn:
                    conn.execute(sa.insert(_C), values)
                return Consumer(name, at, stamp, stamp), True
            except IntegrityError:
                pass  # registered before
            if url is not None:
                with self.engine.begin() as conn:
                    where = (_C.c.name == name, _C.c.url.is_distinct_from(url))
                    conn.execute(sa.update(_C).where(*where).values(url=url))
            found = self.get(name)
        if found is None:  # forgotten between the insert and the read: try once more
            return self.register(name, at, url=url)
        return found, False

    def urls(self) -> dict[str, str]:
        """Return the URL each webhook consumer delivers to, by consumer name (those that stored one)."""
        query = sa.select(_C.c.name, _C.c.url).where(_C.c.url.is_not(None))
        with self._read() as conn:
            return {name: url for name, url in conn.execute(query)}

    def get(self, name: str) -> Consumer | None:
        """Return the consumer ``name``, or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(_C).where(_C.c.name == name)).first()
        return None if row is None else _consumer(row)

    def list(self) -> builtins.list[Consumer]:
        """Return every consumer, by name."""
        with self._read() as conn:
            return [_consumer(r) for r in conn.execute(sa.select(_C).order_by(_C.c.name))]

    def save_position(self, name: str, position: Position) -> None:
        """Record that ``name`` has been delivered everything up to ``position`` (a position never goes back).

        Raises :class:`InvalidInput` when the consumer was forgotten meanwhile.
        """
        ahead = sa.tuple_(_C.c.tx, _C.c.seq) < sa.tuple_(sa.literal(position.tx), sa.literal(position.id))
        update = sa.update(_C).where(_C.c.name == name, ahead)
        with unavailable(self.engine.dialect), self.engine.begin() as conn:
            if conn.execute(update.values(tx=position.tx, seq=position.id, updated_at=self.clock.now())).rowcount:
                return
            if conn.execute(sa.select(_C.c.name).where(_C.c.name == name)).first() is None:
                raise InvalidInput(f"consumer {name!r} was forgotten while it followed the feed")

    def forget(self, name: str) -> bool:
        """Remove consumer ``name`` (retention no longer waits for it); return whether it existed."""
        with self.engine.begin() as conn:
            return bool(conn.execute(sa.delete(_C).where(_C.c.name == name)).rowcount)
