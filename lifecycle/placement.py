"""Placement glue between the pure scheduler and the store: host states and claims.

:func:`scheduler_for` returns the function a create task calls in its
scheduling step: read the hosts best first for the RAM weigher, with the
filters the database can check applied in the query (:func:`scheduler.prefilter`),
a page at a time until enough pass every filter, and claim room on one of
them atomically. Reading only those pages keeps a decision at 10,000 hosts a
small fraction of reading every host row; when nothing passes (or the metrics
weigher is on) every host is read, so :class:`NoValidHost` gives each host's
reason.

The claim goes to the store with up to :data:`_CANDIDATES` of the hosts that
passed, the pick first, then best first (:func:`scheduler.order_candidates`),
and takes the first that still fits, in one statement
(:meth:`Store.claims.claim_first`): engines that chose the same host settle it inside
the database, the losers landing on the next candidates (logged as
``claim_took_later_candidate``). Only when no candidate fits any more (all of
them filled up between the read and the claim) is the claim lost
(``claim_lost``): the hosts are read again, up to :data:`_CLAIM_RACES` times;
that does not use up one of the ``max_attempts`` spawn attempts. A requested
host is claimed alone.

A host that still holds old copies of instances evacuated away from it
(:func:`evacuated_copies`) is never a destination, named or not, whichever
filters are enabled: a move or unshelve there would find the stale domain and
disk. Its heartbeat destroys them first (:meth:`Engine.hosts.heartbeat`), so such a
host is normally down too; the claimed host is checked anyway (one query: the
filters that see "down" may be disabled, a heartbeat may predate the
evacuation, a named host skips the filters): one holding such copies gets its
claim back and is refused for the rest of the decision.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import datetime, timedelta

from lifecycle.config import Settings
from lifecycle.errors import NoValidHost
from lifecycle.logs import get_logger
from lifecycle.records import Flavor, Host, Image
from lifecycle.scheduler import (
    EVACUATED_COPIES,
    HostState,
    Request,
    SchedulerSettings,
    prefilter,
    ranked_candidates,
    select_candidates,
)
from lifecycle.states import MigrationStatus
from lifecycle.store import Store

__all__ = [
    "candidate_hosts",
    "evacuated_copies",
    "host_is_up",
    "host_states",
    "pick_host",
    "scheduler_for",
    "up_since",
]

log = get_logger(__name__)

_CLAIM_RACES = 5
"""Times a decision reads the hosts again after every candidate filled up before it could claim one."""
_CANDIDATES = 8
"""Hosts one claim may try, in order (more than the engines likely to race for the same host at once)."""
_FIRST_PAGE = 16
"""Hosts read by the first page of a decision; each next page is four times larger (a rare fit costs log N reads)."""


def up_since(down_after: float, *, now: datetime) -> datetime:
    """Return the oldest heartbeat that still counts as up at ``now``: the one definition of a host being up."""
    return now - timedelta(seconds=down_after)


def host_is_up(host: Host, down_after: float, *, now: datetime) -> bool:
    """Whether a daemon owning the host heartbeated within ``down_after`` seconds before ``now`` (:func:`up_since`)."""
    return host.last_heartbeat is not None and host.last_heartbeat >= up_since(down_after, now=now)


def evacuated_copies(store: Store, host: str) -> list[str]:
    """Return the instances whose old copy ``host`` still holds: evacuated away (record ``done``), not living there.

    Such a copy is destroyed by :func:`lifecycle.evacuation.destroy_evacuated`,
    which then marks the record ``completed``; until then the host may not
    heartbeat and is never a destination.
    """
    pending = []
    for migration in store.moves.evacuations_from(host):
        if migration.status is MigrationStatus.DONE and store.instances.get(migration.instance_uuid).host != host:
            pending.append(migration.instance_uuid)
    return pending


def host_states(
    hosts: list[Host], down_after: float, evacuated: Collection[str] = (), *, now: datetime
) -> list[HostState]:
    """Turn host records into scheduler values; a host without a heartbeat in ``down_after`` s before ``now`` is down.

    ``evacuated`` names hosts known to hold evacuated copies (:func:`evacuated_copies`): refused by the scheduler.
    """
    return [
        HostState(
            name=h.name,
            availability_zone=h.availability_zone,
            enabled=h.enabled,
            up=host_is_up(h, down_after, now=now),
            fenced=h.fenced,
            evacuated_copies=h.name in evacuated,
            vcpus=h.vcpus,
            memory_mb=h.memory_mb,
            disk_gb=h.disk_gb,
            vcpus_used=h.vcpus_used,
            memory_mb_used=h.memory_mb_used,
            disk_gb_used=h.disk_gb_used,
            capabilities=h.capabilities,
            hypervisor_type=h.hypervisor_type,
            architecture=h.architecture,
            metrics=h.metrics,
        )
        for h in hosts
    ]


def candidate_hosts(
    store: Store,
    request: Request,
    s: SchedulerSettings,
    down_after: float,
    limit: int = _CANDIDATES,
    evacuated: Collection[str] = (),
) -> list[HostState]:
    """Filter and weigh hosts for ``request``: up to ``limit`` to claim in order, the pick first (none claimed yet).

    Hosts in ``evacuated`` are known to hold evacuated copies: refused. NoValidHost gives each host's reason.
    """
    pre = prefilter(request, s)
    if pre is not None:
        moment = store.clock.now()
        since = up_since(down_after, now=moment)

        def pages() -> Iterator[list[HostState]]:
            offset, size = 0, _FIRST_PAGE
            while page := store.hosts.ranked(pre, since, offset, size):
                yield host_states(page, down_after, evacuated, now=moment)
                offset, size = offset + size, size * 4

        found = ranked_candidates(pages(), request, s, limit)
        if found:
            return found
    # Nothing passed (or the metrics weigher needs every host): read them all, so NoValidHost gives every reason.
    everyone = host_states(store.hosts.list(), down_after, evacuated, now=store.clock.now())
    return select_candidates(everyone, request, s, limit)


def pick_host(store: Store, request: Request, s: SchedulerSettings, down_after: float) -> HostState:
    """Filter, weigh and pick a host for ``request`` (not claimed yet); NoValidHost gives each host's reason."""
    return candidate_hosts(store, request, s, down_after, limit=1)[0]


