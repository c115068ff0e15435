"""Concurrency on PostgreSQL: processes firing conflicting operations at the same instances."""

from __future__ import annotations

import multiprocessing
import random
from collections import Counter
from pathlib import Path

import pytest

from lifecycle import Conflict, Engine, Flavor, InvalidState, Preempted, Settings, upgrade
from tests.images import fake_image
from tests.invariants import check_invariants

PROCESSES = 4
INSTANCES = 50
CALLS_PER_PROCESS = 150
OPERATIONS = ("stop", "start", "pause", "unpause", "suspend", "resume", "reboot", "reboot_hard", "rescue", "unrescue")


def _worker(url: str, uuids: list[str], seed: int) -> Counter[str]:
    """Fire random operations at random instances; count wins, conflicts, refusals and anything else."""
    counts: Counter[str] = Counter()
    rng = random.Random(seed)
    with Engine(url, settings=Settings(shutdown_timeout=0), owner=f"worker-{seed}") as engine:
        for _ in range(CALLS_PER_PROCESS):
            uuid, op = rng.choice(uuids), rng.choice(OPERATIONS)
            try:
                engine.run(op, uuid)
                counts["won"] += 1
            except Conflict:
                counts["conflict"] += 1
            except InvalidState:
                counts["invalid_state"] += 1
            except Preempted:  # a hard reboot took over this pause/suspend/reboot: by design
                counts["preempted"] += 1
            except Exception as exc:  # anything else is a defect the test reports
                counts[f"other:{type(exc).__name__}: {exc}"] += 1
    return counts


@pytest.mark.postgres
@pytest.mark.slow
def test_conflicting_processes_lose_no_update(pg_url: str, tmp_path: Path) -> None:
    """4 processes x 150 calls on 50 instances: each call wins, loses cleanly or is preempted; nothing is lost."""
    upgrade(pg_url)
    with Engine(pg_url) as engine:
        engine.hosts.add("h1", f"fake://{tmp_path / 'h1.json'}")
        engine.images.add("cirros", fake_image("cirros"))
        uuids = [
            engine.create(f"vm{i}", host="h1", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
            for i in range(INSTANCES)
        ]

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(PROCESSES) as pool:
        results = pool.starmap(_worker, [(pg_url, uuids, seed) for seed in range(PROCESSES)])
    total: Counter[str] = sum(results, Counter())

    others = {k: v for k, v in total.items() if k.startswith("other")}
    assert others == {}, others
    assert sum(total.values()) == PROCESSES * CALLS_PER_PROCESS
    assert total["won"] > 0 and total["conflict"] + total["invalid_state"] > 0, total

    with Engine(pg_url) as engine:
        check_invariants(engine.store)
        succeeded = 0
        for uuid in uuids:
            instance, history, tasks = engine.get(uuid), engine.history(uuid), engine.tasks(uuid)
            # Every write bumps the version and changes a state, so each has exactly one audit row.
            assert instance.version == len(history), (uuid, instance.version, len(history))
            assert instance.task_id is None
            succeeded += sum(t.outcome.value == "succeeded" for t in tasks) - 1  # minus create
            driver_power = engine.hosts.driver("h1").get_info(uuid)
            assert driver_power == instance.power_state, (uuid, driver_power, instance.power_state)
        assert succeeded == total["won"], "a call reported as won has no succeeded task, or vice versa"
