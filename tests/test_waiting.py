"""The tests' one way to let time pass: wait for what can be seen, or check that something holds a while."""

from __future__ import annotations

import time

import pytest

from tests.conftest import holds_for, wait_until


def test_wait_until_returns_the_first_truthy_value() -> None:
    """wait_until looks again while the predicate is falsy and returns the first truthy value it sees."""
    looks = iter([0, None, "", "ready", "later"])
    assert wait_until("ready", lambda: next(looks), 1, interval=0) == "ready"


def test_wait_until_fails_naming_what_it_waited_for_and_the_last_value() -> None:
    """Past its timeout wait_until fails with what it waited for and what the predicate last returned."""
    with pytest.raises(AssertionError, match=r"not within 0.1 s: the moon \(last seen: \[\]\)"):
        wait_until("the moon", list, 0.1, interval=0.01)


def test_holds_for_fails_at_the_first_falsy_look() -> None:
    """holds_for fails as soon as the predicate is falsy, without waiting out its window."""
    looks = iter([True, True, 0])
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"calm stopped holding within 5 s \(last seen: 0\)"):
        holds_for("calm", lambda: next(looks), 5, interval=0)
    assert time.monotonic() - started < 1


def test_holds_for_passes_when_the_predicate_held_all_along() -> None:
    """holds_for returns once its window is over, having looked more than once, if the predicate never failed."""
    looks: list[float] = []
    started = time.monotonic()
    holds_for("calm", lambda: looks.append(time.monotonic()) or True, 0.2, interval=0.02)
    assert len(looks) >= 2 and looks[-1] - started >= 0.2
