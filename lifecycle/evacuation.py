"""When a host dies: fencing it, evacuating its instances, and destroying its old copies when it returns.

A host is *down* when no daemon heartbeated it for ``host_down_after``
seconds; an operator *fences* it once it is known dead (who, why and when
are recorded). The scheduler never places on a fenced host, up or not.
Evacuate (:mod:`lifecycle.operations.evacuate`) needs both: down alone may
be a network cut with the guests still running.

When the dead host's hypervisor answers again, :func:`destroy_evacuated`
(run by its daemon before anything else it does for the host) destroys the
domain and disk of every instance evacuated away from it, never starting
them, and audits each on the instance (Nova's ``_destroy_evacuated_instances``).
A heartbeat (the daemon's or ``lifecycle host heartbeat``) runs it too while
such copies are pending (:func:`clear_for_heartbeat`), and is refused with
:class:`EvacuatedCopiesPending` when the hypervisor cannot: a host that still
holds them never counts as up, and the scheduler never places there.
"""

from __future__ import annotations

import builtins
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lifecycle import validation
from lifecycle.audit import Activity, Why
from lifecycle.drivers.base import Attempt
from lifecycle.errors import DriverError, EvacuatedCopiesPending, InvalidInput, LifecycleError, TaskFailed
from lifecycle.graph import DATA_LOSS, Op
from lifecycle.logs import get_logger
from lifecycle.operations.evacuate import check_evacuable
from lifecycle.placement import evacuated_copies
from lifecycle.records import Cause, Host
from lifecycle.states import MigrationStatus, VmState

if TYPE_CHECKING:
    from lifecycle.context import Context

__all__ = [
    "DATA_LOSS",
    "EvacuationOutcome",
    "EvacuationResult",
    "clear_for_heartbeat",
    "destroy_evacuated",
    "evacuate_host",
    "fence",
    "unfence",
]

log = get_logger(__name__)


class EvacuationOutcome(enum.StrEnum):
    """What a host evacuation did with one instance (its text is what logs and the CLI show)."""

    EVACUATED = "evacuated"
    OFFLOADED = "offloaded"
    """A shelved instance: its disk is in its snapshot."""
    FAILED = "failed"
    """The task ran and failed."""
    REFUSED = "refused"
    """Its guard refused it."""


@dataclass(frozen=True, slots=True)
class EvacuationResult:
    """What a host evacuation did with one instance."""

    uuid: str
    outcome: EvacuationOutcome
    host: str | None
    """Where the instance is now."""
    detail: str | None = None


def _host(ctx: Context, name: str) -> Host:
    return ctx.store.hosts.get(validation.name("host", name))


def _reason(reason: object) -> str:
    """Return the operator's reason, stripped: required, one line of at most 1000 characters."""
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput("a reason is required: say why the host is fenced, for whoever reads it")
    text = reason.strip()
    if len(text) > 1000 or validation.unsafe_character(text):
        raise InvalidInput("the reason must be one printable line of at most 1000 characters")
    return text


def fence(ctx: Context, name: str, *, reason: str, actor: str) -> Host:
    """Fence a host: recorded with who, why and when; refused if it is fenced already (the record stays)."""
    host = _host(ctx, name)
    text = _reason(reason)
    validation.name("actor", actor)
    if host.fenced:
        raise InvalidInput(
            f"host {host.name} is already fenced (by {host.fenced_by} at {host.fenced_at}: {host.fenced_reason})"
        )
    log.warning("host_fenced", host=host.name, actor=actor, reason=text)
    return ctx.store.hosts.set_fence(host.name, actor, text)


def unfence(ctx: Context, name: str, *, actor: str) -> Host:
    """Lift a host's fence (a no-op on a host that is not fenced); the scheduler may place there again."""
    host = _host(ctx, name)
    validation.name("actor", actor)
    if not host.fenced:
        return host
    log.warning("host_unfenced", host=host.name, actor=actor, was=host.fenced_reason)
    return ctx.store.hosts.set_fence(host.name, None, None)


