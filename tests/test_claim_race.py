"""Claims over several candidate hosts, settled in one statement, and releases fenced by the task's epoch."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from lifecycle import Engine, Flavor, Settings, upgrade
from lifecycle.errors import Fenced
from lifecycle.records import Task
from lifecycle.store import Store
from lifecycle.store.tables import HOSTS, INSTANCES
from tests.conftest import wait_until
from tests.images import fake_image

RATIOS = (16.0, 1.0, 1.0)
SLOT_MB = 1024


def _instances(store: Store, count: int) -> list[str]:
    """Insert ``count`` building instances without a host (a claim row names its instance)."""
    at = datetime.now(UTC)
    uuids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(count)]
    rows = [
        {
            "uuid": u,
            "name": f"vm{i}",
            "flavor_name": "slot",
            "vcpus": 1,
            "memory_mb": SLOT_MB,
            "root_gb": 1,
            "image": "cirros",
            "vm_state": "building",
            "task_state": "scheduling",
            "power_state": 0,
            "version": 1,
            "created_at": at,
            "updated_at": at,
        }
        for i, u in enumerate(uuids)
    ]
    with store.engine.begin() as conn:
        conn.execute(sa.insert(INSTANCES), rows)
    return uuids


def _hosts(url: str, slots: dict[str, int]) -> None:
    """Add hosts holding ``slots[name]`` instances of SLOT_MB each (RAM ratio 1.0), and the image."""
    with Engine(url) as engine:
        for name, count in slots.items():
            engine.hosts.add(name, "fake://", vcpus=64, memory_mb=count * SLOT_MB, disk_gb=1000)
        engine.images.add("cirros", fake_image("cirros"))


def _used(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {name: used for name, used in conn.execute(sa.select(HOSTS.c.name, HOSTS.c.memory_mb_used))}


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """Hosts a (1 slot), b (2 slots) and c (2 slots), on SQLite and PostgreSQL."""
    _hosts(db_url, {"a": 1, "b": 2, "c": 2})
    s = Store(db_url)
    yield s
    s.close()


def test_claim_first_takes_the_first_candidate_in_the_given_order(store: Store) -> None:
    """With room everywhere, the claim lands on the first candidate as given, not the best or the first by name."""
    uuid, *_ = _instances(store, 1)
    assert store.claims.claim_first(uuid, ["c", "a", "b"], vcpus=1, memory_mb=SLOT_MB, disk_gb=1, ratios=RATIOS) == "c"
    assert store.claims.of(uuid) == ["c"]
    assert _used(store) == {"a": 0, "b": 0, "c": SLOT_MB}


def test_claim_first_passes_over_a_full_candidate(store: Store) -> None:
    """A candidate without room is passed over for the next one in order, and left as it was."""
    first, second = _instances(store, 2)
    assert store.claims.claim(first, "a", vcpus=1, memory_mb=SLOT_MB, disk_gb=1, ratios=RATIOS)
    assert (
        store.claims.claim_first(second, ["a", "b", "c"], vcpus=1, memory_mb=SLOT_MB, disk_gb=1, ratios=RATIOS) == "b"
    )
    assert _used(store) == {"a": SLOT_MB, "b": SLOT_MB, "c": 0}
    assert store.claims.of(second) == ["b"]


def test_claim_first_returns_none_and_writes_nothing_when_no_candidate_fits(store: Store) -> None:
    """No candidate with room gives None with no usage or claim row written, even while a host not named has room."""
    uuid, *_ = _instances(store, 1)
    assert store.claims.claim_first(uuid, ["a", "b"], vcpus=1, memory_mb=3 * SLOT_MB, disk_gb=1, ratios=RATIOS) is None
    assert store.claims.claim_first(uuid, [], vcpus=1, memory_mb=SLOT_MB, disk_gb=1, ratios=RATIOS) is None
    assert (
        store.claims.claim_first(uuid, ["a"], vcpus=1, memory_mb=2 * SLOT_MB, disk_gb=1, ratios=RATIOS) is None
    )  # c would fit, but is not a candidate
    assert _used(store) == {"a": 0, "b": 0, "c": 0} and store.claims.of(uuid) == []


def test_a_fenced_candidate_is_never_claimed(store: Store) -> None:
    """A host fenced after the decision's read is passed over by claim_first and refused by claim, nothing written."""
    first, second = _instances(store, 2)
    store.hosts.set_fence("c", "operator", "PSU failed")
    assert store.claims.claim_first(first, ["c", "b"], vcpus=1, memory_mb=SLOT_MB, disk_gb=1, ratios=RATIOS) == "b"
    assert store.claims.claim_first(second, ["c"], vcpus=1, memory_mb=SLOT_MB, disk_gb=1, ratios=RATIOS) is None
    assert not store.claims.claim(second, "c", vcpus=1, memory_mb=SLOT_MB, disk_gb=1, ratios=RATIOS)
    assert _used(store) == {"a": 0, "b": SLOT_MB, "c": 0} and store.claims.of(second) == []


# -- releases and the task's epoch --------------------------------------------------------------------


@pytest.fixture
def placed(db_url: str) -> Iterator[tuple[Engine, Task]]:
    """An engine with one instance built on host a (claiming one slot there), and its finished create task."""
    _hosts(db_url, {"a": 2, "b": 2})
    with Engine(db_url, settings=Settings(shutdown_timeout=0)) as engine:
        yield engine, engine.create("vm", host="a", flavor=Flavor(1, SLOT_MB, 1), image="cirros")


