"""A host's image cache cleanup reads what to keep in a few queries, however many instances there are."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from lifecycle import Engine, VmState
from lifecycle.graph import MOVE_TASK_STATES
from tests.conftest import FLAVOR


@contextmanager
def _statements(engine: Engine) -> Iterator[list[str]]:
    """Collect the queries (SELECT statements) the engine's database connection sends within the block."""
    sent: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append(statement)

    sa.event.listen(engine.store.engine, "before_cursor_execute", note)
    try:
        yield sent
    finally:
        sa.event.remove(engine.store.engine, "before_cursor_execute", note)


def test_the_instances_a_move_still_needs_are_read_in_one_query(engine: Engine) -> None:
    """Resized instances are kept by every host's cleanup; idle and deleted ones are not; one query reads them."""
    idle = engine.create("idle", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    moved = engine.create("moved", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    gone = engine.create("gone", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    engine.migrate(moved, host="h2")
    engine.delete(gone)
    assert engine.get(moved).vm_state is VmState.RESIZED
    with _statements(engine) as sent:
        moving = engine.store.images.moving_instances(MOVE_TASK_STATES)
    assert moving == {moved} and idle not in moving and len(sent) == 1


def test_the_cleanup_costs_the_same_queries_for_more_instances(engine: Engine) -> None:
    """Ten more instances on the host add no query to its cleanup (it used to ask one per instance)."""
    engine.create("first", host="h1", flavor=FLAVOR, image="cirros")
    with _statements(engine) as few:
        engine.images.clean_cache("h1", 0)
    for n in range(10):
        engine.create(f"more-{n}", host="h1", flavor=FLAVOR, image="cirros")
    with _statements(engine) as many:
        engine.images.clean_cache("h1", 0)
    assert len(many) == len(few) <= 4, many
