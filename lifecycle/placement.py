"""Placement glue between the pure scheduler and the store: host states and claims.

:func:`scheduler_for` returns the function a create task calls in its
scheduling step: read the hosts best first for the RAM weigher, with the
filters the database can check applied in the query (:func:`scheduler.prefilter`),
a page at a time until enough pass every filter, pick one, and claim it
atomically. Reading only those pages keeps a decision at 10,000 hosts a small
fraction of reading every host row; when nothing passes (or the metrics
weigher is on) every host is read, so :class:`NoValidHost` gives each host's
reason. A claim lost to a concurrent engine (the host filled up between the
read and the claim) reads the hosts again; it does not use up one of the
``max_attempts`` spawn attempts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta

from lifecycle.config import Settings
from lifecycle.errors import NoValidHost
from lifecycle.records import Flavor, Host, Image
from lifecycle.scheduler import HostState, Request, SchedulerSettings, prefilter, select_host, select_ranked
from lifecycle.store import Store
from lifecycle.store.db import now

__all__ = ["host_is_up", "host_states", "pick_host", "scheduler_for"]

_CLAIM_RACES = 5
_FIRST_PAGE = 16
"""Hosts read by the first page of a decision; each next page is four times larger (a rare fit costs log N reads)."""


def host_is_up(host: Host, down_after: float) -> bool:
    """Whether a daemon owning the host heartbeated within the last ``down_after`` seconds."""
    return host.last_heartbeat is not None and host.last_heartbeat >= now() - timedelta(seconds=down_after)


def host_states(hosts: list[Host], down_after: float) -> list[HostState]:
    """Turn host records into scheduler values; a host without a recent heartbeat is down."""
    return [
        HostState(
            name=h.name,
            availability_zone=h.availability_zone,
            enabled=h.enabled,
            up=host_is_up(h, down_after),
            fenced=h.fenced,
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


def pick_host(store: Store, request: Request, s: SchedulerSettings, down_after: float) -> HostState:
    """Filter, weigh and pick a host for ``request`` (not claimed yet); NoValidHost gives each host's reason."""
    pre = prefilter(request, s)
    if pre is not None:
        up_since = now() - timedelta(seconds=down_after)

        def pages() -> Iterator[list[HostState]]:
            offset, size = 0, _FIRST_PAGE
            while page := store.ranked_hosts(pre, up_since, offset, size):
                yield host_states(page, down_after)
                offset, size = offset + size, size * 4

        chosen = select_ranked(pages(), request, s)
        if chosen is not None:
            return chosen
    # Nothing passed (or the metrics weigher needs every host): read them all, so NoValidHost gives every reason.
    return select_host(host_states(store.list_hosts(), down_after), request, s)


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

    def claim(host: str) -> bool:
        return store.claim(uuid, host, flavor.vcpus, flavor.memory_mb, flavor.root_gb, ratios)

    def schedule(tried: list[str]) -> str:
        if requested_host is not None:
            # A named host bypasses the filters (Nova's forced host) but not the fence or the claim.
            if store.get_host(requested_host).fenced:
                raise NoValidHost({requested_host: "fenced by an operator"})
            if requested_host in tried or not claim(requested_host):
                raise NoValidHost({requested_host: "the requested host has no room for this flavor, or failed"})
            return requested_host
        request = Request(
            flavor.vcpus, flavor.memory_mb, flavor.root_gb, availability_zone, specs, image.properties, frozenset(tried)
        )
        for _ in range(_CLAIM_RACES):
            chosen = pick_host(store, request, s, settings.host_down_after)
            if claim(chosen.name):
                return chosen.name
        raise NoValidHost({"*": f"lost the claim race {_CLAIM_RACES} times in a row"})

    return schedule
