"""Create: schedule (and claim), network, disk mapping, spawn; reschedule a failed spawn."""

from __future__ import annotations

import contextlib

from lifecycle.errors import DriverError
from lifecycle.states import TaskState
from lifecycle.store.db import now
from lifecycle.tasks import Steps, TaskRun

__all__ = ["STEPS"]


def create(run: TaskRun) -> None:
    """Walk scheduling -> networking -> block_device_mapping -> spawning, then boot.

    A spawn failure releases the host's claim and, while attempts remain and
    no host was named, goes back to scheduling with that host excluded; each
    attempt leaves an audit row saying where it failed and why.
    """
    attempts = run.attempts
    tried: list[str] = []
    for attempt in range(1, attempts + 1):
        resumed = run.resumed_past(TaskState.SCHEDULING) and run.instance.host is not None
        if resumed:
            host = run.instance.host
        else:
            assert run.schedule is not None, "create needs a scheduler"
            host = run.schedule(tried)
        assert host is not None
        run.advance(f"scheduled to {host} (attempt {attempt} of {attempts})", host=host)  # networking
        run.advance()  # block_device_mapping: the root disk is made by spawn
        run.advance()  # spawning
        try:
            run.driver.spawn(run.spec, power_on=True)
        except DriverError as exc:
            run.store.release_claims(run.instance.uuid, host)
            tried.append(host)
            if attempt == attempts:
                raise
            _destroy_quietly(run)
            run.retry(f"spawn on {host} failed: {exc}; rescheduling", host=None)
            continue
        run.fields["launched_at"] = now()
        return


def _destroy_quietly(run: TaskRun) -> None:
    # A half-made domain on the failed host must not linger there.
    with contextlib.suppress(DriverError):
        run.driver.destroy(run.instance.uuid, destroy_disks=True)


STEPS: dict[str, Steps] = {"create": create}
