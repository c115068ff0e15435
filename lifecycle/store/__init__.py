"""Persistence: the tables, the schema helpers and the compare-and-swap writes."""

from lifecycle.store.db import DEFAULT_DB_URL, check_schema, downgrade, head_revision, upgrade
from lifecycle.store.store import Store

__all__ = ["DEFAULT_DB_URL", "Store", "check_schema", "downgrade", "head_revision", "upgrade"]
