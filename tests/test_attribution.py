"""Instances name whom they are for: project_id, user_id and a small metadata map, kept, audited and in the feed."""

from __future__ import annotations

import pytest

from lifecycle import Engine, InvalidInput
from lifecycle.store import downgrade, upgrade
from tests.conftest import FLAVOR, Fakes
from tests.images import fake_image


def test_create_keeps_project_user_and_metadata_in_record_audit_and_feed(engine: Engine) -> None:
    """The instance reads back with its project, user and metadata; its first audit row and feed change record them."""
    meta = {"role": "web", "tier": "é" * 255}
    task = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros", project_id="p-1", user_id="u-1", metadata=meta)
    uuid = task.instance_uuid
    instance = engine.get(uuid)
    assert (instance.project_id, instance.user_id, instance.metadata) == ("p-1", "u-1", meta)
    assert instance.to_dict()["metadata"] == meta and instance.to_dict()["project_id"] == "p-1"
    assert task.params["project_id"] == "p-1" and task.params["metadata"] == meta
    first = engine.history(uuid)[0]
    assert first.message is not None and first.message.startswith("project_id p-1, user_id u-1, metadata {")
    (created,) = [c for c in engine.feed.changes() if c.instance_uuid == uuid and c.old_vm_state is None]
    assert created.message == first.message
    engine.stop(uuid)  # attribution survives every later write
    assert engine.get(uuid).metadata == meta and engine.list(project_id="p-1")[0].uuid == uuid


def test_an_instance_without_attribution_has_none(engine: Engine) -> None:
    """Without project, user or metadata an instance has None, None and {}, and its first audit row no note."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    instance = engine.get(uuid)
    assert (instance.project_id, instance.user_id, instance.metadata) == (None, None, {})
    assert engine.history(uuid)[0].message is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"project_id": ""}, "invalid project_id name"),
        ({"user_id": "a\nb"}, "invalid user_id name"),
        ({"project_id": "p" * 256}, "1 to 255 characters"),
        ({"metadata": {"k": "v" * 256}}, "at most 255 characters"),
        ({"metadata": {"": "v"}}, "metadata key name"),
        ({"metadata": {"k": 1}}, "must be a printable string"),
        ({"metadata": ["k", "v"]}, "metadata must be a mapping"),
        ({"metadata": {f"k{n}": "v" for n in range(129)}}, "metadata has 129 items: at most 128"),
    ],
)
def test_bad_attribution_is_refused_and_nothing_is_made(engine: Engine, kwargs: dict[str, object], needle: str) -> None:
    """A bad project, user or metadata (Nova's limits: 255 characters, 128 items) is InvalidInput, no instance made."""
    with pytest.raises(InvalidInput, match=needle):
        engine.create("vm", host="h1", flavor=FLAVOR, image="cirros", **kwargs)  # type: ignore[arg-type]
    assert engine.list(include_deleted=True) == []


def test_instances_stored_before_0017_read_back_without_attribution(db_url: str) -> None:
    """Down to 0016 the attribution goes with its columns; back at head the instance reads back with none."""
    fakes = Fakes()
    with Engine(db_url, driver_factory=fakes.factory) as engine:
        engine.hosts.add("h1", "fake://")
        engine.hosts.heartbeat("h1")
        engine.images.add("cirros", fake_image("cirros"))
        uuid = engine.create("vm", flavor=FLAVOR, image="cirros", project_id="p", metadata={"k": "v"}).instance_uuid
    downgrade(db_url, "0016")
    upgrade(db_url)
    with Engine(db_url, driver_factory=fakes.factory) as engine:
        instance = engine.get(uuid)
        assert (instance.name, instance.project_id, instance.metadata) == ("vm", None, {})
