"""Small defects a hostile pass found around ownership on the hypervisor (fake hosts)."""

from __future__ import annotations

import pytest

from lifecycle import Engine, InvalidInput
from lifecycle.clock import ManualClock
from lifecycle.errors import HostNotFound
from tests.conftest import FLAVOR


def test_migrate_to_the_host_it_is_on_is_refused_and_writes_nothing(engine: Engine) -> None:
    """migrate --host naming the instance's own host is bad input (nothing written), not a task failing NoValidHost."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    before = engine.history(uuid)
    with pytest.raises(InvalidInput, match="that is the host it is on"):
        engine.migrate(uuid, host="h1")
    assert engine.history(uuid) == before and len(engine.store.tasks.of(uuid)) == 1


def test_heartbeat_of_an_unknown_host_names_the_known_ones(engine: Engine) -> None:
    """A heartbeat of a host nobody added says which hosts exist, as host show does."""
    with pytest.raises(HostNotFound, match="h1, h2"):
        engine.hosts.heartbeat("nosuch")


def test_an_audit_note_is_stamped_when_it_is_written(engine: Engine, clock: ManualClock) -> None:
    """A note (something done on the hypervisor) carries its own time, not the instance's last change."""
    from datetime import timedelta

    from lifecycle.audit import Why
    from lifecycle.records import Cause

    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    last = engine.history(uuid)[-1]
    clock.advance(5)
    engine.store.writes.note(engine.get(uuid), Why(actor="sync", cause=Cause.SYNC, operation="check", message="noted"))
    note = engine.history(uuid)[-1]
    assert note.message == "noted" and note.created_at == clock.now() == last.created_at + timedelta(seconds=5)
