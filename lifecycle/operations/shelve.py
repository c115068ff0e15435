"""Shelve, shelve offload and unshelve, as Nova's compute manager does them.

shelve walks shelving (power the guest off: cleanly within ``shutdown_timeout``,
then hard) -> shelving_image_pending_upload -> shelving_image_uploading (the
root disk is read over the host's libvirt connection into a snapshot image the
engine keeps under ``image_store_dir``, made whole from the instance's image
and inspected as any image, registered as image ``shelved-<uuid>``). With
``shelved_offload_time`` 0 (Nova's default) the walk goes on to
shelving_offloading: the domain and disk are destroyed, the claims released,
the host forgotten, and the instance ends ``shelved_offloaded``; otherwise it
ends ``shelved`` and the daemon offloads it once that time has passed.

unshelve walks unshelving -> spawning. A shelved instance still on its host is
powered on there; an offloaded one is scheduled (or sent to ``host``), its
claim taken, and spawned from its snapshot, the disk laid out over its image
as any disk is. The snapshot image is deleted once the success is written
(never by a worker taken over or crashed before that), as is a shelved
instance's snapshot when it is deleted.

Failures never lose the disk: a snapshot that fails puts a running or paused
guest back as it was, so the instance keeps its vm_state; an offload refuses
without the snapshot's file or with the guest running; a host that does not
answer keeps the instance ``shelved`` (the daemon's duty tries again), and a
down, fenced one is offloaded in the database alone; an unshelve whose spawn
fails gives its claim back and stays offloaded. Every step is repeat-safe,
so recovery resumes each of these task_states.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

from lifecycle import graph
from lifecycle.errors import DomainNotFound, DriverError, DriverUnavailable, ImageNotFound, InvalidInput, Preempted
from lifecycle.graph import Op
from lifecycle.placement import host_is_up, scheduler_for
from lifecycle.records import Image
from lifecycle.registry import Call, Definition, register, target_host
from lifecycle.snapshots import OWNER, SNAPSHOT_FORMAT, drop_snapshot, image_store, snapshot_name, snapshot_of
from lifecycle.states import MigrationStatus, PowerState, TaskState, VmState
from lifecycle.store.moves import EVACUATION
from lifecycle.tasks import TaskRun

__all__ = ["SHELVE", "SHELVE_OFFLOAD", "UNSHELVE"]


T = TaskState


# -- shelve ---------------------------------------------------------------------------------


def shelve(run: TaskRun) -> None:
    """Walk shelving -> shelving_image_pending_upload -> shelving_image_uploading [-> shelving_offloading]."""
    try:
        _shelve(run)
    except Preempted:
        _after_lost(run)
        raise
    except DriverUnavailable:
        run.before_power = PowerState.NOSTATE  # the host does not answer: nothing known changed, the vm_state stays
        raise
    except Exception:
        if not run.ending.changed:
            _power_back(run)
        raise


def _power_back(run: TaskRun) -> None:
    """After a failed snapshot, put a guest that ran (or was paused) back as it was: its vm_state is then kept."""
    with contextlib.suppress(Exception):  # best effort: the failure being raised is what gets recorded
        if run.source_vm_state in (VmState.ACTIVE, VmState.PAUSED):
            run.driver.power_on(run.spec)
        if run.source_vm_state is VmState.PAUSED:
            run.driver.pause(run.instance.uuid)


def _shelve(run: TaskRun) -> None:
    if not run.resumed_past(T.SHELVING_IMAGE_UPLOADING):  # a run resumed at shelving_offloading has its image
        # A paused guest cannot answer an ACPI request: it goes off at once, as Nova's would after its timeout.
        run.power_off(timeout=0 if run.source_vm_state is VmState.PAUSED else None)
        run.advance(T.SHELVING_IMAGE_PENDING_UPLOAD)
        run.advance(T.SHELVING_IMAGE_UPLOADING)
        image = _upload(run)
        if run.settings.shelved_offload_time != 0:  # kept on its host: for the daemon after that time, or never
            return
        run.advance(
            T.SHELVING_OFFLOADING, f"snapshot {image.name} stored; offloading at once (shelved_offload_time is 0)"
        )
    try:
        _offload(run)
    except DriverError as exc:
        # The snapshot is safe and the guest off: keep the host, end shelved; the daemon offloads it later.
        run.ending.note = f"offload failed ({exc}); the instance stays shelved on {run.instance.host} for the daemon"
        run.ending.changed = False
        run.ending.end_power = PowerState.SHUTDOWN  # powered off by this task (a host gone silent cannot be asked)


def _upload(run: TaskRun) -> Image:
    uuid = run.instance.uuid
    directory = image_store(run.settings)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # shelved disks are nobody else's to read
    except OSError as exc:
        raise DriverError(f"image store {directory}: {exc.strerror or exc}", uuid=uuid, call="snapshot") from None
    target = directory / f"{snapshot_name(uuid)}.{SNAPSHOT_FORMAT}"
    run.driver.snapshot(run.spec, target)
    image = snapshot_of(run.store, uuid)
    if image is not None and image.path != str(target):  # kept under an image_store_dir changed since
        drop_snapshot(run.store, uuid)
        image = None
    if image is None:  # else a resumed run found the row its crashed predecessor wrote
        image = run.store.images.add(
            snapshot_name(uuid),
            str(target),
            SNAPSHOT_FORMAT,
            run.instance.flavor.root_gb,
            {OWNER: uuid, "base_image": run.image.name},
        )
    return image


def _offload(run: TaskRun) -> None:
    """Destroy the domain and disk once the snapshot is known kept and the guest off; forget the host."""
    uuid, host = run.instance.uuid, run.instance.host
    image = snapshot_of(run.store, uuid)
    if image is None:
        raise ImageNotFound(snapshot_name(uuid), [])  # never offload the only copy of a disk
    kept = Path(image.path)
    if not kept.is_file() or kept.stat().st_size == 0:
        raise DriverError(
            f"snapshot {image.name} has no file at {kept}: not offloaded, the disk on {host} is the only copy",
            uuid=uuid,
            call="shelve_offload",
        )
    with contextlib.suppress(DomainNotFound):  # gone already (a resumed offload): nothing runs
        if run.driver.get_info(uuid) is PowerState.RUNNING:
            raise DriverError(
                f"{uuid} runs on {host} although shelved (started outside the engine): not offloaded, its disk "
                "holds what was written since the snapshot; unshelve it, then shelve it again",
                uuid=uuid,
                call="shelve_offload",
            )
    run.store.consoles.revoke_tokens(uuid)
    run.driver.destroy(uuid, destroy_disks=True)
    run.ending.changed = True  # the domain is gone: a failure from here on cannot keep the vm_state
    run.store.claims.release(uuid, task=run.task)
    run.ending.fields["host"] = None
    run.ending.fields["disk"] = None
    run.ending.end_power = PowerState.NOSTATE


def _after_lost(run: TaskRun) -> None:
    """Drop the snapshot this worker stored after a delete took the shelve over (and dropped it first)."""
    with contextlib.suppress(Exception):
        if run.store.instances.get(run.instance.uuid).vm_state is VmState.DELETED:
            drop_snapshot(run.store, run.instance.uuid, run.settings)


def shelve_offload(run: TaskRun) -> None:
    """Destroy a shelved instance's domain and disk, release its claims and forget its host.

    On a host that does not answer it stays shelved (the duty tries again),
    unless the host is down and fenced: then the offload is done in the
    database alone (the snapshot holds the disk), with an ``evacuation``
    record so that the host's daemon destroys the leftover domain and disk,
    never starting them, when its hypervisor answers again.
    """
    try:
        _offload(run)
    except DriverUnavailable as exc:
        assert run.instance.host is not None
        host = run.store.hosts.get(run.instance.host)
        if not (host.fenced and not host_is_up(host, run.settings.host_down_after, now=run.store.clock.now())):
            run.before_power = PowerState.NOSTATE  # nothing known changed: it stays shelved there
            raise
        _offload_from_dead_host(run, f"{exc}")


def _offload_from_dead_host(run: TaskRun, why: str) -> None:
    uuid, source = run.instance.uuid, run.instance.host
    assert source is not None
    image = snapshot_of(run.store, uuid)
    if image is None or not Path(image.path).is_file():
        raise DriverError(f"{source} is dead and the snapshot of {uuid} has no file: nothing to offload to", uuid=uuid)
    # An evacuation to nowhere: the host's daemon destroys the leftover when its hypervisor answers again.
    run.record_migration(EVACUATION, source, None, status=MigrationStatus.DONE)
    run.store.consoles.revoke_tokens(uuid)
    run.ending.changed = True
    run.store.claims.release(uuid, task=run.task)
    run.ending.fields["host"] = None
    run.ending.fields["disk"] = None
    run.ending.end_power = PowerState.NOSTATE
    run.ending.note = (
        f"{source} is down and fenced ({why}): offloaded in the database, the disk kept in {image.name};"
        f" the domain left on {source} is destroyed when its hypervisor answers again"
    )


# -- unshelve -------------------------------------------------------------------------------


def guard(call: Call) -> None:
    """Refuse ``host`` for an instance that still has one (or a host that does not exist), and nothing to bring back."""
    instance, host = call.instance, call.params.get("host")
    if host is not None and instance.vm_state is not VmState.SHELVED_OFFLOADED:
        raise InvalidInput(
            f"unshelve --host is only for an offloaded instance; {instance.uuid} is {instance.vm_state.value}"
            + (f" on {instance.host}" if instance.host else "")
        )
    if host is not None:
        call.store.hosts.get(host)  # HostNotFound names the known ones
    if instance.vm_state is VmState.SHELVED_OFFLOADED and snapshot_of(call.store, instance.uuid) is None:
        raise InvalidInput(
            f"instance {instance.uuid} is offloaded but its snapshot {snapshot_name(instance.uuid)} is gone"
        )


def prepare(run: TaskRun) -> None:
    """Give an offloaded instance's unshelve its scheduler (a shelved one stays where it is)."""
    if run.source_vm_state is VmState.SHELVED_OFFLOADED:
        run.schedule = scheduler_for(
            run.store,
            run.settings,
            run.instance.uuid,
            run.instance.flavor,
            run.image,
            requested_host=run.params.get("host"),
            availability_zone=None,
        )


