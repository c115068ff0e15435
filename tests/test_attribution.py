"""Instances name whom they are for: project_id, user_id and a small metadata map, kept, audited and in the feed."""

from __future__ import annotations

import pytest

from lifecycle import Change, Engine, InvalidInput, PowerState
from lifecycle.feed import change_data, nova_notification
from lifecycle.store import downgrade, upgrade
from tests.conftest import FLAVOR, Fakes, wait_until
from tests.images import fake_image


def _changes(engine: Engine, uuid: str) -> list[Change]:
    return [c for c in engine.feed.changes(limit=1000) if c.instance_uuid == uuid]


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
    readable = wait_until("the create's change readable", lambda: _changes(engine, uuid))  # PostgreSQL: in commit order
    (created,) = [c for c in readable if c.old_vm_state is None]
    assert created.message == first.message
    engine.stop(uuid)  # attribution survives every later write
    assert engine.get(uuid).metadata == meta and engine.list(project_id="p-1")[0].uuid == uuid


def test_every_change_of_an_attributed_instance_carries_its_project_and_user(engine: Engine, fakes: Fakes) -> None:
    """Every audit row and feed change, an operation's and a sync pass's power change alike, names the project and user; the feed's JSON and Nova notification carry them."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros", project_id="p", user_id="u").instance_uuid
    engine.stop(uuid)
    engine.start(uuid)
    fakes["h1"].set_power(uuid, PowerState.SHUTDOWN, event=False)
    engine.hosts.sync("h1")
    history = engine.history(uuid)
    assert history[-1].cause == "sync" and history[-1].to_power_state == PowerState.SHUTDOWN
    assert {(e.project_id, e.user_id) for e in history} == {("p", "u")}
    changes: list[Change] = []

    def every_change() -> bool:
        changes[:] = _changes(engine, uuid)
        return len(changes) == len(history)

    wait_until("every change readable", every_change)  # PostgreSQL: in commit order
    assert {(c.project_id, c.user_id) for c in changes} == {("p", "u")}
    assert change_data(changes[-1])["project_id"] == "p"
    payload = nova_notification(changes[-1])["payload"]["nova_object.data"]
    assert (payload["tenant_id"], payload["user_id"]) == ("p", "u")


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
