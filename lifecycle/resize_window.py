"""The resize confirm window: finished moves nobody confirmed are confirmed (or reverted).

Counted from the moment the migration became finished, not from when the
instance looked resized (Nova bug 1326778). Instances being deleted are
skipped so the delete can still confirm (bug 1301696), as are instances
still finishing; a source host that cannot be reached leaves the migration
finished and the move is retried at the next pass (bug 1855927). Confirm is
the default action: a revert discards what the guest wrote since the move.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from lifecycle.errors import InvalidState, LifecycleError
from lifecycle.graph import Op
from lifecycle.logs import get_logger
from lifecycle.records import Cause
from lifecycle.results import WindowOutcome, WindowResult

if TYPE_CHECKING:
    from lifecycle.context import Context

__all__ = ["WindowOutcome", "WindowResult", "poll_unconfirmed_resizes"]

log = get_logger(__name__)


def poll_unconfirmed_resizes(ctx: Context) -> list[WindowResult]:
    """Confirm (or revert, per ``resize_window_action``) every move finished longer ago than the window."""
    window = ctx.settings.resize_confirm_window
    if window <= 0:
        return []
    action = Op.REVERT_RESIZE if ctx.settings.resize_window_action == "revert" else Op.CONFIRM_RESIZE
    results = []
    for migration in ctx.store.moves.finished_before(ctx.clock.now() - timedelta(seconds=window)):
        uuid = migration.instance_uuid
        try:
            ctx.runner.start(action, uuid, actor="resize_window", cause=Cause.TIMER)
            outcome = WindowOutcome.DONE
        except InvalidState:
            outcome = (
                WindowOutcome.SKIPPED
            )  # being deleted, still finishing, or moving on: the table's guard says not now
        except LifecycleError as exc:
            log.info("resize_window_retry_later", instance_uuid=uuid, error=str(exc))
            outcome = WindowOutcome.RETRY
        results.append(WindowResult(uuid, migration.id, action, outcome))
    return results