def unshelve(run: TaskRun) -> None:
    """Walk unshelving -> spawning: power on where it is, or spawn from the snapshot on a scheduled host.

    The snapshot is deleted only once the instance's success is written
    (:attr:`lifecycle.ending.Ending.after_success`): a worker taken over or crashed before that never touches it.
    """
    uuid = run.instance.uuid
    if run.source_vm_state is VmState.SHELVED:
        run.advance(T.SPAWNING)
        try:
            run.driver.power_on(run.spec)
        except DriverUnavailable:
            run.before_power = PowerState.NOSTATE  # the host does not answer: it stays shelved there
            raise
    else:
        _spawn_offloaded(run)
    run.ending.fields["launched_at"] = run.store.clock.now()
    run.ending.after_success.append(lambda: drop_snapshot(run.store, uuid, run.settings))


def _spawn_offloaded(run: TaskRun) -> None:
    uuid = run.instance.uuid
    snapshot = snapshot_of(run.store, uuid)
    if snapshot is None:
        raise ImageNotFound(snapshot_name(uuid), [])
    run.ending.fail_fields |= {"host": None, "disk": None}  # a failed unshelve stays offloaded: no host, no claim
    if run.resumed_past(T.UNSHELVING) and run.instance.host is not None:
        dest = run.instance.host
    else:
        assert run.schedule is not None, "an offloaded unshelve needs a scheduler"
        run.store.tasks.fence(run.task)  # a worker taken over since its start claims nothing
        run.store.claims.release(uuid, task=run.task)  # a crash between a claim and its step left one behind
        dest = run.schedule([])
        run.touched.add(dest)
        run.advance(T.SPAWNING, f"scheduled to {dest}; spawning from snapshot {snapshot.name}", host=dest)
    try:
        # A copy from an earlier life of the instance there (an evacuated one) is destroyed first, never started.
        run.clear_leftovers(dest, why="spawning from the snapshot")
        # The copy records its progress on the step, and stops there once the task is no longer ours.
        spec = replace(run.spec, disk=None)
        run.ending.fields["disk"] = run.driver.spawn_from_snapshot(
            spec, Path(snapshot.path), power_on=True, progress=run.copy_progress
        )
    except Preempted:
        raise
    except Exception:
        run.store.claims.release(uuid, dest, task=run.task)  # a fenced worker releases nothing
        with contextlib.suppress(Exception):  # nothing half-made may stay on the host, and only this task's goes
            run.on(dest).destroy(uuid, destroy_disks=True, attempt=run.attempt())
        raise


SHELVE = register(Definition(graph.operation(Op.SHELVE), shelve))
SHELVE_OFFLOAD = register(Definition(graph.operation(Op.SHELVE_OFFLOAD), shelve_offload))
UNSHELVE = register(
    Definition(graph.operation(Op.UNSHELVE), unshelve, prepare=prepare, guard=guard, params=target_host)
)
