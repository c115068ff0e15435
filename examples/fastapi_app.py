"""A small control plane on lifecycle: FastAPI over :class:`lifecycle.AsyncEngine`, the daemon in the same process.

Run it (the database migrated, hosts and an image registered)::

    LIFECYCLE_DB_URL=sqlite:////var/lib/lifecycle/lifecycle.db uvicorn fastapi_app:app --app-dir examples

Register hosts from another process (the ``lifecycle`` command) only with URIs
every process shares: libvirt URIs, or a fake host with a state file
(``fake:///ABS/state.json``). A ``fake://`` host without one lives in the
memory of the process that added it: this app's daemon refuses to serve a
``fake://`` host another process added (``InMemoryHostElsewhere``, logged), so
it never heartbeats and counts as down. Add those here, in :func:`lifespan`
(``await asyncio.to_thread(engine.hosts.add, "h1", "fake://")`` before the
daemon starts).

Routes:

- ``POST /vms``: create (``name``, ``flavor``, ``image``, optional ``host``,
  ``project_id``, ``user_id``, ``metadata``); 201 with the instance, or with
  ``?wait=false`` 202 at once and ``Location: /tasks/{id}`` to follow the task
  (the 202 pattern).
- ``GET /vms``: instances oldest first, ``?status=`` (``SHUTOFF``),
  ``?project_id=``, paged by ``?limit=`` (1 to 1000, default 1000) and
  ``?marker=`` (the last uuid of the previous page); ``next`` is the next
  page's link while a page is full.
- ``POST /vms/{uuid}/action``: ``{"action": "stop" | "start" | "resize" |
  "confirm" | "revert"}`` (a resize names its ``flavor``); 200 with the
  instance, or 202 with ``?wait=false``.
- ``DELETE /vms/{uuid}``: 204, or 202 with ``?wait=false``.
- ``GET /vms/{uuid}``: the instance, its status and its audit history.
- ``GET /tasks/{id}``: a task and its step log; ``GET /health``.

An ``X-Request-ID`` header is recorded on the task and every audit row it
writes; an ``Idempotency-Key`` header (on a create too) makes a retried call
return the first call's task and instance, however many race. Records are
answered as their ``to_dict()``. Errors are JSON ``{"error": type,
"message": text}`` with the status of :data:`STATUS`; a request FastAPI
cannot read (bad JSON, an unknown action, ``?wait=maybe``) is an
``InvalidInput`` (400) with FastAPI's ``detail`` added.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from lifecycle import (
    AlreadyExists,
    AsyncEngine,
    CallOptions,
    Conflict,
    ConsumerInUse,
    Daemon,
    DatabaseUnavailable,
    DriverError,
    DriverUnavailable,
    Engine,
    Flavor,
    HostInUse,
    HostNotEvacuable,
    HostNotFound,
    IdempotencyMismatch,
    ImageNotFound,
    InMemoryHostElsewhere,
    InstanceLocked,
    InstanceNotFound,
    InvalidInput,
    InvalidState,
    LifecycleError,
    MigrationNotFound,
    NoValidHost,
    Preempted,
    SchemaOutOfDate,
    Task,
    TaskFailed,
    TaskNotFound,
    upgrade,
)

DB_URL = os.environ.get("LIFECYCLE_DB_URL", "sqlite:///lifecycle.db")

STATUS: list[tuple[type[LifecycleError], int]] = [
    # Checked in order, the first match wins: a subclass before its parent. The README's table is this list.
    (InstanceNotFound, 404),
    (TaskNotFound, 404),
    (ImageNotFound, 404),
    (HostNotFound, 404),
    (MigrationNotFound, 404),
    (AlreadyExists, 409),  # the name or uuid is taken (a retry with its Idempotency-Key replays instead)
    (HostInUse, 409),  # a host still holds instances
    (ConsumerInUse, 409),  # another follower holds the feed consumer
    (IdempotencyMismatch, 422),  # the key was used for another call (the IETF Idempotency-Key draft's 422)
    # A sync of a fake:// host another process added, refused (a deployment mistake): nothing was synced.
    (InMemoryHostElsewhere, 503),
    (InvalidInput, 400),  # a bad argument, nothing changed (InvalidFlavor, a bad filter or marker ...)
    (InvalidState, 409),  # the instance's states refuse the operation now (stop a stopped one)
    (Conflict, 409),  # a concurrent write won: read again and retry
    (InstanceLocked, 409),  # Nova's answer to a locked instance
    (Preempted, 409),  # another operation (a delete) took the instance over
    (HostNotEvacuable, 409),
    # No host has room: the request is valid and the instance's state allows it, but the fleet is full now.
    # 503 with Retry-After says "try again later" to clients and proxies; 409 would say "change your request
    # or the instance first", which does not help. (A flavor no host could ever fit gets 503 too: the message says.)
    (NoValidHost, 503),
    (TaskFailed, 500),  # the operation ran and failed: the body names the task, GET /tasks/{id} says why
    (DriverUnavailable, 503),  # the hypervisor does not answer now
    (DriverError, 502),  # the hypervisor refused or failed a call (DomainNotFound, CopyFailed, StaleObject ...)
    (DatabaseUnavailable, 503),
    (SchemaOutOfDate, 503),  # the database is not migrated: `lifecycle db upgrade`
]
RETRY_AFTER = "30"
"""Seconds a 503 asks the client to wait before it retries."""
PAGE = 1000
"""The most instances a page of ``GET /vms`` holds (the engine's limit), and its default size, as Nova's."""


class FlavorIn(BaseModel):
    """A flavor in a request body."""

    vcpus: int
    memory_mb: int
    root_gb: int
    name: str = "custom"

    def flavor(self) -> Flavor:
        """Return it as the engine's :class:`lifecycle.Flavor` (which checks the numbers)."""
        return Flavor(vcpus=self.vcpus, memory_mb=self.memory_mb, root_gb=self.root_gb, name=self.name)


class CreateVm(BaseModel):
    """The body of ``POST /vms``; without ``host`` the scheduler places the instance."""

    name: str
    flavor: FlavorIn
    image: str
    host: str | None = None
    project_id: str | None = None
    user_id: str | None = None
    metadata: dict[str, str] | None = None


class Action(BaseModel):
    """The body of ``POST /vms/{uuid}/action``."""

    action: Literal["stop", "start", "resize", "confirm", "revert"]
    flavor: FlavorIn | None = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the engine, run its daemon on a thread beside the app, and stop both when the server stops."""
    await asyncio.to_thread(upgrade, DB_URL)
    engine = await asyncio.to_thread(Engine, DB_URL)
    # The daemon keeps the hosts heartbeating (or the scheduler sees them down), syncs them, recovers tasks
    # whose owner died, applies the resize confirm window and the operator duties, on a thread of its own.
    daemon = Daemon(engine).start()
    try:
        await asyncio.to_thread(daemon.wait_ready)  # the first heartbeats are in: the scheduler sees the hosts up
        async with AsyncEngine(engine) as aengine:
            app.state.aengine = aengine
            yield
    finally:
        await asyncio.to_thread(daemon.close)
        await asyncio.to_thread(engine.close)


app = FastAPI(title="lifecycle control plane", lifespan=lifespan)


def aengine_of(request: Request) -> AsyncEngine:
    """Return the application's one AsyncEngine (shared by every request: the engine is thread-safe)."""
    aengine: AsyncEngine = request.app.state.aengine
    return aengine


@app.exception_handler(LifecycleError)
async def lifecycle_error(_: Request, exc: Exception) -> JSONResponse:
    """Answer an engine error with its status from :data:`STATUS`, its type and its message."""
    return error_response(exc)


@app.exception_handler(RequestValidationError)
async def request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Answer a request FastAPI could not read as the engine's :class:`InvalidInput`, with FastAPI's ``detail``."""
    errors = exc.errors()
    said = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in errors)
    return error_response(InvalidInput(f"the request is malformed: {said}"), detail=jsonable_encoder(errors))


def error_response(exc: Exception, **extra: Any) -> JSONResponse:
    """Return the JSON answer to ``exc``: its status from :data:`STATUS` (503 with ``Retry-After``), type, message."""
    status = next((code for kind, code in STATUS if isinstance(exc, kind)), 500)
    body: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc), **extra}
    if isinstance(exc, TaskFailed):
        body["task"] = exc.task.to_dict()
    headers = {"Retry-After": RETRY_AFTER} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def accepted(task: Task) -> JSONResponse:
    """Answer 202: the task runs on, ``Location`` is where to follow it."""
    return JSONResponse(task.to_dict(), status_code=202, headers={"Location": f"/tasks/{task.id}"})


def call_options(request: Request, wait: bool) -> CallOptions:
    """Return the options every operation takes, from the query and the request's headers."""
    return {
        "wait": wait,
        "request_id": request.headers.get("X-Request-ID"),
        "idempotency_key": request.headers.get("Idempotency-Key"),
    }


@app.get("/health")
async def health() -> dict[str, bool]:
    """Answer at once: the event loop is never blocked by the engine."""
    return {"ok": True}


@app.post("/vms", status_code=201)
async def create_vm(body: CreateVm, request: Request, response: Response, wait: bool = True) -> Any:
    """Create an instance: 201 with it once built, or 202 and its task at once (``?wait=false``)."""
    aengine = aengine_of(request)
    task = await aengine.create(
        body.name,
        flavor=body.flavor.flavor(),
        image=body.image,
        host=body.host,
        project_id=body.project_id,
        user_id=body.user_id,
        metadata=body.metadata,
        request_id=request.headers.get("X-Request-ID"),
        idempotency_key=request.headers.get("Idempotency-Key"),
        wait=wait,
    )
    if not wait:
        return accepted(task)
    response.headers["Location"] = f"/vms/{task.instance_uuid}"
    return (await aengine.get(task.instance_uuid)).to_dict()


@app.get("/vms")
async def list_vms(
    request: Request,
    limit: int = Query(PAGE, ge=1, le=PAGE),
    marker: str | None = None,
    status: str | None = None,
    project_id: str | None = None,
) -> dict[str, Any]:
    """Return a page of instances, oldest first, and the link to the next page while pages are full."""
    page = await aengine_of(request).list(status=status, project_id=project_id, limit=limit, marker=marker)
    following = None
    if len(page) == limit:
        url = request.url.include_query_params(marker=page[-1].uuid)
        following = f"{url.path}?{url.query}"
    return {"instances": [instance.to_dict() for instance in page], "next": following}


@app.post("/vms/{uuid}/action")
async def act(uuid: str, body: Action, request: Request, wait: bool = True) -> Any:
    """Run an action on an instance: 200 with the instance after it, or 202 and its task (``?wait=false``)."""
    aengine = aengine_of(request)
    options = call_options(request, wait)
    if body.action == "stop":
        task = await aengine.stop(uuid, **options)
    elif body.action == "start":
        task = await aengine.start(uuid, **options)
    elif body.action == "resize":
        if body.flavor is None:
            raise InvalidInput("a resize names its flavor")
        task = await aengine.resize(uuid, body.flavor.flavor(), **options)
    elif body.action == "confirm":
        task = await aengine.confirm_resize(uuid, **options)
    else:
        task = await aengine.revert_resize(uuid, **options)
    if not wait:
        return accepted(task)
    return (await aengine.get(uuid)).to_dict()


@app.delete("/vms/{uuid}", status_code=204)
async def delete_vm(uuid: str, request: Request, wait: bool = True) -> Response:
    """Delete an instance: 204 once deleted, or 202 and its task (``?wait=false``)."""
    aengine = aengine_of(request)
    task = await aengine.delete(uuid, **call_options(request, wait))
    if not wait:
        return accepted(task)
    return Response(status_code=204)


@app.get("/vms/{uuid}")
async def get_vm(uuid: str, request: Request) -> dict[str, Any]:
    """Return an instance (deleted ones too) with its status and audit history, oldest first."""
    aengine = aengine_of(request)
    instance = await aengine.get(uuid)
    return {**instance.to_dict(), "history": [entry.to_dict() for entry in await aengine.history(uuid)]}


@app.get("/tasks/{task_id}")
async def get_task(task_id: str, request: Request) -> dict[str, Any]:
    """Return a task (its ``outcome`` is ``running`` until it ends) and its step log."""
    aengine = aengine_of(request)
    task = await aengine.task(task_id)
    return {**task.to_dict(), "steps": [step.to_dict() for step in await aengine.steps(task_id)]}
