"""Create: schedule (and claim), network, disk mapping, spawn; reschedule a failed spawn.

A create starts as every operation does (:meth:`lifecycle.runner.Runner.start`):
its arguments carry the new instance's ``name``, ``flavor`` (as
:meth:`Flavor.as_dict` encodes it) and ``image``, and optionally the
``host`` it must go to and its ``availability_zone``; its preparation gives
it the scheduler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from lifecycle import graph, validation
from lifecycle.errors import DriverError, InvalidInput, NoValidHost, Preempted
from lifecycle.graph import Op
from lifecycle.logs import get_logger
from lifecycle.placement import scheduler_for
from lifecycle.registry import Call, Definition, flavor_param, register
from lifecycle.states import TaskState
from lifecycle.tasks import TaskRun

__all__ = ["CREATE"]

log = get_logger(__name__)


def create(run: TaskRun) -> None:
    """Walk scheduling -> networking -> block_device_mapping -> spawning, then boot.

    A spawn failure releases the host's claim and, while attempts remain and
    no host was named, goes back to scheduling with that host excluded; each
    attempt leaves an audit row saying where it failed and why. A build that
    ends failed (or is taken over by a delete) keeps nothing: no claim, no
    half-made domain, and, as Nova clears it, no host, so no later operation
    can revive the guest on a host that holds no room for it.
    """
    claimed: list[str] = []
    try:
        _build(run, claimed)
    except Preempted:
        raise  # a delete took the build over: the worker's preemption rule cleans up (lifecycle.execute)
    except Exception:  # not BaseException: a process that dies here runs nothing (recovery takes over)
        _give_back(run, claimed[-1:])
        run.ending.fail_fields["host"] = None
        raise


def _build(run: TaskRun, claimed: list[str]) -> None:
    attempts = run.attempts
    tried: list[str] = []
    failures: dict[str, str] = {}
    """Why the spawn failed on each host tried: the hypervisor's own words end up in the build's error."""
    for attempt in range(1, attempts + 1):
        resumed = run.resumed_past(TaskState.SCHEDULING) and run.instance.host is not None
        if resumed:
            host = run.instance.host
            assert host is not None
            _hold_claim(run, host)
            # A worker lost mid-spawn may have made a volume and no domain: nothing will use it, so it goes now.
            run.clear_leftovers(host, why="resuming the build")
        else:
            host = _schedule(run, tried, failures)
            claimed.append(host)
            run.touched.add(host)
        assert host is not None
        run.advance(TaskState.NETWORKING, f"scheduled to {host} (attempt {attempt} of {attempts})", host=host)
        run.advance(TaskState.BLOCK_DEVICE_MAPPING)  # the root disk is made by spawn
        run.advance(TaskState.SPAWNING)
        try:
            with run.build_slot(host):  # a burst onto one host queues here (max_concurrent_builds)
                run.ending.fields["disk"] = run.driver.spawn(run.spec, power_on=True)
        except Preempted:
            raise  # taken over (a newer epoch, a delete): what is on the host is the new owner's, never cleaned here
        except Exception as exc:  # any failure of the driver call, not only DriverError, is this host's
            run.store.claims.release(run.instance.uuid, host)
            tried.append(host)
            failures[host] = f"a spawn there failed ({type(exc).__name__}: {exc})"
            _destroy_quietly(run, host)
            if attempt == attempts:
                raise
            run.retry(f"spawn on {host} failed: {type(exc).__name__}: {exc}; rescheduling", host=None)
            continue
        run.ending.fields["launched_at"] = run.store.clock.now()
        run.ending.end_power = run.read_power()  # here, so that a failure to read it is the build's, cleaned up
        return


def _schedule(run: TaskRun, tried: list[str], failures: dict[str, str]) -> str:
    """Pick a host not tried yet; when none is left, say why each host was passed over, a failed spawn's cause first."""
    assert run.schedule is not None, "create needs a scheduler"
    try:
        return run.schedule(tried)
    except NoValidHost as exc:
        if not failures:
            raise
        raise NoValidHost({**exc.reasons, **failures}) from exc


