"""The two forms of a task's state writes: one statement each (PostgreSQL) and statement by statement (SQLite)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa

from lifecycle import Conflict, Engine, PowerState, Preempted, TaskState
from lifecycle.audit import Why
from lifecycle.errors import Fenced
from lifecycle.records import Cause, Outcome
from lifecycle.states import VmState
from lifecycle.store._pg import OneStatement
from lifecycle.store._rows import AUDITS, INSTANCES, STEPS, TASKS
from lifecycle.store._statements import Statements
from lifecycle.store.writes import WriteForm, Writes
from tests.conftest import FLAVOR, Fakes, make_engine
from tests.invariants import check_invariants

KINDS = ("create", "begin", "advance", "finish")


def _recorded(form: type[WriteForm], kinds: list[str]) -> WriteForm:
    """The real ``form``, noting in ``kinds`` each write it makes."""

    def noted(kind: str) -> Any:
        def write(self: Any, *args: Any, **kwargs: Any) -> None:
            kinds.append(kind)
            getattr(super(recorded, self), kind)(*args, **kwargs)

        return write

    recorded = type(f"Recorded{form.__name__}", (form,), {kind: noted(kind) for kind in KINDS})
    return recorded()


@pytest.fixture
def pg_engine(db_url: str, fakes: Fakes) -> Iterator[Engine]:
    """An engine over a fresh migrated database (PostgreSQL: the tests below ask for it), hosts h1 and h2, image cirros."""
    engine = make_engine(db_url, fakes, shutdown_timeout=0.0)
    yield engine
    check_invariants(engine.store)
    engine.close()


def _life(engine: Engine, name: str) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Create and stop instance ``name``; return its rows with ids and times made comparable, and the SQL verbs sent."""
    sent: list[str] = []

    def note(*args: Any) -> None:
        sent.append(args[2].split()[0])

    sa.event.listen(engine.store.engine, "before_cursor_execute", note)
    try:
        uuid = engine.create(name, host="h1", flavor=FLAVOR, image="cirros").instance_uuid
        engine.stop(uuid)
    finally:
        sa.event.remove(engine.store.engine, "before_cursor_execute", note)
    with engine.store.engine.connect() as conn:
        tasks = conn.execute(sa.select(TASKS).where(TASKS.c.instance_uuid == uuid).order_by(TASKS.c.started_at))
        tasks_read = tasks.mappings().all()
        task_ids = [t["id"] for t in tasks_read]
        read = {
            "instance": sa.select(INSTANCES).where(INSTANCES.c.uuid == uuid),
            "steps": sa.select(STEPS).where(STEPS.c.task_id.in_(task_ids)).order_by(STEPS.c.id),
            "audit": sa.select(AUDITS).where(AUDITS.c.instance_uuid == uuid).order_by(AUDITS.c.id),
        }
        rows = {"tasks": tasks_read, **{table: conn.execute(q).mappings().all() for table, q in read.items()}}
    names = {uuid: "<instance>", name: "<name>"}
    for i, task in enumerate(tasks_read):
        names |= {task["id"]: f"<task {i}>", task["request_id"]: f"<request {i}>"}
    transactions = list(dict.fromkeys(r["tx"] for r in rows["audit"]))
    return {table: [_comparable(r, names, transactions) for r in found] for table, found in rows.items()}, sent


