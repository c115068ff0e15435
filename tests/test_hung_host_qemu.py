"""A hung hypervisor never takes anything down: the daemon survives a host's libvirtd stopped and resumed.

Host b's libvirtd is SIGSTOPped for 30 s (longer than keepalive's 5 s x 3,
so libvirt closes the connection while calls are in flight on it) and then
resumed, five times, under a running ``lifecycle daemon`` whose sync passes
and heartbeats call both hosts. Before calls on one connection were
serialized, the daemon segfaulted at the resume (libvirt 9.0's RPC client,
see ``drivers/_link.py``). The daemon runs with ``PYTHONFAULTHANDLER`` so a
crash leaves every thread's stack in its log.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import holds_for, wait_until
from tests.test_fleet_qemu import Fleet, fleet, frozen, log_events, stamp, stop_daemon  # noqa: F401

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

STALLS = 5
STALL_SECONDS = 30.0
BEAT_EVERY = 1.0
"""host_down_after 3: the daemon heartbeats each host every second."""
MARGIN = 5.0


def _age(on: Fleet, host: str) -> float:
    beat = on.hosts()[host]["last_heartbeat"]
    return (datetime.now(UTC) - stamp(beat)).total_seconds() if beat else float("inf")


def test_the_daemon_survives_a_host_stalled_and_resumed_five_times(
    fleet: Fleet,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """b's libvirtd stopped 30 s and resumed, 5 times: the daemon lives on, a's heartbeat never lags, b comes back."""
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")  # a crash prints every thread's stack into the log
    fast = {"host_down_after": 3}
    log = tmp_path / "daemon.log"
    guests = [fleet.create("on-a", "a"), fleet.create("on-b", "b")]
    daemon = fleet.start(
        "--log-format",
        "json",
        "--log-level",
        "info",
        "daemon",
        "--interval",
        "1",
        "--claim-interval",
        "0.5",
        settings=fast,
        log=log,
    )
    ages: list[float] = []
    try:
        start = datetime.now(UTC)
        wait_until(
            "both hosts to heartbeat",
            lambda: all(h["last_heartbeat"] and stamp(h["last_heartbeat"]) > start for h in fleet.hosts().values()),
            30,
        )

        def alive() -> bool:
            ages.append(_age(fleet, "a"))
            assert daemon.poll() is None, _tail(log)
            return True

        for round_ in range(STALLS):
            with frozen(fleet.remote):
                holds_for(f"the daemon alive through stall {round_ + 1}", alive, STALL_SECONDS, interval=0.5)
            thawed = datetime.now(UTC)
            wait_until(
                f"b to heartbeat again after stall {round_ + 1}",
                lambda thawed=thawed: stamp(fleet.hosts()["b"]["last_heartbeat"]) > thawed,  # type: ignore[misc]
                90,
            )
            assert daemon.poll() is None, _tail(log)
        assert max(ages) < BEAT_EVERY + MARGIN, max(ages)
        passes = [e for e in log_events(log) if e.get("event") == "sync_pass" and e.get("host") == "a"]
        assert len(passes) >= STALLS * STALL_SECONDS / 2  # a's sync passes ran on throughout (every second)
    finally:
        stop_daemon(daemon)
    assert daemon.returncode == 0, _tail(log)
    for uuid in guests:
        assert fleet.ok("delete", uuid)["status"] == "DELETED"


def _tail(log: Path, lines: int = 60) -> str:
    """The end of the daemon's log (a crash's stacks, when faulthandler printed them)."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
