"""An instance row and a migration row keep the whole flavor, extra specs included (Flavor.as_dict/from_dict)."""

from __future__ import annotations

import json
import uuid as uuids
from datetime import UTC, datetime

import sqlalchemy as sa

from lifecycle import Engine, Flavor, VmState
from lifecycle.records import Migration
from lifecycle.states import MigrationStatus
from lifecycle.store.tables import INSTANCES, MIGRATIONS

SSD = Flavor(2, 128, 1, name="ssd", extra_specs=(("capabilities:ssd", "true"), ("capabilities:tier", "gold")))
PLAIN = Flavor(4, 256, 2, name="plain")


def _ssd_instance(engine: Engine) -> str:
    """Create an active instance of flavor SSD on the one host that has the capabilities it asks for (all up)."""
    engine.hosts.add("fast", "fake://", capabilities={"ssd": "true", "tier": "gold"})
    for host in engine.hosts.list():
        engine.hosts.heartbeat(host.name)
    return engine.create("vm", flavor=SSD, image="cirros").instance_uuid


def test_an_instance_reads_back_with_its_flavors_extra_specs(engine: Engine) -> None:
    """An instance created with extra specs reads back with them, in order, stored as one JSON object."""
    uuid = _ssd_instance(engine)
    assert engine.get(uuid).flavor == SSD
    with engine.store.engine.connect() as conn:
        stored = conn.execute(sa.select(INSTANCES.c.flavor_extra_specs).where(INSTANCES.c.uuid == uuid)).scalar_one()
    assert json.loads(stored) == {"capabilities:ssd": "true", "capabilities:tier": "gold"}


def test_a_resize_rewrites_the_extra_specs_and_a_revert_restores_them(engine: Engine) -> None:
    """A resize to a flavor without extra specs leaves none on the row; the revert brings the old ones back."""
    uuid = _ssd_instance(engine)
    engine.resize(uuid, PLAIN)
    assert engine.get(uuid).flavor == PLAIN
    engine.revert_resize(uuid)
    reverted = engine.get(uuid)
    assert (reverted.flavor, reverted.vm_state) == (SSD, VmState.ACTIVE)


def test_a_migration_row_round_trips_flavors_with_extra_specs(engine: Engine) -> None:
    """A migration row's old and new flavors read back whole, each with its own extra specs."""
    uuid = _ssd_instance(engine)
    task_id = engine.tasks(uuid)[-1].id
    bigger = Flavor(4, 512, 4, name="ssd-big", extra_specs=(("capabilities:ssd", "true"),))
    at = datetime.now(UTC)
    migration = Migration(
        id=str(uuids.uuid4()),
        instance_uuid=uuid,
        task_id=task_id,
        kind="resize",
        source_host="fast",
        dest_host=None,
        old_flavor=SSD,
        new_flavor=bigger,
        status=MigrationStatus.PRE_MIGRATING,
        previous_vm_state=VmState.ACTIVE,
        source_disk=None,
        created_at=at,
        updated_at=at,
        finished_at=None,
    )
    engine.store.moves.add(migration)
    read = engine.store.moves.get(migration.id)
    assert (read.old_flavor, read.new_flavor) == (SSD, bigger)


def test_a_migration_row_written_before_extra_specs_were_kept_reads_back_without_them(engine: Engine) -> None:
    """A flavor stored as name and sizes only (rows written before) reads back with no extra specs."""
    uuid = _ssd_instance(engine)
    engine.migrate(uuid, host="h1")
    moved = engine.store.moves.open_of(uuid)
    assert moved is not None and moved.old_flavor == SSD
    old_style = json.dumps({"name": "ssd", "vcpus": 2, "memory_mb": 128, "root_gb": 1})
    with engine.store.engine.begin() as conn:
        conn.execute(sa.update(MIGRATIONS).where(MIGRATIONS.c.id == moved.id).values(old_flavor=old_style))
    assert engine.store.moves.get(moved.id).old_flavor == Flavor(2, 128, 1, name="ssd")
    engine.confirm_resize(uuid)
