"""Placement through the engine: scheduled creates, reschedules, claims, and racing claims on PostgreSQL."""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from lifecycle import Engine, Flavor, NoValidHost, TaskFailed, VmState, upgrade
from lifecycle.records import Host
from lifecycle.scheduler import HostState, SchedulerSettings, order_candidates
from lifecycle.store import Store
from lifecycle.store.tables import HOSTS
from tests.conftest import Fakes, all_logs
from tests.images import fake_image
from tests.invariants import check_invariants

SMALL = Flavor(vcpus=1, memory_mb=512, root_gb=1)


@pytest.fixture
def cloud(sqlite_url: str, fakes: Fakes) -> Iterator[Engine]:
    """Three fake hosts with tracked resources and fresh heartbeats."""
    engine = Engine(sqlite_url, driver_factory=fakes.factory)
    for name, mem in (("a", 2048), ("b", 4096), ("c", 1024)):
        engine.hosts.add(name, "fake://", vcpus=4, memory_mb=mem, disk_gb=50)
        engine.hosts.heartbeat(name)
    engine.images.add("cirros", fake_image("cirros"))
    yield engine
    check_invariants(engine.store)
    engine.close()


def test_create_without_a_host_is_scheduled_and_claims(cloud: Engine) -> None:
    """The scheduler picks the emptiest host (spreading) and the claim shows in its usage."""
    uuid = cloud.create("vm", flavor=SMALL, image="cirros").instance_uuid
    assert cloud.get(uuid).host == "b"
    b = cloud.hosts.get("b")
    assert (b.vcpus_used, b.memory_mb_used, b.disk_gb_used) == (1, 512, 1)
    assert cloud.store.claims.of(uuid) == ["b"]
    assert "scheduled to b (attempt 1 of 3)" in (cloud.history(uuid)[1].message or "")


def test_delete_releases_the_claim(cloud: Engine) -> None:
    """Deleting an instance gives its resources back to the host."""
    uuid = cloud.create("vm", flavor=SMALL, image="cirros").instance_uuid
    cloud.delete(uuid)
    assert cloud.hosts.get("b").memory_mb_used == 0 and cloud.store.claims.of(uuid) == []


def test_failed_spawn_reschedules_to_another_host(cloud: Engine, fakes: Fakes) -> None:
    """A spawn failure on the first host releases it and builds on the next, with both attempts audited."""
    fakes.factory(cloud.hosts.get("b"))
    fakes["b"].faults.fail_next("spawn")
    uuid = cloud.create("vm", flavor=SMALL, image="cirros").instance_uuid
    i = cloud.get(uuid)
    assert (i.vm_state, i.host) == (VmState.ACTIVE, "a")
    assert cloud.hosts.get("b").memory_mb_used == 0 and cloud.store.claims.of(uuid) == ["a"]
    messages = [r.message for r in cloud.history(uuid) if r.message]
    assert messages[0].startswith("scheduled to b")
    assert "spawn on b failed: DriverError: injected failure in spawn; rescheduling" in messages[1]
    assert messages[2].startswith("scheduled to a (attempt 2 of 3)")


def test_every_attempt_failing_ends_in_error_with_each_in_the_audit_log(cloud: Engine, fakes: Fakes) -> None:
    """After max_attempts failed spawns the instance is in error, holds no claim, and the log shows all three."""
    for name in ("a", "b", "c"):
        fakes.factory(cloud.hosts.get(name))
        fakes[name].faults.fail_next("spawn")
    with pytest.raises(TaskFailed) as info:
        cloud.create("vm", flavor=SMALL, image="cirros")
    uuid = info.value.task.instance_uuid
    assert cloud.get(uuid).vm_state is VmState.ERROR and cloud.store.claims.of(uuid) == []
    scheduled = [r.message for r in cloud.history(uuid) if (r.message or "").startswith("scheduled to")]
    assert [m.split()[2] for m in scheduled] == ["b", "a", "c"]
    assert "injected failure in spawn" in (cloud.history(uuid)[-1].message or "")


def test_nothing_fits_fails_with_reasons(cloud: Engine) -> None:
    """A flavor no host can take fails the create with NoValidHost reasons in the task error."""
    with pytest.raises(TaskFailed) as info:
        cloud.create("huge", flavor=Flavor(vcpus=1, memory_mb=10000, root_gb=1), image="cirros")
    assert "NoValidHost" in info.value.error and "a: RamFilter" in info.value.error
    assert cloud.get(info.value.task.instance_uuid).vm_state is VmState.ERROR


def test_a_named_host_must_have_room(cloud: Engine) -> None:
    """Building on a named host skips the filters but not the claim: a full host refuses."""
    with pytest.raises(TaskFailed, match="requested host has no room"):
        cloud.create("big", host="c", flavor=Flavor(vcpus=1, memory_mb=2000, root_gb=1), image="cirros")


def _race(url: str, worker: int, tries: int) -> int:
    store = Store(url)
    won = 0
    for i in range(tries):
        if store.claims.claim(
            f"00000000-0000-0000-0000-{worker:06d}{i:06d}",
            "tight",
            vcpus=1,
            memory_mb=1024,
            disk_gb=1,
            ratios=(16.0, 1.0, 1.0),
        ):
            won += 1
    store.close()
    return won


