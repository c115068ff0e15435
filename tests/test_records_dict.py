"""Records as JSON-ready data: ``to_dict()`` keeps computed fields, encodes enums and datetimes, hides task internals."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from lifecycle import Engine
from lifecycle.records import to_plain
from tests.conftest import FLAVOR


def test_an_instance_dict_keeps_status_and_encodes_states_and_times(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """``Instance.to_dict()`` carries ``status`` (a property), states as stored values, times as ISO 8601, the flavor whole."""
    uuid = new_instance()
    engine.stop(uuid)
    data = engine.get(uuid).to_dict()
    assert (data["status"], data["vm_state"], data["task_state"], data["power_state"]) == (
        "SHUTOFF",
        "stopped",
        None,
        4,
    )
    assert data["created_at"] == engine.get(uuid).created_at.isoformat()
    assert data["flavor"] == {"name": "tiny", "vcpus": 1, "memory_mb": 64, "root_gb": 1, "extra_specs": {}}
    assert json.loads(json.dumps(data)) == data


def test_an_instance_is_hashable_and_equal_reads_hash_equal(engine: Engine) -> None:
    """An Instance (metadata and all) can be hashed, e.g. kept in a set; two reads of the same row hash the same."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros", metadata={"team": "web"}).instance_uuid
    first, again = engine.get(uuid), engine.get(uuid)
    assert first == again and hash(first) == hash(again)
    assert len({first, again}) == 1 and first.metadata == {"team": "web"}


def test_a_task_dict_leaves_out_the_engines_bookkeeping_unless_asked(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """``Task.to_dict()`` has no owner, lease, epoch or traceback; ``internal=True`` (the CLI's) adds them back."""
    task = engine.stop(new_instance())
    public, internal = task.to_dict(), task.to_dict(internal=True)
    assert {"owner", "lease_expires_at", "epoch", "traceback"}.isdisjoint(public)
    assert public["outcome"] == "succeeded" and public["cause"] == "api" and public["operation"] == "stop"
    assert internal["owner"] == engine.owner and internal.keys() - public.keys() == {
        "owner",
        "lease_expires_at",
        "epoch",
        "traceback",
    }
    json.dumps(internal)


def test_hosts_migrations_and_audit_entries_have_their_computed_fields(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """Host, Migration and AuditEntry dicts carry ``fenced``, the flavors as data and the feed ``position``."""
    uuid = new_instance()
    engine.stop(uuid)
    engine.migrate(uuid, host="h2")
    host = engine.hosts.get("h1").to_dict()
    (move,) = [m.to_dict() for m in engine.migrations()]
    entry = engine.history(uuid)[-1]
    assert host["fenced"] is False and host["name"] == "h1"
    assert (move["status"], move["new_flavor"]["name"], move["dest_host"]) == ("finished", "tiny", "h2")
    assert entry.to_dict()["position"] == str(entry.position)
    assert to_plain([engine.get(uuid)]) == [engine.get(uuid).to_dict()]  # the CLI's --json is the same encoding
    json.dumps([host, move, entry.to_dict()])


def test_steps_images_changes_and_consumers_serialize_too(engine: Engine, new_instance: Callable[..., str]) -> None:
    """What a control plane serves beside instances and tasks (a step log, images, feed changes, consumers) has to_dict."""
    uuid = new_instance()
    task = engine.stop(uuid)
    steps = [step.to_dict() for step in engine.steps(task.id)]
    assert steps and all(isinstance(step["started_at"], str) and step["task_id"] == task.id for step in steps)
    image = engine.images.list()[0].to_dict()
    assert isinstance(image["created_at"], str) and image["name"]
    change = engine.feed.changes()[-1]
    assert change.to_dict()["position"] == str(change.position) and change.to_dict()["instance_uuid"] == uuid
    stop = threading.Event()
    stop.set()  # one batch, then return
    engine.feed.follow("ui", lambda _change: None, stop=stop)
    (consumer,) = [c.to_dict() for c in engine.feed.consumers()]
    assert consumer["name"] == "ui" and ":" in consumer["position"]
    json.dumps([steps, image, change.to_dict(), consumer])
