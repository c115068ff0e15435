"""The daemon and a fleet: one hung or silent hypervisor delays only its own host."""

from __future__ import annotations

import threading

from lifecycle.clock import ManualClock
from lifecycle.daemon import Daemon
from tests.conftest import Fakes, make_engine, wait_until


def _beat(engine, host: str):  # type: ignore[no-untyped-def]
    return engine.hosts.get(host).last_heartbeat


def test_a_hung_host_does_not_stall_the_others(sqlite_url: str, fakes: Fakes, clock: ManualClock) -> None:
    """While h1's hypervisor hangs inside a call, h2 keeps heartbeating and getting sync passes as the clock moves."""
    engine = make_engine(sqlite_url, fakes, clock=clock, sync_interval=60.0, host_down_after=30.0)
    for host in ("h1", "h2"):
        engine.hosts.driver(host)
    gate = fakes["h1"].faults.hold("list_instances")  # the first call that lists h1 hangs there
    daemon = Daemon(engine, claim_interval=60.0)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        assert gate.wait_entered()
        for turn in range(3):  # each minute of the clock: a pass and a heartbeat of h2, none of them waiting for h1
            # Asleep: the daemon's loop and both hosts' heartbeats, and h2's sync; h1's sync is stuck in the call.
            wait_until("every timer but h1's hung sync asleep", lambda: clock.waiting == 4)
            passes, beat = fakes["h2"].calls.count("list_instances"), _beat(engine, "h2")
            clock.advance(60)
            wait_until(f"sync pass {turn + 2} of h2", lambda n=passes: fakes["h2"].calls.count("list_instances") > n)
            wait_until("a newer heartbeat of h2", lambda b=beat: _beat(engine, "h2") > b)
    finally:
        gate.release()
        daemon.stop.set()
        thread.join(10)
    assert not thread.is_alive()
    engine.close()


def test_a_silent_host_stops_heartbeating_and_comes_back(sqlite_url: str, fakes: Fakes, clock: ManualClock) -> None:
    """A host whose hypervisor does not answer gets no heartbeat (down for the scheduler) until it answers again."""
    engine = make_engine(sqlite_url, fakes, clock=clock, sync_interval=60.0, host_down_after=30.0)
    for host in ("h1", "h2"):
        engine.hosts.driver(host)
    fakes["h1"].unreachable = True
    daemon = Daemon(engine, claim_interval=60.0)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        wait_until("a heartbeat of h2", lambda: _beat(engine, "h2") is not None)
        # Asleep: the daemon's loop, both hosts' heartbeats, h2's sync and h1's wait to clear its evacuated copies.
        wait_until("every timer asleep", lambda: clock.waiting == 5)
        clock.advance(10)
        wait_until("every timer asleep again", lambda: clock.waiting == 5)
        assert _beat(engine, "h1") is None
        fakes["h1"].unreachable = False
        clock.advance(10)  # the heartbeat's turn: every host_down_after / 3
        wait_until("a heartbeat of h1 once it answers", lambda: _beat(engine, "h1") is not None)
    finally:
        daemon.stop.set()
        thread.join(10)
    assert not thread.is_alive()
    engine.close()


def test_opening_one_hosts_driver_does_not_block_another(sqlite_url: str, fakes: Fakes) -> None:
    """A driver factory stuck connecting to h1 leaves engine.hosts.driver('h2') free."""
    entered, release = threading.Event(), threading.Event()
    base = fakes.factory

    def slow(host):  # type: ignore[no-untyped-def]
        if host.name == "h1":
            entered.set()
            release.wait(10)
        return base(host)

    engine = make_engine(sqlite_url, fakes)
    engine.drivers.factory = slow
    opener = threading.Thread(target=engine.hosts.driver, args=("h1",))
    opener.start()
    try:
        assert entered.wait(5)
        done = threading.Event()
        threading.Thread(target=lambda: (engine.hosts.driver("h2"), done.set()), daemon=True).start()
        assert done.wait(2), "opening h2 waited for h1"
    finally:
        release.set()
        opener.join(10)
    engine.close()
