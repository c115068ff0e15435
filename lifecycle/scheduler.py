"""Placement: filter-then-weigh over plain host values, as Nova's filter scheduler.

Everything here is pure: :func:`select_host` takes the hosts (read in one
query by the caller), the request and the settings, and returns a host or
raises :class:`NoValidHost` with every host's rejection reason. Filters return
None to admit a host or a sentence saying why not. Weights are normalised to
[0, 1] across the candidates before their multiplier is applied (Nova's
``normalize``), and the pick is random among the best ``host_subset_size``.
Claiming the chosen host is the store's job (one conditional UPDATE).

At thousands of hosts reading every host row per decision costs far more
than deciding, so :func:`prefilter` says which of the enabled filters a
database can check on the rows and in which order the RAM weigher ranks them,
and :func:`select_ranked` picks from hosts read in that order, a page at a
time, until ``host_subset_size`` of them passed every filter. The database
only narrows and orders: each candidate still goes through every filter here,
so a host is admitted by the same rules, and the pick is the one
:func:`select_host` makes over all hosts.

A decision may also hand the store several hosts to claim in order (the
``*_candidates`` functions, see :func:`order_candidates`): the pick first,
then the other hosts that passed, best first. Engines racing for the same
best host then settle it inside the database, in the claim, instead of
reading the hosts again.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from lifecycle.errors import NoValidHost
from lifecycle.scheduler_specs import spec_matches

__all__ = [
    "EVACUATED_COPIES",
    "FILTERS",
    "HostState",
    "Prefilter",
    "Request",
    "SchedulerSettings",
    "filter_hosts",
    "order_candidates",
    "prefilter",
    "ranked_candidates",
    "select_candidates",
    "select_host",
    "select_ranked",
    "weigh",
]


@dataclass(frozen=True, slots=True)
class HostState:
    """What the scheduler knows about one host; ``vcpus`` None means resources are not tracked."""

    name: str
    availability_zone: str = "nova"
    enabled: bool = True
    up: bool = True
    fenced: bool = False
    """An operator declared the host dead: it is refused whatever the configured filters."""
    evacuated_copies: bool = False
    """The host still holds old copies of instances evacuated away from it: refused whatever the filters."""
    vcpus: int | None = None
    memory_mb: int | None = None
    disk_gb: int | None = None
    vcpus_used: int = 0
    memory_mb_used: int = 0
    disk_gb_used: int = 0
    capabilities: Mapping[str, str] = field(default_factory=dict)
    hypervisor_type: str = "qemu"
    architecture: str = "x86_64"
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Request:
    """What an instance needs."""

    vcpus: int
    memory_mb: int
    disk_gb: int
    availability_zone: str | None = None
    extra_specs: Mapping[str, str] = field(default_factory=dict)
    image_properties: Mapping[str, str] = field(default_factory=dict)
    tried: frozenset[str] = frozenset()


DEFAULT_FILTERS = (
    "RetryFilter",
    "AvailabilityZoneFilter",
    "RamFilter",
    "CoreFilter",
    "DiskFilter",
    "ComputeFilter",
    "ComputeCapabilitiesFilter",
    "ImagePropertiesFilter",
)


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """Scheduler options; defaults are the seed note's and Nova's."""

    filters: tuple[str, ...] = DEFAULT_FILTERS
    """Host filters run in this order; a host any filter refuses is not a candidate (Nova's names)."""
    ram_allocation_ratio: float = 1.5
    """Memory a host may promise, as a multiple of its memory (Nova: 1.5)."""
    cpu_allocation_ratio: float = 16.0
    """vCPUs a host may promise, as a multiple of its cores (Nova: 16.0)."""
    disk_allocation_ratio: float = 1.0
    """Disk a host may promise, as a multiple of its disk (Nova: 1.0)."""
    ram_weight_multiplier: float = 1.0
    """Positive spreads instances over hosts, negative stacks them."""
    metrics_weights: tuple[tuple[str, float], ...] = ()
    """(metric, ratio) pairs for the metrics weigher; empty turns it off."""
    metrics_weight_multiplier: float = 1.0
    """Scales the metrics weigher against the RAM weigher."""
    metrics_unavailable_weight: float = -10000.0
    """Weight of a host lacking a configured metric (Nova's weight_of_unavailable)."""
    host_subset_size: int = 1
    """Pick at random among this many of the best hosts."""
    max_attempts: int = 3
    """Spawn attempts on different hosts before the build fails (RetryFilter)."""


Filter = Callable[[HostState, Request, SchedulerSettings], str | None]

EVACUATED_COPIES = "holds old copies of instances evacuated away from it, not destroyed yet (a heartbeat does it first)"
"""Why a host with evacuated copies pending is refused (see :attr:`HostState.evacuated_copies`)."""


def _retry(host: HostState, req: Request, _s: SchedulerSettings) -> str | None:
    return "already tried for this request" if host.name in req.tried else None


def _zone(host: HostState, req: Request, _s: SchedulerSettings) -> str | None:
    if req.availability_zone is None or req.availability_zone == host.availability_zone:
        return None
    return f"in availability zone {host.availability_zone}, not {req.availability_zone}"


def _capacity(kind: str, total: int | None, used: int, want: int, ratio: float) -> str | None:
    if total is None:
        return None
    limit = total * ratio
    if used + want <= limit:
        return None
    return f"{kind}: needs {want}, {limit - used:g} of {limit:g} free (total {total} x ratio {ratio:g}, used {used})"


def _ram(host: HostState, req: Request, s: SchedulerSettings) -> str | None:
    return _capacity("memory MiB", host.memory_mb, host.memory_mb_used, req.memory_mb, s.ram_allocation_ratio)


def _core(host: HostState, req: Request, s: SchedulerSettings) -> str | None:
    return _capacity("vcpus", host.vcpus, host.vcpus_used, req.vcpus, s.cpu_allocation_ratio)


def _disk(host: HostState, req: Request, s: SchedulerSettings) -> str | None:
    return _capacity("disk GiB", host.disk_gb, host.disk_gb_used, req.disk_gb, s.disk_allocation_ratio)


def _compute(host: HostState, _r: Request, _s: SchedulerSettings) -> str | None:
    if not host.enabled:
        return "disabled"
    return None if host.up else "down (no recent heartbeat from a daemon)"


def _capabilities(host: HostState, req: Request, _s: SchedulerSettings) -> str | None:
    for key, wanted in sorted(req.extra_specs.items()):
        scope, sep, name = key.partition(":")
        if sep and scope != "capabilities":
            continue  # another namespace (hw:, quota:, ...) is not about host capabilities
        name = name if sep else key
        actual = host.capabilities.get(name)
        if not spec_matches(actual, wanted):
            return f"capability {name} is {actual!r}, flavor wants {wanted!r}"
    return None


def _image(host: HostState, req: Request, _s: SchedulerSettings) -> str | None:
    for prop, have in (("architecture", host.architecture), ("hypervisor_type", host.hypervisor_type)):
        wanted = req.image_properties.get(prop)
        if wanted is not None and wanted != have:
            return f"image needs {prop} {wanted}, host has {have}"
    return None


FILTERS: dict[str, Filter] = {
    "RetryFilter": _retry,
    "AvailabilityZoneFilter": _zone,
    "RamFilter": _ram,
    "CoreFilter": _core,
    "DiskFilter": _disk,
    "ComputeFilter": _compute,
    "ComputeCapabilitiesFilter": _capabilities,
    "ImagePropertiesFilter": _image,
}


def filter_hosts(hosts: list[HostState], req: Request, s: SchedulerSettings) -> tuple[list[HostState], dict[str, str]]:
    """Return the hosts every enabled filter admits, and for the others the first reason.

    A fenced host, and one still holding old copies of instances evacuated
    away from it, are refused before any filter, whichever filters are enabled.
    """
    checks = [(name, FILTERS[name]) for name in s.filters]
    passed: list[HostState] = []
    reasons: dict[str, str] = {}
    for host in hosts:
        if host.fenced:  # not a filter one could switch off: a fenced host may still run its dead guests
            reasons[host.name] = "fenced by an operator"
            continue
        if host.evacuated_copies:  # a move or unshelve there would find the instance's stale domain and disk
            reasons[host.name] = EVACUATED_COPIES
            continue
        for name, check in checks:
            reason = check(host, req, s)
            if reason is not None:
                reasons[host.name] = f"{name}: {reason}"
                break
        else:
            passed.append(host)
    return passed, reasons


def _normalise(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high == low:
        return [0.0 for _ in values]
    return [(v - low) / (high - low) for v in values]


def _free_ram(host: HostState, s: SchedulerSettings) -> float:
    if host.memory_mb is None:
        return 0.0
    return host.memory_mb * s.ram_allocation_ratio - host.memory_mb_used


def _metrics_value(host: HostState, s: SchedulerSettings) -> float:
    total = 0.0
    for metric, ratio in s.metrics_weights:
        value = host.metrics.get(metric)
        if value is None:
            return s.metrics_unavailable_weight
        total += ratio * value
    return total


def weigh(hosts: list[HostState], s: SchedulerSettings) -> list[tuple[float, HostState]]:
    """Return (weight, host) pairs, best first: normalised RAM weight plus metrics weight."""
    if not hosts:
        return []
    weights = [s.ram_weight_multiplier * w for w in _normalise([_free_ram(h, s) for h in hosts])]
    if s.metrics_weights:
        metrics = _normalise([_metrics_value(h, s) for h in hosts])
        weights = [w + s.metrics_weight_multiplier * m for w, m in zip(weights, metrics, strict=True)]
    return sorted(zip(weights, hosts, strict=True), key=lambda pair: (-pair[0], pair[1].name))


def order_candidates(
    passed: list[HostState], s: SchedulerSettings, limit: int, rng: random.Random | None = None
) -> list[HostState]:
    """Weigh hosts that passed every filter; return at most ``limit`` of them in the order to claim them.

    First the pick: one at random among the best ``host_subset_size``. Then
    the others, best first: where a concurrent claim took the pick's room,
    the next best that still fits is what a fresh decision would choose.
    """
    ranked = [host for _, host in weigh(passed, s)]
    if not ranked:
        return []
    pick = (rng or random).choice(ranked[: max(1, s.host_subset_size)])
    return [pick, *(host for host in ranked if host is not pick)][: max(1, limit)]


def select_candidates(
    hosts: list[HostState], req: Request, s: SchedulerSettings, limit: int, rng: random.Random | None = None
) -> list[HostState]:
    """Filter, weigh, and return up to ``limit`` hosts to claim in order (:func:`order_candidates`).

    NoValidHost says why nothing fit.
    """
    passed, reasons = filter_hosts(hosts, req, s)
    if not passed:
        raise NoValidHost(reasons)
    return order_candidates(passed, s, limit, rng)


def select_host(
    hosts: list[HostState], req: Request, s: SchedulerSettings, rng: random.Random | None = None
) -> HostState:
    """Filter, weigh, and pick one of the best ``host_subset_size``; NoValidHost says why nothing fit."""
    return select_candidates(hosts, req, s, 1, rng)[0]


@dataclass(frozen=True, slots=True)
class Prefilter:
    """What a database may check on host rows before the filters run, and the order to read them in.

    It admits every host the enabled filters would admit (it may admit more:
    the filters still run on each candidate). Rows come best first for the
    RAM weigher: by free memory (``memory_mb * ram_allocation_ratio -
    memory_mb_used``, 0 for an untracked host) descending when ``ram_order``
    is 1, ascending when -1, and by name within equal free memory or when 0.
    """

    exclude: frozenset[str] = frozenset()
    """Hosts already tried (RetryFilter)."""
    availability_zone: str | None = None
    """Only this zone (AvailabilityZoneFilter); None: any."""
    fits: tuple[tuple[str, str, int, float], ...] = ()
    """(total column, used column, wanted, ratio) for each enabled resource filter: used + wanted <= total x ratio."""
    enabled_and_up: bool = False
    """Only enabled hosts that heartbeated recently (ComputeFilter)."""
    ram_order: int = 1
    ram_allocation_ratio: float = 1.5


_FITS = {
    "RamFilter": ("memory_mb", "memory_mb_used", "ram_allocation_ratio"),
    "CoreFilter": ("vcpus", "vcpus_used", "cpu_allocation_ratio"),
    "DiskFilter": ("disk_gb", "disk_gb_used", "disk_allocation_ratio"),
}


def prefilter(req: Request, s: SchedulerSettings) -> Prefilter | None:
    """Return what a database can check for ``req``, or None when the ranking needs every host (metrics weigher).

    The metrics weigher normalises over every candidate's metrics, which no
    row order reproduces: with it configured each decision reads every host.
    """
    if s.metrics_weights:
        return None
    enabled = set(s.filters)
    wants = {"RamFilter": req.memory_mb, "CoreFilter": req.vcpus, "DiskFilter": req.disk_gb}
    return Prefilter(
        exclude=req.tried if "RetryFilter" in enabled else frozenset(),
        availability_zone=req.availability_zone if "AvailabilityZoneFilter" in enabled else None,
        fits=tuple(
            (total, used, wants[name], getattr(s, ratio))
            for name, (total, used, ratio) in _FITS.items()
            if name in enabled
        ),
        enabled_and_up="ComputeFilter" in enabled,
        ram_order=(s.ram_weight_multiplier > 0) - (s.ram_weight_multiplier < 0),
        ram_allocation_ratio=s.ram_allocation_ratio,
    )


def ranked_candidates(
    pages: Iterable[list[HostState]],
    req: Request,
    s: SchedulerSettings,
    limit: int,
    rng: random.Random | None = None,
) -> list[HostState]:
    """Return as :func:`select_candidates` does from hosts read best first (see :class:`Prefilter`); [] if none passed.

    Pages are read only until ``host_subset_size`` hosts passed every
    filter: the hosts after them rank no better, and the other candidates
    are those that passed on the pages read (a decision reads no more pages
    for the sake of spares).
    """
    want = max(1, s.host_subset_size)
    passed: list[HostState] = []
    for page in pages:
        passed += filter_hosts(page, req, s)[0]
        if len(passed) >= want:
            break
    return order_candidates(passed, s, limit, rng)


def select_ranked(
    pages: Iterable[list[HostState]], req: Request, s: SchedulerSettings, rng: random.Random | None = None
) -> HostState | None:
    """Pick as :func:`select_host` does from hosts read best first (see :class:`Prefilter`); None if none passed."""
    found = ranked_candidates(pages, req, s, 1, rng)
    return found[0] if found else None
