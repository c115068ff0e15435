"""What a sync pass and the resize window report: plain records, below the services that make them.

They live apart from :mod:`lifecycle.sweep` and :mod:`lifecycle.resize_window`
(which re-export them) so that the metrics that count them, and the context
the services share, import no service.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["PassSummary", "WindowOutcome", "WindowResult"]


@dataclass(slots=True)
class PassSummary:
    """What one pass saw and did."""

    host: str
    instances: int = 0
    in_sync: int = 0
    drifted: int = 0
    acted: int = 0
    skipped: int = 0
    missing_unconfirmed: int = 0
    """Domains missing fewer than the threshold's consecutive times: counted, not acted on."""
    lost_races: int = 0
    errors: int = 0
    unknown_domains: list[str] = field(default_factory=list)
    rules: dict[str, int] = field(default_factory=dict)
    duration_ms: float = 0.0
    interrupted: bool = False
    """The pass was stopped between two chunks (daemon shutdown)."""
    error: str | None = None
    """Why the pass could not run at all (the hypervisor unreachable...); None when it ran."""
    reaped: list[str] = field(default_factory=list)
    """Our domains whose instance is deleted (or unknown here) that this pass acted on
    (``running_deleted_instance_action``: destroyed, powered off, or logged)."""
    elsewhere: list[str] = field(default_factory=list)
    """Our domains whose live instance is recorded on another host (evacuated away, or moving): left alone."""


class WindowOutcome(enum.StrEnum):
    """What the resize window did with one finished move."""

    DONE = "done"
    """Confirmed (or reverted, as the window's action says)."""
    SKIPPED = "skipped"
    """The table's guard says not now: being deleted, still finishing, or moving on."""
    RETRY = "retry"
    """Refused for a passing reason (a lock, a race): the next pass tries again."""


@dataclass(frozen=True, slots=True)
class WindowResult:
    """What the window did with one finished migration."""

    instance_uuid: str
    migration_id: str
    action: str
    outcome: WindowOutcome
