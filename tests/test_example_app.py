"""examples/fastapi_app.py served by uvicorn in a process of its own, driven over HTTP as a client would."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path

import httpx
import pytest

from lifecycle import Engine
from tests.asgi import served_apart
from tests.conftest import wait_until
from tests.images import fake_image

ROOT = Path(__file__).resolve().parent.parent
TINY = {"vcpus": 1, "memory_mb": 64, "root_gb": 1, "name": "tiny"}


@pytest.mark.slow
def test_the_example_control_plane_creates_stops_starts_and_maps_errors(sqlite_url: str, tmp_path: Path) -> None:
    """Create, stop, 202 start and create followed through their tasks, history, 404, 409, 400 and delete, over HTTP."""
    with Engine(sqlite_url) as engine:
        engine.hosts.add("h1", "fake://")
        engine.images.add("cirros", fake_image("cirros"))
    app_dir = str(ROOT / "examples")
    env = {"LIFECYCLE_DB_URL": sqlite_url}
    log = tmp_path / "uvicorn.log"
    with (
        served_apart("fastapi_app:app", tmp_path, env, log, app_dir=app_dir) as base,
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        body = {"name": "web1", "flavor": TINY, "image": "cirros", "host": "h1"}
        created = http.post("/vms", json=body, headers={"X-Request-ID": "req-example-1"})
        assert created.status_code == 201, created.text
        vm = created.json()
        assert (vm["status"], created.headers["Location"]) == ("ACTIVE", f"/vms/{vm['uuid']}")

        stopped = http.post(f"/vms/{vm['uuid']}/action", json={"action": "stop"})
        assert (stopped.status_code, stopped.json()["status"]) == (200, "SHUTOFF"), stopped.text

        started = http.post(f"/vms/{vm['uuid']}/action", params={"wait": "false"}, json={"action": "start"})
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        assert location == f"/tasks/{started.json()['id']}"
        task = wait_until("the start task ended", lambda: _ended(http.get(location).json()))
        assert task["outcome"] == "succeeded" and task["steps"], task

        shown = http.get(f"/vms/{vm['uuid']}").json()
        assert shown["status"] == "ACTIVE"
        assert [e["operation"] for e in shown["history"]][-2:] == ["start", "start"]
        assert shown["history"][0]["request_id"] == "req-example-1"

        missing = http.get(f"/vms/{uuidlib.uuid4()}")
        assert (missing.status_code, missing.json()["error"]) == (404, "InstanceNotFound")
        refused = http.post(f"/vms/{vm['uuid']}/action", json={"action": "confirm"})
        assert (refused.status_code, refused.json()["error"]) == (409, "InvalidState"), refused.text
        no_flavor = http.post(f"/vms/{vm['uuid']}/action", json={"action": "resize"})
        assert (no_flavor.status_code, no_flavor.json()["error"]) == (400, "InvalidInput")

        assert http.delete(f"/vms/{vm['uuid']}").status_code == 204
        assert http.get(f"/vms/{vm['uuid']}").json()["vm_state"] == "deleted"

        later = http.post("/vms", params={"wait": "false"}, json={**body, "name": "web2"})
        assert (later.status_code, later.headers["Location"]) == (202, f"/tasks/{later.json()['id']}"), later.text
        built = wait_until("the create task ended", lambda: _ended(http.get(later.headers["Location"]).json()))
        assert built["outcome"] == "succeeded", built
        assert http.get(f"/vms/{later.json()['instance_uuid']}").json()["status"] == "ACTIVE"
    assert "Traceback" not in log.read_text(), log.read_text()


def _ended(task: dict[str, object]) -> dict[str, object] | None:
    return task if task["outcome"] != "running" else None
