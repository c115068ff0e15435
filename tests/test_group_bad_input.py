"""Bad input on the engine's groups and on the calls a hostile review found loose: a typed error, nothing changed."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from lifecycle import Engine, Flavor, InvalidInput
from lifecycle.graph import Op
from lifecycle.results import WindowOutcome


def test_a_flavor_takes_its_extra_specs_as_a_mapping_as_nova_gives_them() -> None:
    """Flavor(extra_specs={...}) keeps them as sorted pairs, equal to the same flavor built from pairs."""
    given = Flavor(2, 128, 2, extra_specs={"capabilities:ssd": "true", "aggregate_instance_extra_specs:a": "b"})
    assert given.extra_specs == (("aggregate_instance_extra_specs:a", "b"), ("capabilities:ssd", "true"))
    assert given == Flavor(
        2, 128, 2, extra_specs=(("aggregate_instance_extra_specs:a", "b"), ("capabilities:ssd", "true"))
    )


def test_unlock_refuses_an_override_that_is_not_a_bool(engine: Engine, new_instance: Callable[..., str]) -> None:
    """override_lock="false" is refused, not read as an admin's override: the lock stays with its holder."""
    uuid = new_instance()
    engine.lock(uuid, reason="maintenance", actor="alice")
    with pytest.raises(InvalidInput, match="override_lock must be True or False"):
        engine.unlock(uuid, actor="mallory", override_lock="false")  # type: ignore[arg-type]
    assert engine.get(uuid).locked_by == "alice"


def test_recover_refuses_a_force_that_is_not_a_bool(engine: Engine) -> None:
    """recover(force="no") is refused instead of taking tasks whose lease is live."""
    with pytest.raises(InvalidInput, match="force must be True or False"):
        engine.recover(force="no")  # type: ignore[arg-type]


def test_run_refuses_create_and_names_the_call_that_creates(engine: Engine) -> None:
    """engine.run(Op.CREATE, ...) says to use Engine.create, instead of a message about a missing name."""
    with pytest.raises(InvalidInput, match=r"Engine\.create"):
        engine.run(Op.CREATE, "7d9f2c1e-0000-4000-8000-000000000001")


def test_follow_refuses_a_stop_that_is_not_an_event_before_delivering(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """A stop that is no threading.Event is refused before the handler sees a change or a consumer is registered."""
    new_instance()
    seen: list[object] = []
    with pytest.raises(InvalidInput, match=r"stop must be a threading\.Event"):
        engine.feed.follow("billing", seen.append, stop="x")  # type: ignore[arg-type]
    assert seen == [] and engine.feed.consumers() == []
    with pytest.raises(InvalidInput, match=r"stop must be a threading\.Event"):
        engine.feed.deliver_webhook("http://127.0.0.1:9/hook", b"s" * 32, stop=None)  # type: ignore[arg-type]
    assert engine.feed.webhook_urls() == {}
    assert engine.feed.follow(None, seen.append, stop=_set()) >= 1  # a real Event still works


def test_an_audit_query_for_an_unknown_operation_is_refused(engine: Engine, new_instance: Callable[..., str]) -> None:
    """operation="frobnicate" is refused naming the known ones; an operation and an activity are accepted."""
    new_instance()
    with pytest.raises(InvalidInput, match="unknown operation 'frobnicate'"):
        engine.feed.audit(operation="frobnicate")
    assert [e.operation for e in engine.feed.audit(operation=Op.CREATE)] != []
    assert engine.feed.audit(operation="lock") == []


def test_the_resize_window_reports_its_outcomes_as_an_enum() -> None:
    """WindowOutcome members read as the text the window reported before (done, skipped, retry)."""
    assert [str(o) for o in WindowOutcome] == ["done", "skipped", "retry"]


def _set() -> threading.Event:
    stop = threading.Event()
    stop.set()
    return stop
