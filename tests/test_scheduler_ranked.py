"""Placement without reading every host: the database narrows and orders, the filters and weighers still decide."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from lifecycle import Engine, NoValidHost
from lifecycle.placement import host_states, pick_host
from lifecycle.scheduler import (
    DEFAULT_FILTERS,
    HostState,
    Request,
    SchedulerSettings,
    filter_hosts,
    prefilter,
    select_host,
    select_ranked,
    weigh,
)

SETTINGS = [
    SchedulerSettings(),
    SchedulerSettings(ram_weight_multiplier=-1.0),
    SchedulerSettings(ram_weight_multiplier=0.0),
    SchedulerSettings(host_subset_size=3),
    SchedulerSettings(filters=("RetryFilter", "ComputeFilter"), ram_allocation_ratio=1.0),
    SchedulerSettings(filters=DEFAULT_FILTERS[:3], cpu_allocation_ratio=1.0, disk_allocation_ratio=2.0),
]
REQUESTS = [
    Request(1, 512, 1),
    Request(4, 8192, 40, availability_zone="az1", extra_specs={"capabilities:ssd": "true"}),
    Request(2, 2048, 10, tried=frozenset({"h03", "h07", "h11"}), image_properties={"architecture": "aarch64"}),
    Request(64, 1, 1),
]


def _hosts(rng: random.Random, count: int) -> list[HostState]:
    """Hosts of every kind: zones, disabled, down, fenced, untracked, nearly full, with and without ssd."""
    hosts = []
    for i in range(count):
        tracked = rng.random() > 0.1
        hosts.append(
            HostState(
                f"h{i:02d}",
                availability_zone=f"az{i % 3}",
                enabled=rng.random() > 0.1,
                up=rng.random() > 0.1,
                fenced=rng.random() < 0.05,
                vcpus=rng.choice([4, 8]) if tracked else None,
                memory_mb=rng.choice([4096, 16384]) if tracked else None,
                disk_gb=rng.choice([50, 200]) if tracked else None,
                vcpus_used=rng.randint(0, 64),
                memory_mb_used=rng.choice([0, 1024, 4096, 4096, 20000]),
                disk_gb_used=rng.randint(0, 150),
                capabilities={"ssd": rng.choice(["true", "false"])},
                architecture=rng.choice(["x86_64", "x86_64", "aarch64"]),
            )
        )
    return hosts


def _best_first(hosts: list[HostState], s: SchedulerSettings, size: int) -> Iterator[list[HostState]]:
    """Pages in the order the Prefilter documents (what the database returns), without any filtering."""

    def free(h: HostState) -> float:
        return 0.0 if h.memory_mb is None else h.memory_mb * s.ram_allocation_ratio - h.memory_mb_used

    sign = (s.ram_weight_multiplier > 0) - (s.ram_weight_multiplier < 0)
    ordered = sorted(hosts, key=lambda h: (-sign * free(h), h.name))
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


@pytest.mark.parametrize("s", SETTINGS)
@pytest.mark.parametrize("req", REQUESTS)
def test_ranked_pages_pick_what_select_host_picks(s: SchedulerSettings, req: Request) -> None:
    """Over many random host sets, picking from best-first pages gives select_host's pick or its NoValidHost."""
    for seed in range(30):
        hosts = _hosts(random.Random(seed), 25)
        try:
            expected: str | None = select_host(hosts, req, s, random.Random(seed)).name
        except NoValidHost:
            expected = None
        chosen = select_ranked(_best_first(hosts, s, 4), req, s, random.Random(seed))
        assert (None if chosen is None else chosen.name) == expected, seed


def test_ranked_pages_are_read_only_until_enough_passed() -> None:
    """When the first page holds host_subset_size passing hosts, no later page is read."""
    hosts = [HostState(f"h{i}", vcpus=8, memory_mb=8192 - i, disk_gb=100) for i in range(12)]
    read: list[int] = []

    def pages() -> Iterator[list[HostState]]:
        for start in range(0, 12, 4):
            read.append(start)
            yield hosts[start : start + 4]

    chosen = select_ranked(pages(), Request(1, 512, 1), SchedulerSettings(host_subset_size=2), random.Random(1))
    assert chosen is not None and chosen.name in {"h0", "h1"} and read == [0]


