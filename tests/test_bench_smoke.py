"""The benchmark scripts still run (tiny sizes): they must not rot when the schema grows.

These check that each script runs to its report line, never how fast: timings
belong to the benchmarks themselves, measured against a baseline in one run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("transitions.py", ["--cycles", "3", "--rounds", "1"], "ratio engine/raw"),
        ("sync.py", ["--instances", "300", "--runs", "1", "--skip-memory"], "ratio sweep/floor"),
        ("scheduler.py", ["--repeat", "2", "--sizes", "100", "300"], "ratio decision/read"),
        ("cli.py", ["--instances", "20", "--runs", "1"], "ratio lifecycle list"),
        (
            "changes.py",
            ["--backlog", "600", "--writers", "1", "--runs", "1", "--cycles", "5", "--rows", "3000"],
            "rows read = rows returned for every query",
        ),
    ],
)
def test_benchmark_script_runs(script: str, args: list[str], expect: str) -> None:
    """Each benchmark script exits 0 and prints its report line."""
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expect in done.stdout


@pytest.mark.qemu
@pytest.mark.slow
def test_move_benchmark_runs(remote_instances: object) -> None:
    """bench/move.py migrates a small disk between the two libvirt hosts and prints its ratios and time breakdown."""
    from tests.conftest import qemu_ready

    qemu_ready()
    args = ["--runs", "1", "--data-mib", "8", "--remote-instances", str(remote_instances)]
    done = subprocess.run([sys.executable, str(BENCH / "move.py"), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in (
        "overlay evicted from the page cache",
        "ratio migrate/stream",
        "ratio migrate/cp",
        "ratio to data written",
        "where the migrate's time goes",
        "waiting for the source's download",
        "digest: the copy read back",
    ):
        assert line in done.stdout, f"{line!r} missing from:\n{done.stdout}"
