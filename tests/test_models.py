"""lifecycle.models: SQLModel classes that read, in a plain sqlmodel.Session, the rows the engine wrote.

No ``from __future__ import annotations`` here: the embedder's table below is
a SQLModel class, and SQLModel reads its relationship annotation at class
creation.
"""

import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import sqlalchemy as sa
from sqlmodel import Field, Relationship, Session, SQLModel, create_engine, select

from lifecycle import Engine, Flavor, models
from lifecycle.audit import AuditEntry
from lifecycle.store import tables
from lifecycle.store.db import aware
from tests.conftest import Fakes
from tests.images import fake_image

README = Path(__file__).parents[1] / "README.md"
SSD = Flavor(2, 128, 1, name="ssd", extra_specs=(("capabilities:ssd", "true"),))
_MODELS = {
    models.Host: tables.HOSTS,
    models.Claim: tables.CLAIMS,
    models.Image: tables.IMAGES,
    models.Instance: tables.INSTANCES,
    models.Task: tables.TASKS,
    models.TaskStep: tables.STEPS,
    models.AuditEntry: tables.AUDITS,
    models.Migration: tables.MIGRATIONS,
}


class Ticket(SQLModel, table=True):
    """An embedder's own table, in SQLModel's default registry and metadata, pointing at an instance."""

    __tablename__ = "test_models_tickets"

    id: int | None = Field(default=None, primary_key=True)
    subject: str
    instance_uuid: str = Field(
        sa_column=sa.Column(sa.String(36), sa.ForeignKey(models.Instance.uuid), nullable=False, index=True)
    )
    instance: models.Instance = Relationship()


@dataclasses.dataclass
class World:
    """What the engine wrote: its URL, the engine (still open) and the instances' uuids."""

    url: str
    engine: Engine
    moved: str
    stopped: str


@pytest.fixture
def world(db_url: str) -> Iterator[World]:
    """Hosts with resources, an image, an instance stopped, another migrated (claims on two hosts, a migration row)."""
    fakes = Fakes()
    with Engine(db_url, driver_factory=fakes.factory) as engine:
        engine.hosts.add("h1", "fake://", vcpus=8, memory_mb=4096, disk_gb=40, capabilities={"ssd": "true"})
        engine.hosts.add("h2", "fake://", vcpus=8, memory_mb=4096, disk_gb=40, capabilities={"ssd": "true"})
        for name in ("h1", "h2"):
            engine.hosts.heartbeat(name, {"cpu.percent": 12.5})
        engine.images.add("cirros", fake_image("cirros"), properties={"architecture": "x86_64"})
        stopped = engine.create("stopped", host="h1", flavor=SSD, image="cirros").instance_uuid
        engine.stop(stopped)
        moved = engine.create("moved", host="h1", flavor=Flavor(1, 64, 1, name="tiny"), image="cirros").instance_uuid
        engine.migrate(moved, host="h2")
        yield World(db_url, engine, moved, stopped)


@pytest.fixture
def session(world: World) -> Iterator[Session]:
    """A plain sqlmodel.Session on the engine's database, through an SQLAlchemy engine of its own."""
    db = create_engine(world.url)
    try:
        with Session(db) as session:
            yield session
    finally:
        db.dispose()


def _plain(value: Any) -> Any:
    """Return a record's value as the column stores it: timestamps aware, flavors and dicts as their data."""
    if isinstance(value, datetime):
        return aware(value)
    if isinstance(value, Flavor):
        return value.as_dict()
    return value


def _stored(model: SQLModel, name: str, like: Any) -> Any:
    """Return a model's field the way a record holds it: timestamps aware, JSON text decoded when the record has data."""
    value = getattr(model, name)
    if isinstance(value, datetime):
        return aware(value)
    if isinstance(value, str) and isinstance(like, dict | Flavor):
        return json.loads(value)
    return value


def _assert_same(model: SQLModel, record: Any) -> None:
    """Every field the record and the model share holds the same value."""
    shared = [f.name for f in dataclasses.fields(record) if f.name in type(model).model_fields]
    assert shared, f"{type(model).__name__} shares no field with {type(record).__name__}"
    for name in shared:
        expected = _plain(getattr(record, name))
        assert _stored(model, name, getattr(record, name)) == expected, f"{type(model).__name__}.{name}"


