"""The resize confirm window: finished moves nobody confirmed are confirmed (or reverted).

Counted from the moment the migration became finished, not from when the
instance looked resized (Nova bug 1326778). Instances being deleted are
skipped so the delete can still confirm (bug 1301696), as are instances
still finishing; a source host that cannot be reached leaves the migration
finished and the move is retried at the next pass (bug 1855927). Confirm is
the default action: a revert discards what the guest wrote since the move.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import structlog

from lifecycle.errors import LifecycleError
from lifecycle.records import Cause
from lifecycle.states import VmState
from lifecycle.store.db import now

if TYPE_CHECKING:
    from lifecycle.engine import Engine

__all__ = ["WindowResult", "poll_unconfirmed_resizes"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class WindowResult:
    """What the window did with one finished migration."""

    instance_uuid: str
    migration_id: str
    action: str
    outcome: str


def poll_unconfirmed_resizes(engine: Engine) -> list[WindowResult]:
    """Confirm (or revert, per ``resize_window_action``) every move finished longer ago than the window."""
    window = engine.settings.resize_confirm_window
    if window <= 0:
        return []
    action = "revert_resize" if engine.settings.resize_window_action == "revert" else "confirm_resize"
    results = []
    for migration in engine.store.migrations_finished_before(now() - timedelta(seconds=window)):
        instance = engine.store.get_instance(migration.instance_uuid)
        if instance.vm_state is not VmState.RESIZED or instance.task_state is not None:
            outcome = "skipped"  # being deleted, still finishing, or already moving on: not ours to act
        else:
            try:
                engine.run(action, instance.uuid, actor="resize_window", cause=Cause.TIMER)
                outcome = "done"
            except LifecycleError as exc:
                log.info("resize_window_retry_later", instance_uuid=instance.uuid, error=str(exc))
                outcome = "retry"
        results.append(WindowResult(instance.uuid, migration.id, action, outcome))
    return results
