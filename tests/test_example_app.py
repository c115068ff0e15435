"""examples/fastapi_app.py served by uvicorn in a process of its own, driven over HTTP as a client would."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
    log = tmp_path / "uvicorn.log"
    with _served(sqlite_url, tmp_path, log) as http:
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


@pytest.mark.slow
def test_the_example_replays_a_create_by_its_idempotency_key_and_lists_in_pages(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A create retried with its Idempotency-Key, or raced ten times with one, makes one instance; GET /vms pages."""
    log = tmp_path / "uvicorn.log"
    with _served(sqlite_url, tmp_path, log) as http:
        body = {"name": "web1", "flavor": TINY, "image": "cirros", "project_id": "acme", "metadata": {"role": "web"}}
        first = http.post("/vms", json=body, headers={"Idempotency-Key": "create-web1"})
        again = http.post("/vms", json=body, headers={"Idempotency-Key": "create-web1"})
        assert (first.status_code, again.status_code) == (201, 201), (first.text, again.text)
        assert again.json()["uuid"] == first.json()["uuid"]
        assert (first.json()["project_id"], first.json()["metadata"]) == ("acme", {"role": "web"})
        assert first.json()["flavor"]["extra_specs"] == {}  # to_dict's encoding, not jsonable_encoder's []

        raced = {**body, "name": "web2"}
        with ThreadPoolExecutor(10) as pool:
            answers = list(
                pool.map(lambda _: http.post("/vms", json=raced, headers={"Idempotency-Key": "create-web2"}), range(10))
            )
        assert {(a.status_code, a.json()["status"]) for a in answers} == {(201, "ACTIVE")}, [a.text for a in answers]
        assert len({a.json()["uuid"] for a in answers}) == 1
        third = http.post("/vms", json={**body, "name": "web3", "project_id": "other"})
        assert third.status_code == 201, third.text

        page = http.get("/vms", params={"project_id": "acme", "limit": 1})
        assert page.status_code == 200, page.text
        names = [vm["name"] for vm in page.json()["instances"]]
        following = page.json()["next"]
        while following is not None:
            page = http.get(following)
            names += [vm["name"] for vm in page.json()["instances"]]
            following = page.json()["next"]
        assert names == ["web1", "web2"]
        everything = http.get("/vms").json()
        assert ([vm["name"] for vm in everything["instances"]], everything["next"]) == (["web1", "web2", "web3"], None)
        assert http.post(f"/vms/{third.json()['uuid']}/action", json={"action": "stop"}).status_code == 200
        shutoff = http.get("/vms", params={"status": "SHUTOFF"}).json()["instances"]
        assert [vm["name"] for vm in shutoff] == ["web3"]
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.slow
def test_the_example_answers_a_malformed_request_as_invalid_input(sqlite_url: str, tmp_path: Path) -> None:
    """Bad JSON, a wrong field, an unknown action, ?wait=maybe and ?limit=0 get 400 InvalidInput, message and detail."""
    log = tmp_path / "uvicorn.log"
    with _served(sqlite_url, tmp_path, log) as http:
        vm = http.post("/vms", json={"name": "web1", "flavor": TINY, "image": "cirros"}).json()
        answers = [
            http.post("/vms", content=b"{not json", headers={"content-type": "application/json"}),
            http.post("/vms", json={"name": "x", "image": "cirros", "flavor": {**TINY, "vcpus": "a"}}),
            http.post(f"/vms/{vm['uuid']}/action", json={"action": "explode"}),
            http.post("/vms", params={"wait": "maybe"}, json={"name": "x", "flavor": TINY, "image": "cirros"}),
            http.get("/vms", params={"limit": 0}),
        ]
        for answer in answers:
            assert answer.status_code == 400, answer.text
            data = answer.json()
            assert data["error"] == "InvalidInput" and data["message"].startswith("the request is malformed: ")
            assert isinstance(data["detail"], list) and data["detail"], data
        assert "wait" in answers[3].json()["message"] and "vcpus" in answers[1].json()["message"]
        assert [vm["name"] for vm in http.get("/vms").json()["instances"]] == ["web1"]
    assert "Traceback" not in log.read_text(), log.read_text()


@contextmanager
def _served(sqlite_url: str, tmp_path: Path, log: Path) -> Iterator[httpx.Client]:
    """Serve the example in a process of its own on a database with host h1 (a state file: shared) and cirros."""
    with Engine(sqlite_url) as engine:
        engine.hosts.add("h1", f"fake://{tmp_path}/h1.json")
        engine.images.add("cirros", fake_image("cirros"))
    env = {"LIFECYCLE_DB_URL": sqlite_url}
    with (
        served_apart("fastapi_app:app", tmp_path, env, log, app_dir=str(ROOT / "examples")) as base,
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        yield http


def _ended(task: dict[str, object]) -> dict[str, object] | None:
    return task if task["outcome"] != "running" else None
