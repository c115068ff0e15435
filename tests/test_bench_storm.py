"""bench/storm.py at a small size on PostgreSQL: it runs, reports, and its invariant checks catch breakage.

Only that the storm runs to its report with its invariants holding is checked,
never how fast: throughput belongs to the benchmark, against its floor.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa

from lifecycle import Engine, Flavor, Settings, upgrade
from tests.images import fake_image

STORM = Path(__file__).parents[1] / "bench" / "storm.py"


def _storm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_storm", STORM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


@pytest.mark.postgres
@pytest.mark.slow
def test_storm_runs_with_invariants_holding(pg_server_url: str) -> None:
    """2 processes, 10 hosts, 60 operations: exit 0, every report line, no host over ratio, no broken chain."""
    args = ["--db", pg_server_url, "--procs", "2", "--hosts", "10", "--ops", "60"]
    done = subprocess.run([sys.executable, str(STORM), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    for expected in (
        "engine: 60 operations in",
        "floor:  60 operations in",
        "ratio engine/floor:",
        "round trips per operation: engine",
        "what limits it: per operation the engine makes",
        "claim races:",
        "reschedules caused by racing claims:",
        "hosts over an allocation ratio: 0",
        "audit chains checked:",
        "invariants: hold",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert "0 inconsistent" in out
    for kind in ("create ", "stop ", "start ", "delete "):
        assert any(line.startswith(kind) for line in out.splitlines()), f"no {kind.strip()} line in:\n{out}"


@pytest.mark.postgres
def test_storm_checks_catch_an_overfull_host_and_an_unaudited_write(pg_url: str) -> None:
    """The storm's checks report a host used past its RAM ratio and a state written without its audit row."""
    storm = _storm()
    upgrade(pg_url)
    with Engine(pg_url, settings=Settings(shutdown_timeout=0)) as engine:
        engine.hosts.add("storm-h000", "fake://", vcpus=4, memory_mb=1024, disk_gb=100)
        engine.images.add("cirros", fake_image("cirros"))
        uuid = engine.create("storm-0", host="storm-h000", flavor=Flavor(1, 512, 1), image="cirros").instance_uuid
    db = sa.create_engine(pg_url)
    try:
        assert storm.check_hosts(db) == [] and storm.check_chains(db) == (1, [])
        with db.begin() as conn:
            conn.execute(sa.text("UPDATE hosts SET memory_mb_used = 1537 WHERE name = 'storm-h000'"))
            conn.execute(sa.text("UPDATE instances SET vm_state = 'stopped' WHERE uuid = :u"), {"u": uuid})
        hosts, (instances, chains) = storm.check_hosts(db), storm.check_chains(db)
    finally:
        db.dispose()
    assert len(hosts) == 1 and "memory_mb used 1537" in hosts[0], hosts
    assert instances == 1 and len(chains) == 1 and uuid in chains[0], chains