def scheduler_for(
    store: Store,
    settings: Settings,
    uuid: str,
    flavor: Flavor,
    image: Image,
    *,
    requested_host: str | None,
    availability_zone: str | None,
) -> Callable[[list[str]], str]:
    """Return the create task's scheduling function: pick and claim a host not in ``tried``."""
    s = settings.scheduler
    ratios = (s.cpu_allocation_ratio, s.ram_allocation_ratio, s.disk_allocation_ratio)
    specs: Mapping[str, str] = dict(flavor.extra_specs)
    want = {"vcpus": flavor.vcpus, "memory_mb": flavor.memory_mb, "disk_gb": flavor.root_gb}

    def schedule(tried: list[str]) -> str:
        if requested_host is not None:
            # A named host bypasses the filters (Nova's forced host) but not the fence, evacuated copies or the claim.
            if store.hosts.get(requested_host).fenced:
                raise NoValidHost({requested_host: "fenced by an operator"})
            if evacuated_copies(store, requested_host):
                raise NoValidHost({requested_host: EVACUATED_COPIES})
            if requested_host in tried or not store.claims.claim(uuid, requested_host, **want, ratios=ratios):
                raise NoValidHost({requested_host: "the requested host has no room for this flavor, or failed"})
            return requested_host
        request = Request(
            flavor.vcpus, flavor.memory_mb, flavor.root_gb, availability_zone, specs, image.properties, frozenset(tried)
        )
        evacuated: set[str] = set()
        races = 0
        while races < _CLAIM_RACES:
            names = [h.name for h in candidate_hosts(store, request, s, settings.host_down_after, evacuated=evacuated)]
            host = store.claims.claim_first(uuid, names, **want, ratios=ratios)
            if host is not None and evacuated_copies(store, host):
                # Checked once claimed (one query): its heartbeat destroys them first, so such a host is seldom up.
                store.claims.release(uuid, host)  # (instance, host) is the claim's key: only this one goes
                log.warning("host_holds_evacuated_copies", host=host)
                evacuated.add(host)  # refused from now on; each such host is found once
                continue
            if host == names[0]:
                return host
            if host is not None:  # the pick filled up or was being claimed: the race was settled in the claim
                log.info("claim_took_later_candidate", host=host, first_choice=names[0], rank=names.index(host))
                return host
            races += 1
            log.info("claim_lost", candidates=len(names), attempt=races)
        raise NoValidHost(
            {
                "*": f"no candidate host had room at its claim {_CLAIM_RACES} times in a row (engines racing for"
                " the same room, or a resource whose filter is disabled: the claim checks vCPU, RAM and disk)"
            }
        )

    return schedule
