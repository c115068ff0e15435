"""One sync pass over one host: a listing, chunked reads, a decision per instance.

The pass reads every domain of the host with one driver call and the host's
instances in chunks (keyset paging, plain stored values), decides each with
:class:`sync.Decider` (:func:`sync.decide` once per distinct case), and
applies them once a chunk's worth of writes gathered (and at the end):
power-only changes as one batched compare-and-swap (each row still checked
against the version it was read at, with its own audit row), operations as
ordinary tasks with actor ``sync`` and the rule in their audit rows, on full
rows read only for them. A racing
user operation wins cleanly: its write changed the version, so ours is
skipped. Errors are contained per instance. Domains no instance owns are
reported, never touched. A domain whose instance lives on another host (one
evacuated away from this host, or a move in flight) is reported and never
started, adopted or reaped here: the instance's row belongs to its own host's
pass, and an evacuated copy is destroyed by :mod:`lifecycle.evacuation`.
One summary line is logged per pass.
"""

from __future__ import annotations

import operator
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING

from lifecycle.audit import Activity, Why
from lifecycle.errors import Conflict, InvalidState, Preempted, TaskFailed
from lifecycle.logs import get_logger
from lifecycle.records import Cause, Instance
from lifecycle.results import PassSummary
from lifecycle.states import PowerState, VmState
from lifecycle.store.syncrows import PowerWrite, SyncRow
from lifecycle.sync import Action, Decider, Decision, Policy

if TYPE_CHECKING:
    from lifecycle.context import Context

__all__ = ["PassSummary", "apply_decision", "sweep_host"]

log = get_logger(__name__)

_UUID = operator.itemgetter(0)


def _why(decision: Decision, cause: Cause, actor: str) -> Why:
    return Why(actor=actor, cause=cause, operation=Activity.SYNC, rule=decision.rule)


def sweep_host(
    ctx: Context,
    host: str,
    policy: Policy,
    *,
    chunk: int = 1000,
    actor: str = "sync",
    stop: threading.Event | None = None,
) -> PassSummary:
    """Run one sync pass over ``host`` and return its summary; ``stop`` ends it between chunks."""
    started = time.perf_counter()
    summary = PassSummary(host)
    observed_at = ctx.clock.now()
    listing = ctx.driver(host).list_instances()
    decider = Decider(policy, observed_at)
    pending = _Pending(host, actor)
    seen: set[str] = set()
    for rows in ctx.store.sync.rows(host, observed_at, chunk):
        if stop is not None and stop.is_set():
            summary.interrupted = True
            break
        seen.update(map(_UUID, rows))
        _decide_chunk(summary, pending, rows, listing.owned, decider)
        if pending.size() >= chunk:
            _flush(ctx, summary, pending, stop)
    _flush(ctx, summary, pending, stop)
    if not summary.interrupted:
        leftovers = sorted(u for u in listing.owned if u not in seen)
        summary.elsewhere = _living_elsewhere(ctx, host, leftovers)
        leftovers = [u for u in leftovers if u not in summary.elsewhere]
        handled = _running_deleted(ctx, host, leftovers, listing.owned, summary)
        summary.unknown_domains = [u for u in leftovers if u not in handled] + list(listing.foreign)
    summary.duration_ms = round((time.perf_counter() - started) * 1000, 2)
    log.info(
        "sync_pass",
        host=host,
        instances=summary.instances,
        in_sync=summary.in_sync,
        drifted=summary.drifted,
        acted=summary.acted,
        skipped=summary.skipped,
        missing_unconfirmed=summary.missing_unconfirmed,
        lost_races=summary.lost_races,
        errors=summary.errors,
        unknown_domains=len(summary.unknown_domains),
        duration_ms=summary.duration_ms,
        interrupted=summary.interrupted,
    )
    return summary


def _group(
    rows: list[SyncRow], owned: Mapping[str, PowerState], decider: Decider
) -> list[tuple[Decision, list[SyncRow]]]:
    """Group the rows by what a decision reads of them, then decide each group once.

    This loop is the per-row work of a pass (10,000 rows at a big host), so
    it only builds a key and appends: no record, no call per row.
    """
    groups: dict[tuple[str, str | None, int, int, PowerState | None, bool], list[SyncRow]] = {}
    observed = owned.get
    for row in rows:
        key = (row[2], row[3], row[4], row[5], observed(row[0]), row[6])  # see SyncRow and Decider.__call__
        group = groups.get(key)
        if group is None:
            group = groups[key] = []
        group.append(row)
    return [(decider(*key), group) for key, group in groups.items()]


