"""Which instances a listing asks for, checked: filters, and a keyset page (Nova's ``limit`` and ``marker``).

A page is the ``limit`` instances after ``marker`` (the uuid of the last instance of the previous page) in
the order (created_at, uuid), which does not change as instances come and go: a client walking the pages
sees every instance that existed throughout exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from lifecycle import validation
from lifecycle.errors import InvalidInput
from lifecycle.states import STATUSES, VmState

__all__ = ["MAX_LIMIT", "Listing"]

MAX_LIMIT = 1000
"""The largest page (Nova's ``api.max_limit`` default)."""


def _optional(kind: str, value: object) -> str | None:
    return None if value is None else validation.name(kind, value)


@dataclass(frozen=True, slots=True)
class Listing:
    """The filters and page of :meth:`lifecycle.Engine.list`, each checked (:class:`InvalidInput` otherwise)."""

    host: str | None = None
    vm_state: VmState | str | None = None
    """A :class:`VmState` or its stored value; kept as the :class:`VmState`."""
    status: str | None = None
    """A status word (``ACTIVE``, ``SHUTOFF``...), matched on the states it derives from."""
    project_id: str | None = None
    include_deleted: bool = False
    limit: int | None = None
    """At most this many instances (1 to :data:`MAX_LIMIT`); None: all."""
    marker: str | None = None
    """The uuid of the last instance of the previous page: this page starts after it. With ``project_id``,
    an instance of that project: another's is refused as unknown, like a uuid that is no instance."""

    def __post_init__(self) -> None:
        _optional("host", self.host)
        _optional("project_id", self.project_id)
        if self.vm_state is not None:
            if not isinstance(self.vm_state, str) or self.vm_state not in {v.value for v in VmState}:
                raise InvalidInput(f"unknown vm_state {self.vm_state!r}: expected one of {', '.join(VmState)}")
            object.__setattr__(self, "vm_state", VmState(self.vm_state))
        if self.status is not None and self.status not in STATUSES:
            raise InvalidInput(f"unknown status {self.status!r}: expected one of {', '.join(sorted(STATUSES))}")
        if not isinstance(self.include_deleted, bool):
            raise InvalidInput(f"include_deleted must be True or False, got {self.include_deleted!r}")
        if self.limit is not None:
            validation.count("limit", self.limit, low=1, high=MAX_LIMIT)
        if self.marker is not None:
            object.__setattr__(self, "marker", validation.uuid(self.marker, "marker"))