def _comparable(row: sa.RowMapping, names: dict[str, str], transactions: list[int]) -> dict[str, Any]:
    """``row`` without what differs between two lives: serial ids, times, generated names; which transaction is kept."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key == "id" and isinstance(value, int):
            continue
        if isinstance(value, str):
            for known, placeholder in names.items():
                value = value.replace(known, placeholder)
        if key == "disk" and value is not None:
            value = re.sub(r"\.[0-9a-f]+-", ".<random>-", value)
        if key == "tx":
            value = transactions.index(value)  # the audit rows' transactions, numbered in order
        out[key] = "<time>" if isinstance(value, datetime) else value
    return out


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_both_forms_write_the_same_rows_for_a_task_life_on_postgresql(pg_engine: Engine) -> None:
    """On PostgreSQL, a create and a stop leave the same instance, task, step and audit rows in either form."""
    kinds: dict[str, list[str]] = {"one": [], "several": []}
    lives = {}
    for form, label in ((OneStatement, "one"), (Statements, "several")):
        pg_engine.store.writes = Writes(pg_engine.store.db, _recorded(form, kinds[label]))
        lives[label] = _life(pg_engine, f"vm-{label}")
    (one, one_sent), (several, several_sent) = lives["one"], lives["several"]
    assert set(kinds["one"]) == set(kinds["several"]) == set(KINDS)
    assert kinds["one"] == kinds["several"]
    assert one == several
    assert one["instance"][0]["vm_state"] == "stopped" and len(one["tasks"]) == 2 and len(one["audit"]) >= 4
    # The forms really differ on the wire: each of the one-statement form's writes is a WITH; the other sends none.
    assert one_sent.count("WITH") == len(kinds["one"]) and "WITH" not in several_sent
    assert len(several_sent) > len(one_sent)


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("form", [OneStatement, Statements])
def test_both_forms_raise_the_same_errors_and_write_nothing_when_they_lose(
    pg_engine: Engine, form: type[WriteForm]
) -> None:
    """In either form a stale start raises Conflict, a preempted worker Preempted, a fenced one Fenced: nothing written."""
    pg_engine.store.writes = writes = Writes(pg_engine.store.db, form())
    uuid = pg_engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    before, history = pg_engine.get(uuid), pg_engine.history(uuid)
    stop, hard = (
        pg_engine.runner.new_task(uuid, "stop", params={}, request_id=None, key=None, actor=actor, cause=Cause.API)
        for actor in ("a", "b")
    )
    why = {task.id: Why(actor="test", cause=Cause.API, operation="stop", task_id=task.id) for task in (stop, hard)}
    with pytest.raises(Conflict):
        writes.begin(replace(before, version=before.version - 1), stop, TaskState.POWERING_OFF, why[stop.id], None)
    assert pg_engine.get(uuid) == before and pg_engine.history(uuid) == history
    assert stop.id not in [t.id for t in pg_engine.store.tasks.of(uuid)]

    stopping = writes.begin(before, stop, TaskState.POWERING_OFF, why[stop.id], None)
    history = pg_engine.history(uuid)
    ended = {"vm_state": VmState.STOPPED, "power_state": PowerState.SHUTDOWN, "outcome": Outcome.SUCCEEDED}
    with pytest.raises(Fenced):
        writes.finish(stopping, replace(stop, epoch=stop.epoch + 1), why=why[stop.id], **ended)
    assert pg_engine.get(uuid) == stopping and pg_engine.history(uuid) == history
    assert pg_engine.store.tasks.get(stop.id).outcome is Outcome.RUNNING

    taken = writes.begin(stopping, hard, TaskState.POWERING_OFF, why[hard.id], stop)
    history = pg_engine.history(uuid)
    with pytest.raises(Preempted):
        writes.advance(stopping, stop, 2, TaskState.POWERING_OFF, why[stop.id])
    assert pg_engine.get(uuid) == taken and pg_engine.history(uuid) == history
    assert pg_engine.store.tasks.get(stop.id).outcome is Outcome.PREEMPTED
    writes.finish(taken, hard, why=why[hard.id], **ended)


def test_on_sqlite_a_task_writes_statement_by_statement(sqlite_url: str, fakes: Fakes) -> None:
    """SQLite's writes use the several-statement form: a stop's start and end are plain UPDATEs and INSERTs, no WITH."""
    engine = make_engine(sqlite_url, fakes, shutdown_timeout=0.0)
    try:
        rows, sent = _life(engine, "vm")
        assert "WITH" not in sent and sent.count("UPDATE") >= 4 and sent.count("INSERT") >= 4
        assert rows["instance"][0]["vm_state"] == "stopped" and [s["result"] for s in rows["steps"]][-1] == "ok"
    finally:
        engine.close()