def evacuate_host(ctx: Context, name: str, *, actor: str = "api") -> builtins.list[EvacuationResult]:
    """Evacuate every live instance of a down, fenced host, one task each; return what became of each.

    The host's state is checked first (nothing is started when it is not
    down and fenced). One instance that fails or is refused never stops the others.
    """
    host = _host(ctx, name)
    check_evacuable(host, ctx.settings.host_down_after, now=ctx.clock.now())
    results = []
    for instance in ctx.store.instances.list(host.name):
        if instance.vm_state is VmState.DELETED:
            continue
        try:
            if instance.vm_state is VmState.SHELVED:  # its disk is in its snapshot: offloaded, not rebuilt
                ctx.runner.start(Op.SHELVE_OFFLOAD, instance.uuid, actor=actor)
                results.append(EvacuationResult(instance.uuid, EvacuationOutcome.OFFLOADED, None))
                continue
            task = ctx.runner.start(Op.EVACUATE, instance.uuid, actor=actor)
            results.append(
                EvacuationResult(
                    instance.uuid, EvacuationOutcome.EVACUATED, ctx.store.instances.get(task.instance_uuid).host
                )
            )
        except TaskFailed as exc:
            results.append(
                EvacuationResult(
                    instance.uuid, EvacuationOutcome.FAILED, ctx.store.instances.get(instance.uuid).host, exc.error
                )
            )
        except LifecycleError as exc:
            results.append(EvacuationResult(instance.uuid, EvacuationOutcome.REFUSED, instance.host, str(exc)))
    log.info("host_evacuated", host=host.name, **_counts(results))
    return results


def _counts(results: builtins.list[EvacuationResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
    return counts


def destroy_evacuated(ctx: Context, name: str) -> builtins.list[str]:
    """Destroy, on ``name``, the domain and disk of each instance evacuated away from it; return their uuids.

    An instance still recorded on ``name`` (its evacuation failed before it
    left) is not touched. Each destroyed copy is audited on its instance
    (cause sync) and its record goes ``completed``. The domains are
    destroyed, never started. Raises the driver's error when the host does
    not answer (the caller retries; nothing is marked done).
    """
    host = _host(ctx, name).name
    driver = ctx.driver(host)
    destroyed = []
    for migration in ctx.store.moves.evacuations_from(host):
        instance = ctx.store.instances.get(migration.instance_uuid)
        if instance.host == host:
            continue  # the evacuation never left this host: the instance still lives here
        # Only what tasks before the evacuation made: a later task's copy here (a move or an unshelve on
        # its way back to this host) is the instance's current life, never the evacuated one.
        later = {
            Attempt(t.id, 0).task_tag for t in ctx.store.tasks.of(instance.uuid) if t.started_at >= migration.created_at
        }
        stale = [o for o in driver.objects(instance.uuid) if o.task_tag not in later]
        had_domain = any(o.kind == "domain" for o in stale)
        if stale:
            driver.remove(instance.uuid, stale)
        if not had_domain and migration.status is not MigrationStatus.DONE:
            continue  # cleaned on an earlier return: nothing new to say
        where = instance.host or f"no host ({instance.vm_state.value})"
        message = (
            f"destroyed the evacuated copy on {host} (domain and disk; never started): the instance lives on {where}"
        )
        ctx.store.writes.note(
            instance, Why(actor="sync", cause=Cause.SYNC, operation=Activity.DESTROY_EVACUATED, message=message)
        )
        if migration.status is MigrationStatus.DONE:
            ctx.store.moves.update(migration.id, status=MigrationStatus.COMPLETED)
        destroyed.append(migration.instance_uuid)
        log.warning("evacuated_copy_destroyed", host=host, instance_uuid=migration.instance_uuid, now_on=where)
    return destroyed


def clear_for_heartbeat(ctx: Context, name: str) -> builtins.list[str]:
    """Destroy the copies ``name`` still holds of instances evacuated away from it, before it may heartbeat.

    Nothing is asked of the hypervisor when none are pending
    (:func:`lifecycle.placement.evacuated_copies`); otherwise
    :func:`destroy_evacuated` runs and the uuids it destroyed are returned.
    When the hypervisor fails or does not answer, raises
    :class:`EvacuatedCopiesPending` naming the copies still pending (those
    destroyed before the failure are audited and done): the caller writes no heartbeat.
    """
    pending = evacuated_copies(ctx.store, name)
    if not pending:
        return []
    try:
        return destroy_evacuated(ctx, name)
    except DriverError as exc:
        left = evacuated_copies(ctx.store, name)
        if not left:  # those were destroyed; what failed was a leftover of a failed evacuation (the daemon retries)
            log.warning("evacuated_cleanup_incomplete", host=name, error=f"{type(exc).__name__}: {exc}")
            return pending
        raise EvacuatedCopiesPending(name, left, exc) from exc