def test_each_model_reads_the_values_the_engine_reports(world: World, session: Session) -> None:
    """Instance, Task, TaskStep, AuditEntry, Host, Image, Migration and Claim rows hold what the engine's reads return."""
    engine = world.engine
    for uuid in (world.stopped, world.moved):
        instance = session.get(models.Instance, uuid)
        assert instance is not None
        _assert_same(instance, engine.get(uuid))
        flavor = Flavor.from_dict(
            {
                "name": instance.flavor_name,
                "vcpus": instance.vcpus,
                "memory_mb": instance.memory_mb,
                "root_gb": instance.root_gb,
                "extra_specs": json.loads(instance.flavor_extra_specs),
            }
        )
        assert flavor == engine.get(uuid).flavor
        tasks = session.exec(select(models.Task).where(models.Task.instance_uuid == uuid)).all()
        assert sorted(t.id for t in tasks) == sorted(t.id for t in engine.tasks(uuid))
        for task in tasks:
            _assert_same(task, engine.task(task.id))
            steps = session.exec(select(models.TaskStep).where(models.TaskStep.task_id == task.id)).all()
            reported = engine.steps(task.id)
            assert len(steps) == len(reported)
            for step, record in zip(sorted(steps, key=lambda s: s.seq), reported, strict=True):
                _assert_same(step, record)
        audit = session.exec(select(models.AuditEntry).where(models.AuditEntry.instance_uuid == uuid)).all()
        history = engine.history(uuid)
        assert len(audit) == len(history) > 1
        for entry, record in zip(sorted(audit, key=lambda a: a.id), history, strict=True):
            _assert_same(entry, record)
    for host in engine.hosts.list():
        row = session.get(models.Host, host.name)
        assert row is not None
        _assert_same(row, host)
    for image in engine.images.list():
        row = session.get(models.Image, image.name)
        assert row is not None
        _assert_same(row, image)
    (migration,) = engine.migrations()
    row = session.get(models.Migration, migration.id)
    assert row is not None
    _assert_same(row, migration)
    claims = session.exec(select(models.Claim).where(models.Claim.instance_uuid == world.moved)).all()
    assert sorted(c.host for c in claims) == ["h1", "h2"]


def test_joins_give_instances_with_their_tasks_and_steps_and_hosts_with_their_claims(
    world: World, session: Session
) -> None:
    """A join over the engine's foreign keys, and the view-only relationships, match what the engine reports."""
    engine = world.engine
    query = (
        select(models.Instance.uuid, models.Task.id, models.TaskStep.seq, models.TaskStep.name)
        .join(models.Task, models.Task.instance_uuid == models.Instance.uuid)
        .join(models.TaskStep)
        .order_by(models.Instance.uuid, models.Task.started_at, models.Task.id, models.TaskStep.seq)
    )
    joined = [tuple(row) for row in session.exec(query)]
    expected = sorted(
        (uuid, task.id, step.seq, step.name)
        for uuid in (world.moved, world.stopped)
        for task in engine.tasks(uuid)
        for step in engine.steps(task.id)
    )
    assert sorted(joined) == expected and joined
    instance = session.get(models.Instance, world.stopped)
    assert instance is not None
    assert [t.operation for t in instance.tasks] == [t.operation for t in engine.tasks(world.stopped)]
    assert [s.name for s in instance.tasks[-1].steps] == [s.name for s in engine.steps(instance.tasks[-1].id)]
    assert instance.tasks[-1].instance.uuid == world.stopped
    moved = session.get(models.Instance, world.moved)
    assert moved is not None and [m.id for m in moved.migrations] == [m.id for m in engine.migrations()]
    used = {
        host.name: sum(claim.vcpus for claim in host.claims)
        for host in session.exec(select(models.Host).join(models.Claim).distinct())
    }
    assert used == {host.name: host.vcpus_used for host in engine.hosts.list()}
    on_h1 = session.exec(select(models.Host).where(models.Host.name == "h1")).one()
    assert sorted(i.uuid for i in on_h1.instances) == sorted(i.uuid for i in engine.list(host="h1"))