@pytest.mark.postgres
@pytest.mark.slow
def test_racing_claims_never_overcommit(pg_url: str) -> None:
    """Six processes racing for a host that fits exactly 5 instances: exactly 5 claims win, usage is exact."""
    upgrade(pg_url)
    with Engine(pg_url) as engine:
        engine.hosts.add("tight", "fake://", vcpus=64, memory_mb=5 * 1024, disk_gb=100)
        engine.images.add("cirros", fake_image("cirros"))
        for w in range(6):
            for i in range(5):
                engine.create(
                    f"seed{w}-{i}",
                    host="tight",
                    flavor=Flavor(1, 64, 1),
                    image="cirros",
                    uuid=f"00000000-0000-0000-0000-{w:06d}{i:06d}",
                )
        # The claims below need instance rows (foreign key); release the seeds' own claims first.
        for w in range(6):
            for i in range(5):
                engine.store.claims.release(f"00000000-0000-0000-0000-{w:06d}{i:06d}")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(6) as pool:
        wins = pool.starmap(_race, [(pg_url, w, 5) for w in range(6)])
    assert sum(wins) == 5
    with Engine(pg_url) as engine:
        tight = engine.hosts.get("tight")
        assert (tight.memory_mb_used, tight.vcpus_used) == (5 * 1024, 5)


def test_claim_is_refused_once_the_host_is_full(tmp_path: Path) -> None:
    """On SQLite too, a claim that would pass the ratio writes nothing."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    with Engine(url) as engine:
        engine.hosts.add("h", "fake://", vcpus=1, memory_mb=100, disk_gb=1)
        engine.images.add("cirros", fake_image("cirros"))
        uuid = engine.create("x", host="h", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
        assert engine.store.claims.claim(uuid, "h", vcpus=1, memory_mb=100, disk_gb=1, ratios=(16.0, 1.5, 1.0)) is False
        assert engine.hosts.get("h").memory_mb_used == 64
    assert NoValidHost({}).reasons == {}


def test_candidates_are_the_pick_then_the_rest_best_first() -> None:
    """The claim order is the random pick among the best host_subset_size, then every other host best first, capped."""
    hosts = [HostState(f"h{i}", memory_mb=1024 * (i + 1)) for i in range(6)]  # h5 has the most free memory
    s = SchedulerSettings(host_subset_size=3)
    ordered = order_candidates(hosts, s, 4, random.Random(1))
    assert ordered[0].name in {"h5", "h4", "h3"} and len(ordered) == 4
    assert [h.name for h in ordered[1:]] == [n for n in ("h5", "h4", "h3", "h2", "h1") if n != ordered[0].name][:3]
    assert [h.name for h in order_candidates(hosts, SchedulerSettings(), 8)] == ["h5", "h4", "h3", "h2", "h1", "h0"]
    assert order_candidates([], s, 8) == []


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """The engine's log events, whatever logging an earlier test configured."""
    with all_logs() as captured:
        yield captured  # the tests pick their events by name; the debug ones never match


def _fill(engine: Engine, **used_mb: int) -> None:
    """Set hosts' memory usage behind the scheduler's back, as another engine's claims would."""
    with engine.store.engine.begin() as conn:
        for name, used in used_mb.items():
            conn.execute(sa.update(HOSTS).where(HOSTS.c.name == name).values(memory_mb_used=used))


def _after_each_read(engine: Engine, monkeypatch: pytest.MonkeyPatch, *actions: Callable[[], None]) -> list[int]:
    """Run the n-th action right after the scheduler's n-th page read of the hosts; return the reads' count."""
    reads: list[int] = []
    ranked = engine.store.hosts.ranked

    def read(*args: Any) -> list[Host]:
        page = ranked(*args)
        if args[2] == 0:  # a decision's first page
            reads.append(1)
            if len(reads) <= len(actions):
                actions[len(reads) - 1]()
        return page

    monkeypatch.setattr(engine.store.hosts, "ranked", read)
    return reads


def test_a_first_choice_filled_meanwhile_is_settled_in_the_claim_without_a_re_read(
    cloud: Engine, monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]]
) -> None:
    """When b fills up between the read and the claim, the same claim lands on a, the next best, and says so."""
    reads = _after_each_read(cloud, monkeypatch, lambda: _fill(cloud, b=6144))
    uuid = cloud.create("vm", flavor=SMALL, image="cirros").instance_uuid
    assert cloud.get(uuid).host == "a" and cloud.store.claims.of(uuid) == ["a"] and len(reads) == 1
    raced = [e for e in events if e["event"] == "claim_took_later_candidate"]
    assert [(e["host"], e["first_choice"], e["rank"]) for e in raced] == [("a", "b", 1)]
    _fill(cloud, b=0)


def test_every_candidate_filled_meanwhile_reads_the_hosts_again(
    cloud: Engine, monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]]
) -> None:
    """When every candidate fills up before the claim, the claim is lost and the next read finds the room freed since."""
    full = {"a": 3072, "b": 6144, "c": 1536}
    reads = _after_each_read(cloud, monkeypatch, lambda: _fill(cloud, **full), lambda: _fill(cloud, a=0, b=0, c=0))
    uuid = cloud.create("vm", flavor=SMALL, image="cirros").instance_uuid
    assert cloud.get(uuid).host == "b" and len(reads) == 2
    assert [e["candidates"] for e in events if e["event"] == "claim_lost"] == [3]