@dataclass(slots=True)
class _Pending:
    """What a pass decided and has not written yet: written once a chunk's worth gathered, and at the end.

    Gathering across chunks makes a pass over a big host with 1% drift one
    write transaction (and one full-row read for its operations) instead of
    one per chunk; the bound keeps its memory flat however big the host.
    """

    host: str
    actor: str
    counts: list[tuple[str, int, int]] = field(default_factory=list)
    powers: list[PowerWrite] = field(default_factory=list)
    acting: list[tuple[SyncRow, Decision]] = field(default_factory=list)

    def size(self) -> int:
        return len(self.counts) + len(self.powers) + len(self.acting)


def _decide_chunk(
    summary: PassSummary,
    pending: _Pending,
    rows: list[SyncRow],
    owned: Mapping[str, PowerState],
    decider: Decider,
) -> None:
    summary.instances += len(rows)
    for decision, group in _group(rows, owned, decider):
        _count(summary, decision, len(group))
        if decision.action in (Action.UPDATE_POWER, Action.RECORD):  # the write resets the missing count itself
            assert decision.power is not None
            why = _why(decision, Cause.SYNC, pending.actor)
            pending.powers.extend(
                PowerWrite(
                    r.uuid, r.version, VmState(r.vm_state), pending.host, PowerState(r.power_state), decision.power, why
                )
                for r in group
            )
            continue
        pending.counts.extend(
            (r.uuid, r.version, decision.missing_count) for r in group if r.missing_count != decision.missing_count
        )
        if decision.changes_something:
            pending.acting.extend((r, decision) for r in group)


def _flush(ctx: Context, summary: PassSummary, pending: _Pending, stop: threading.Event | None) -> None:
    """Write what the pass decided: missing counts, power changes in one batch, then the operations."""
    counts, powers, acting = pending.counts, pending.powers, pending.acting
    pending.counts, pending.powers, pending.acting = [], [], []
    ctx.store.sync.set_missing_counts(counts)
    if powers:
        _apply_powers(ctx, summary, powers)
    if acting:
        _run_decisions(ctx, summary, acting, pending.actor, stop)


def _run_decisions(
    ctx: Context,
    summary: PassSummary,
    acting: list[tuple[SyncRow, Decision]],
    actor: str,
    stop: threading.Event | None,
) -> None:
    """Run the RUN and MARK_ERROR decisions on full rows, each only if the row is still as the pass read it."""
    full = ctx.store.sync.instances_by_uuid([row.uuid for row, _ in acting])
    for row, decision in acting:
        if stop is not None and stop.is_set():  # each task runs to its end; the rest wait for the next pass
            summary.interrupted = True
            return
        instance = full.get(row.uuid)
        if instance is None or instance.version != row.version:
            summary.lost_races += 1  # changed since the light read: whoever changed it wins
            continue
        _guarded(summary, row.uuid, partial(apply_decision, ctx, instance, decision, Cause.SYNC, actor))


def _living_elsewhere(ctx: Context, host: str, uuids: list[str]) -> list[str]:
    """Return the domains here whose instance is live and recorded on another host: never to be started here."""
    if not uuids:
        return []
    rows = ctx.store.sync.instances_by_uuid(uuids)
    found = [
        u for u in uuids if (r := rows.get(u)) is not None and r.vm_state is not VmState.DELETED and r.host != host
    ]
    if found:
        log.warning("domains_of_instances_elsewhere", host=host, count=len(found), instance_uuids=found)
    return found