def _hold_claim(run: TaskRun, host: str) -> None:
    """Make sure a resumed build holds its room on ``host``: a crash may have come between release and retry."""
    if host in run.store.claims.of(run.instance.uuid):
        return
    s, flavor = run.settings.scheduler, run.instance.flavor
    ratios = (s.cpu_allocation_ratio, s.ram_allocation_ratio, s.disk_allocation_ratio)
    if not run.store.claims.claim(
        run.instance.uuid, host, vcpus=flavor.vcpus, memory_mb=flavor.memory_mb, disk_gb=flavor.root_gb, ratios=ratios
    ):
        raise NoValidHost({host: "no room left for the resumed build"})


def _give_back(run: TaskRun, last: list[str]) -> None:
    """Release every claim and destroy what the last attempt built, whatever failed the build."""
    with contextlib.suppress(Exception):  # recorded failure follows; recovery/reaping catch the rest
        run.store.claims.release(run.instance.uuid)
    for host in {*last, *([run.instance.host] if run.instance.host else [])}:
        _destroy_quietly(run, host)


def _destroy_quietly(run: TaskRun, host: str) -> None:
    # A half-made domain on the failed host must not linger there; only this task's own objects go.
    try:
        run.driver_for(host).destroy(run.instance.uuid, destroy_disks=True, attempt=run.attempt())
    except Exception as exc:  # best effort: the sync pass reports what is left, the reaper removes it
        log.warning("failed_build_not_cleaned", host=host, error=f"{type(exc).__name__}: {exc}")


def params(given: Mapping[str, Any]) -> dict[str, Any]:
    """Check a create's arguments: ``name``, ``flavor`` and ``image`` required, ``host`` and ``availability_zone``."""
    checked = dict(given)
    validation.name("instance", checked.get("name"))
    checked["flavor"] = flavor_param(checked.get("flavor"), "a create")
    validation.name("image", checked.get("image"))
    for key, kind in (("host", "host"), ("availability_zone", "availability zone"), *_WHO):
        if checked.get(key) is not None:
            validation.name(kind, checked[key])
    if checked.get("metadata") is not None:
        checked["metadata"] = validation.metadata(checked["metadata"])
    return checked


_WHO = (("project_id", "project_id"), ("user_id", "user_id"))


def guard(call: Call) -> None:
    """Refuse a host that does not exist (:class:`HostNotFound`), and a disk smaller than the image's minimum."""
    if call.params.get("host") is not None:
        call.store.hosts.get(call.params["host"])
    flavor, image = call.instance.flavor, call.image
    if flavor.root_gb < image.min_disk_gb:
        raise InvalidInput(
            f"flavor disk {flavor.root_gb} GiB is smaller than image {image.name}'s minimum {image.min_disk_gb} GiB"
        )


def prepare(run: TaskRun) -> None:
    """Give a build its scheduler, and its attempts: one on a named host, else ``scheduler.max_attempts``.

    A build resumed by recovery (past scheduling: one crashed before is rolled
    back) spawns where it was, once, as it always did.
    """
    if run.recovering:
        return
    requested = run.params.get("host")
    run.schedule = scheduler_for(
        run.store,
        run.settings,
        run.instance.uuid,
        run.instance.flavor,
        run.image,
        requested_host=requested,
        availability_zone=run.params.get("availability_zone"),
    )
    run.attempts = 1 if requested is not None else run.settings.scheduler.max_attempts


def roll_back(run: TaskRun) -> None:
    """Recovery's roll-back of a build: nothing kept (no claim, no half-made domain, no host)."""
    run.store.claims.release(run.instance.uuid)
    if run.instance.host is not None:
        with contextlib.suppress(DriverError):
            run.driver.destroy(run.instance.uuid, destroy_disks=True)
    run.ending.fail_fields["host"] = None  # as a failed build: no claim, so no host to revive it on


CREATE = register(
    Definition(
        graph.operation(Op.CREATE),
        create,
        prepare=prepare,
        roll_back=roll_back,
        roll_back_in={
            # Before a build has a host and a disk there is nothing to resume onto: as Nova, error it.
            TaskState.SCHEDULING: "crashed while scheduling: nothing was built",
            TaskState.NETWORKING: "crashed before the disk and domain were made",
            TaskState.BLOCK_DEVICE_MAPPING: "crashed before the domain was made",
        },
        guard=guard,
        params=params,
    )
)