def test_an_embedders_own_table_joins_the_engines_in_one_session(world: World, session: Session) -> None:
    """An embedder's SQLModel table with a foreign key to Instance is created alone and joins it both ways."""
    db = session.get_bind()
    SQLModel.metadata.create_all(db, tables=[Ticket.__table__])
    assert set(SQLModel.metadata.tables).isdisjoint(tables.metadata.tables)
    session.add(Ticket(subject="slow disk", instance_uuid=world.stopped))
    session.commit()
    ticket, instance = session.exec(select(Ticket, models.Instance).join(models.Instance)).one()
    assert (ticket.subject, instance.uuid, instance.vm_state) == ("slow disk", world.stopped, "stopped")
    assert ticket.instance.name == "stopped"
    with_tickets = session.exec(select(models.Instance).join(Ticket).where(Ticket.subject == "slow disk")).all()
    assert [i.uuid for i in with_tickets] == [world.stopped]


def test_the_models_are_read_only(world: World, session: Session) -> None:
    """Adding, changing or deleting an engine row through the models raises at flush and writes nothing."""
    instance = session.get(models.Instance, world.stopped)
    assert instance is not None
    instance.vm_state = "active"
    with pytest.raises(sa.exc.InvalidRequestError, match=r"models\.Instance is read-only"):
        session.flush()
    session.rollback()
    host = session.get(models.Host, "h2")
    assert host is not None
    session.delete(host)
    with pytest.raises(sa.exc.InvalidRequestError, match=r"models\.Host is read-only"):
        session.flush()
    session.rollback()
    session.add(models.Image(name="sneaky", path="/x", disk_format="raw", min_disk_gb=0, properties="{}"))
    with pytest.raises(sa.exc.InvalidRequestError, match=r"models\.Image is read-only"):
        session.commit()
    session.rollback()
    assert world.engine.get(world.stopped).vm_state.value == "stopped"
    assert {h.name for h in world.engine.hosts.list()} == {"h1", "h2"}
    assert [i.name for i in world.engine.images.list()] == ["cirros"]


def _annotation(model: type[SQLModel], name: str) -> tuple[type, bool]:
    """Return a field's Python type and whether it admits None."""
    annotation = model.model_fields[name].annotation
    if get_origin(annotation) in (Union, type(int | None)):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0], True
    assert isinstance(annotation, type)
    return annotation, False


@pytest.mark.parametrize("model", list(_MODELS), ids=lambda m: m.__name__)
def test_each_model_is_its_engine_table_field_for_column(model: type[SQLModel]) -> None:
    """The class maps the engine's own Core table (outside SQLModel.metadata), one field per column of its type and nullability."""
    table = _MODELS[model]
    assert model.__table__ is table  # type: ignore[attr-defined]
    assert model.metadata is tables.metadata is models.metadata
    assert table.name not in SQLModel.metadata.tables
    assert list(model.model_fields) == list(table.c.keys())
    for column in table.c:
        python_type, optional = _annotation(model, column.name)
        assert (python_type, optional) == (column.type.python_type, column.nullable), f"{model.__name__}.{column.name}"


def test_the_readme_example_runs_on_the_engines_database(world: World) -> None:
    """The README's "Reading the engine's tables" example runs as written on a database the engine wrote."""
    section = README.read_text().split("## Reading the engine's tables from your own code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    source = code.group(1).replace('"sqlite:///lifecycle.db"', repr(world.url))
    assert source != code.group(1), "the example no longer opens sqlite:///lifecycle.db"
    done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "stopped" in done.stdout and "slow disk" in done.stdout


def test_engine_entries_never_import_sqlmodel() -> None:
    """Importing lifecycle, its engine and its store loads neither sqlmodel nor lifecycle.models (embedders opt in)."""
    script = (
        "import sys, lifecycle, lifecycle.engine, lifecycle.store, lifecycle.daemon, lifecycle.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sqlmodel' or m == 'lifecycle.models'))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_audit_model_has_every_audit_entry_field() -> None:
    """AuditEntry (the model) holds every field of lifecycle.AuditEntry, the record the engine's history returns."""
    assert {f.name for f in dataclasses.fields(AuditEntry)} <= set(models.AuditEntry.model_fields)