def test_the_metrics_weigher_needs_every_host() -> None:
    """With metrics weights the ranking is not a row order, so no prefilter is offered."""
    assert prefilter(Request(1, 1, 1), SchedulerSettings(metrics_weights=(("cpu.idle", 1.0),))) is None
    assert prefilter(Request(1, 1, 1), SchedulerSettings()) is not None


def _best_of_all(hosts: list[HostState], req: Request, s: SchedulerSettings) -> list[tuple[float, HostState]]:
    """The host_subset_size best of every host, as select_host sees them."""
    return weigh(filter_hosts(hosts, req, s)[0], s)[: s.host_subset_size]


def _cloud(engine: Engine, hosts: list[HostState]) -> None:
    """Store the hosts: the down ones with a stale heartbeat, the fenced ones fenced."""
    for h in hosts:
        resources = {"vcpus": h.vcpus, "memory_mb": h.memory_mb, "disk_gb": h.disk_gb}
        engine.store.hosts.add(
            h.name,
            "fake://",
            "/x",
            availability_zone=h.availability_zone,
            capabilities=dict(h.capabilities),
            architecture=h.architecture,
            **{k: v for k, v in resources.items() if v is not None},
        )
        engine.store.hosts.update(
            h.name,
            enabled=h.enabled,
            vcpus_used=h.vcpus_used,
            memory_mb_used=h.memory_mb_used,
            disk_gb_used=h.disk_gb_used,
            last_heartbeat=datetime.now(UTC) - timedelta(seconds=5 if h.up else 600),
        )
        if h.fenced:
            engine.store.hosts.set_fence(h.name, "test", "dead")


@pytest.mark.parametrize("s", SETTINGS[:4])
def test_the_database_narrows_and_orders_as_the_filters_and_weigher_would(db_url: str, s: SchedulerSettings) -> None:
    """On SQLite and PostgreSQL, pick_host picks the host select_host picks over every row, or fails with its reasons."""
    with Engine(db_url) as engine:
        _cloud(engine, _hosts(random.Random(7), 60))
        everyone = host_states(engine.store.hosts.list(), 60.0, now=engine.store.clock.now())
        assert sum(h.fenced for h in everyone) and sum(not h.up for h in everyone)
        for req in REQUESTS:
            if s.host_subset_size == 1:
                try:
                    expected = select_host(everyone, req, s).name
                except NoValidHost as exc:
                    with pytest.raises(NoValidHost) as info:
                        pick_host(engine.store, req, s, 60.0)
                    assert info.value.reasons == exc.reasons
                    continue
                assert pick_host(engine.store, req, s, 60.0).name == expected
            else:
                best = {h.name for _, h in _best_of_all(everyone, req, s)}
                assert pick_host(engine.store, req, s, 60.0).name in best


def test_a_rare_fit_beyond_the_first_pages_is_found(db_url: str) -> None:
    """The one host with the wanted capability ranks last for the RAM weigher and is still picked."""
    with Engine(db_url) as engine:
        hosts = [HostState(f"h{i:03d}", vcpus=8, memory_mb=100_000 - i, disk_gb=100) for i in range(120)]
        hosts[-1] = HostState("h119", vcpus=8, memory_mb=1024, disk_gb=100, capabilities={"gpu": "yes"})
        _cloud(engine, hosts)
        req = Request(1, 512, 1, extra_specs={"capabilities:gpu": "yes"})
        assert pick_host(engine.store, req, SchedulerSettings(), 60.0).name == "h119"
        assert pick_host(engine.store, Request(1, 512, 1), SchedulerSettings(), 60.0).name == "h000"