def test_release_claims_of_a_fenced_task_releases_nothing(placed: tuple[Engine, Task]) -> None:
    """A worker whose task epoch moved on raises Fenced, and the claim and the host's usage stay."""
    engine, task = placed
    stale = dataclasses.replace(task, epoch=task.epoch + 1)
    with pytest.raises(Fenced):
        engine.store.claims.release(task.instance_uuid, task=stale)
    with pytest.raises(Fenced):
        engine.store.claims.release(task.instance_uuid, "b", task=stale)  # no claim there: fenced all the same
    assert engine.store.claims.of(task.instance_uuid) == ["a"] and engine.hosts.get("a").memory_mb_used == SLOT_MB


def test_release_claims_at_the_task_epoch_gives_the_room_back(placed: tuple[Engine, Task]) -> None:
    """A worker at its task's epoch gives back the claim and the host's usage and says how many; again, 0."""
    engine, task = placed
    assert engine.store.claims.release(task.instance_uuid, task=task) == 1
    assert engine.store.claims.of(task.instance_uuid) == [] and engine.hosts.get("a").memory_mb_used == 0
    assert engine.store.claims.release(task.instance_uuid, task=task) == 0


# -- racing on PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Store]:
    """A migrated PostgreSQL database with hosts h1, h2 and h3 of 4 slots each, and 36 instances to place."""
    upgrade(pg_url)
    _hosts(pg_url, dict.fromkeys(("h1", "h2", "h3"), 4))
    store = Store(pg_url)
    _instances(store, 36)
    yield store
    store.close()


def _claimer(url: str, uuids: list[str], order: list[str], start: threading.Barrier, out: list[str | None]) -> None:
    store = Store(url)
    try:
        start.wait()
        out.extend(
            store.claims.claim_first(u, order, vcpus=1, memory_mb=SLOT_MB, disk_gb=1, ratios=RATIOS) for u in uuids
        )
    finally:
        store.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_concurrent_claims_never_overcommit_and_never_fail_while_room_exists(pg_store: Store) -> None:
    """12 threads x 3 claims over 3 hosts of 4 slots, in clashing orders: 12 win, hosts exactly full, no loss before a win."""
    uuids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(36)]
    orders = [["h1", "h2", "h3"], ["h3", "h2", "h1"], ["h2", "h3", "h1"]]
    start = threading.Barrier(12)
    results: list[list[str | None]] = [[] for _ in range(12)]
    threads = [
        threading.Thread(target=_claimer, args=(pg_store.url, uuids[3 * t : 3 * t + 3], orders[t % 3], start, out))
        for t, out in enumerate(results)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    won = Counter(host for out in results for host in out if host is not None)
    assert won == {"h1": 4, "h2": 4, "h3": 4}, results
    # Claims only add usage: a claim that found no room while a later one of the same thread won lost wrongly.
    for out in results:
        assert len(out) == 3 and out == sorted(out, key=lambda h: h is None), results
    assert _used(pg_store) == dict.fromkeys(("h1", "h2", "h3"), 4 * SLOT_MB)


def _hold(store: Store, fill: dict[str, int]) -> sa.Connection:
    """Open a transaction that sets the given hosts' memory usage (locking their rows) and leave it open."""
    conn = store.engine.connect()
    conn.begin()
    for host, used in fill.items():
        conn.execute(sa.update(HOSTS).where(HOSTS.c.name == host).values(memory_mb_used=used))
    return conn


def _claim_in_thread(store: Store, uuid: str, order: list[str]) -> tuple[threading.Thread, list[str | None]]:
    out: list[str | None] = []
    thread = threading.Thread(
        target=lambda: out.append(
            store.claims.claim_first(uuid, order, vcpus=1, memory_mb=SLOT_MB, disk_gb=1, ratios=RATIOS)
        )
    )
    thread.start()
    return thread, out


@pytest.mark.postgres
def test_a_candidate_another_transaction_holds_is_skipped_without_waiting(pg_store: Store) -> None:
    """While h1's row is locked by a transaction still open, the claim takes h2 at once instead of queueing on h1."""
    holder = _hold(pg_store, {"h1": 0})
    try:
        thread, out = _claim_in_thread(pg_store, "00000000-0000-0000-0000-000000000000", ["h1", "h2"])
        thread.join(timeout=30)
        assert out == ["h2"]
    finally:
        holder.rollback()
        holder.close()


def _waiting_on_a_lock(store: Store) -> bool:
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    with store.engine.connect() as conn:
        return bool(conn.exec_driver_sql(query).scalar_one())


@pytest.mark.postgres
def test_when_every_candidate_is_held_the_claim_waits_then_passes_over_the_one_that_filled(pg_store: Store) -> None:
    """All candidates locked: the claim waits, and when the holder commits h1 full, it rechecks h1 and takes h2."""
    holder = _hold(pg_store, {"h1": 4 * SLOT_MB, "h2": 0})
    try:
        thread, out = _claim_in_thread(pg_store, "00000000-0000-0000-0000-000000000000", ["h1", "h2"])
        what = "the claim's second pass queued on h1's lock (or the claim ended)"
        wait_until(what, lambda: _waiting_on_a_lock(pg_store) or not thread.is_alive(), 30, interval=0.01)
        assert thread.is_alive() and out == [], "the claim should be waiting for the held rows"
        holder.commit()
        thread.join(timeout=30)
    finally:
        holder.close()
    assert out == ["h2"]
    assert _used(pg_store) == {"h1": 4 * SLOT_MB, "h2": SLOT_MB, "h3": 0}