def _running_deleted(
    ctx: Context, host: str, uuids: list[str], powers: Mapping[str, PowerState], summary: PassSummary
) -> set[str]:
    """Apply ``running_deleted_instance_action`` to our domains whose instance is deleted or unknown here.

    Only domains named as ours (``owned``) are candidates; foreign domains
    are never touched. A deleted instance's domain is acted on once
    ``running_deleted_instance_timeout`` has passed since the delete, with an
    audit row on the instance. A domain no row here knows is only reported,
    unless ``reap_unknown_domains`` (there is no row to audit then: the log
    line is its record). Returns the uuids handled (not listed as unknown).
    """
    action = ctx.settings.running_deleted_instance_action
    if not uuids or action == "noop":
        return set()
    rows = ctx.store.sync.instances_by_uuid(uuids)
    cutoff = ctx.clock.now() - timedelta(seconds=ctx.settings.running_deleted_instance_timeout)
    handled: set[str] = set()
    for uuid in uuids:
        row = rows.get(uuid)
        if row is None and not ctx.settings.reap_unknown_domains:
            continue
        if row is not None and (row.vm_state is not VmState.DELETED or (row.deleted_at or cutoff) > cutoff):
            continue  # a live instance's domain elsewhere (a move in flight), or a delete too recent
        if action == "shutdown" and powers.get(uuid) is PowerState.SHUTDOWN:
            handled.add(uuid)
            continue
        try:
            _act_on_leftover(ctx, host, uuid, action)
        except Exception as exc:  # per domain: the next pass tries again
            summary.errors += 1
            log.warning("running_deleted_failed", host=host, instance_uuid=uuid, error=f"{type(exc).__name__}: {exc}")
            continue
        handled.add(uuid)
        summary.reaped.append(uuid)
        if row is not None and action != "log":
            ctx.store.writes.note(
                row,
                Why(
                    actor="sync",
                    cause=Cause.SYNC,
                    operation=Activity.REAP,
                    rule=f"running_deleted_{action}",
                    message=f"{action}: a domain of this deleted instance was still on {host}",
                ),
            )
        log.warning("running_deleted_instance", host=host, instance_uuid=uuid, action=action, known=row is not None)
    return handled


def _act_on_leftover(ctx: Context, host: str, uuid: str, action: str) -> None:
    driver = ctx.driver(host)
    if action == "reap":
        driver.destroy(uuid, destroy_disks=True)
    elif action == "shutdown":
        driver.power_off(uuid, timeout=0, retry_interval=0)


def _count(summary: PassSummary, decision: Decision, times: int) -> None:
    if decision.action is Action.SKIP:
        summary.skipped += times
    elif decision.action is Action.COUNT_MISSING:
        summary.missing_unconfirmed += times
    elif decision.changes_something:
        summary.drifted += times
        summary.rules[decision.rule] = summary.rules.get(decision.rule, 0) + times
    else:
        summary.in_sync += times


def _apply_powers(ctx: Context, summary: PassSummary, powers: list[PowerWrite]) -> None:
    try:
        won = ctx.store.sync.record_powers(powers)
    except Exception:  # the batch failed as a whole: retry one by one so one bad row costs one
        log.exception("sync_batch_failed", count=len(powers))
        for write in powers:
            _guarded(summary, write.uuid, partial(_one_power, ctx, write))
        return
    lost = won.count(False)
    summary.lost_races += lost
    summary.acted += len(won) - lost


def _one_power(ctx: Context, write: PowerWrite) -> None:
    if not ctx.store.sync.record_powers([write])[0]:
        raise Conflict(write.uuid, {"version": write.version}, None)


def _guarded(summary: PassSummary, uuid: str, action: Callable[[], object]) -> object:
    try:
        result = action()
    except (Conflict, InvalidState, Preempted):
        summary.lost_races += 1  # a user operation got there first: it wins
        return None
    except TaskFailed as exc:
        summary.errors += 1
        log.warning("sync_action_failed", instance_uuid=uuid, error=exc.error)
        return None
    except Exception as exc:  # contained per instance: one bad row must not end the pass
        summary.errors += 1
        log.exception("sync_instance_failed", instance_uuid=uuid, error=str(exc))
        return None
    summary.acted += 1
    return result


def apply_decision(ctx: Context, instance: Instance, decision: Decision, cause: Cause, actor: str) -> object:
    """Carry out a RUN or MARK_ERROR decision (also used by the event path)."""
    if decision.action is Action.MARK_ERROR:
        assert decision.power is not None
        return ctx.store.writes.mark_error(instance, decision.power, _why(decision, cause, actor))
    if decision.action in (Action.UPDATE_POWER, Action.RECORD):
        assert decision.power is not None
        return ctx.store.sync.set_power_many([(instance, decision.power, _why(decision, cause, actor))])[0]
    assert decision.operation is not None
    return ctx.runner.start(decision.operation, instance.uuid, params={"rule": decision.rule}, actor=actor, cause=cause)
