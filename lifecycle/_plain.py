"""The one JSON encoding of the records: enums as their values, datetimes as ISO 8601 text.

The records' ``to_dict()`` methods (:mod:`lifecycle.records`, :mod:`lifecycle.audit`) and the CLI's
``--json`` output go through here, so a control plane and the CLI print the same fields the same way.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

__all__ = ["fields_of", "plain"]


def plain(value: Any) -> Any:
    """Return ``value`` as JSON-ready data: records by their ``to_dict()``, containers item by item."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a named tuple is a record, not a list
        return plain(value._asdict())
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return fields_of(value)
    return value


def fields_of(record: Any, leave_out: Iterable[str] = ()) -> dict[str, Any]:
    """Return a dataclass's fields, but ``leave_out``, as JSON-ready data (nested records by their ``to_dict()``)."""
    skipped = set(leave_out)
    return {f.name: plain(getattr(record, f.name)) for f in dataclasses.fields(record) if f.name not in skipped}
