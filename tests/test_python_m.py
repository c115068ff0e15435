"""``python -m lifecycle`` is the ``lifecycle`` script, as ``python -m lifecycle.cli`` is."""

from __future__ import annotations

import subprocess
import sys


def test_python_m_lifecycle_runs_the_cli() -> None:
    """python -m lifecycle graph --format json exits 0 and prints what python -m lifecycle.cli prints."""
    runs = [
        subprocess.run(
            [sys.executable, "-m", module, "graph", "--format", "json"],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        for module in ("lifecycle", "lifecycle.cli")
    ]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    assert '"operation": "create"' in runs[0].stdout
