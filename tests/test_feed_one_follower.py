"""A named feed consumer has one follower at a time, in one process or across processes; anonymous following is free."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from lifecycle import Change, ConsumerInUse
from tests.conftest import FLAVOR, Fakes, make_engine, wait_until
from tests.test_feed import _follower, _lines, following

STOPPED = threading.Event()
STOPPED.set()


def _holder_named(db_url: str, pid: int | None = None) -> str:
    """The words ConsumerInUse uses for the holder: its process on SQLite (flock file), its session on PostgreSQL."""
    if db_url.startswith("sqlite"):
        return f"process {pid if pid is not None else os.getpid()} on "
    return "PostgreSQL session pid "


def test_a_second_follower_of_a_named_consumer_is_refused_while_anonymous_ones_follow(
    db_url: str, fakes: Fakes
) -> None:
    """While a thread follows consumer 'ui', a second follow of 'ui' raises ConsumerInUse naming the holder and delivers nothing; anonymous follows still run; once the first stops, 'ui' may be followed again."""
    engine = make_engine(db_url, fakes, feed_poll_interval=0.02)
    engine.create("vm", host="h1", flavor=FLAVOR, image="cirros")
    first: list[Change] = []
    second: list[Change] = []
    with following(engine, "ui", first.append):
        wait_until("the first follower holds the consumer", lambda: engine.feed.consumers() != [])
        with pytest.raises(ConsumerInUse, match="feed consumer 'ui' is in use: " + _holder_named(db_url)):
            engine.feed.follow("ui", second.append, stop=STOPPED)
        assert second == []
        assert engine.feed.follow(None, second.append, stop=STOPPED) > 0  # anonymous: no lock
    assert engine.feed.follow("ui", first.append, stop=STOPPED) == 0  # released: nothing left to deliver
    engine.close()


def test_a_follower_in_another_process_holds_the_consumer_until_it_ends(db_url: str, tmp_path: Path) -> None:
    """While another process follows 'relay', this one is refused (ConsumerInUse naming the holder); after it ends, this one follows."""
    fakes = Fakes()
    engine = make_engine(db_url, fakes)
    engine.create("vm", host="h1", flavor=FLAVOR, image="cirros")
    out = tmp_path / "relay.log"
    process = multiprocessing.get_context("spawn").Process(target=_follower, args=(db_url, "relay", str(out)))
    process.start()
    try:
        wait_until("the other process to deliver", lambda: len(_lines(out)) > 0, 60)
        with pytest.raises(ConsumerInUse, match=_holder_named(db_url, process.pid)):
            engine.feed.follow("relay", lambda change: None, stop=STOPPED)
    finally:
        process.terminate()  # SIGTERM: the follower stops when told, storing its position
        process.join(60)
    assert process.exitcode == 0
    engine.stop(engine.list()[0].uuid)
    assert engine.feed.follow("relay", lambda change: None, stop=STOPPED) > 0  # the stop's changes, once
    engine.close()
