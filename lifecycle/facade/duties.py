"""``engine.duties``: the periodic jobs an operator (or the daemon) runs over every instance."""

from __future__ import annotations

import builtins

from lifecycle import duties
from lifecycle.context import Services
from lifecycle.resize_window import WindowResult, poll_unconfirmed_resizes

__all__ = ["Duties"]


class Duties:
    """The operator duties of one engine (``engine.duties``)."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def poll_unconfirmed_resizes(self) -> builtins.list[WindowResult]:
        """Confirm (or revert) moves finished longer ago than ``resize_confirm_window``."""
        results = poll_unconfirmed_resizes(self._services)
        self._services.metrics.observe_window(results)
        return results

    def reclaim_queued_deletes(self, interval: float | None = None) -> builtins.list[duties.DutyResult]:
        """Delete for good what was soft-deleted longer ago than ``reclaim_instance_interval`` (or ``interval``)."""
        return duties.reclaim(self._services, interval)

    def offload_shelved_instances(self, older_than: float | None = None) -> builtins.list[duties.DutyResult]:
        """Offload what was shelved on its host longer ago than ``shelved_offload_time`` (or ``older_than``)."""
        return duties.offload_shelved(self._services, older_than)

    def check_build_timeouts(self, timeout: float | None = None) -> builtins.list[duties.DutyResult]:
        """Put builds running longer than ``instance_build_timeout`` (or ``timeout``) in error, their tasks failed."""
        return duties.check_build_timeouts(self._services, timeout)

    def purge_console_tokens(self, grace: float | None = None) -> int:
        """Delete revoked console tokens and those expired more than ``grace`` seconds ago (default an hour)."""
        return duties.purge_console_tokens(self._services, grace)
