"""AsyncEngine: every operation and read of Engine as an awaitable that never blocks the event loop."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lifecycle import AsyncEngine, Engine, InvalidInput, Outcome, TaskFailed, TaskWaitTimeout, VmState
from tests.asgi import served_here
from tests.conftest import FLAVOR, Fakes

ROOT = Path(__file__).resolve().parent.parent
RESPONSIVE = 0.5
"""Seconds within which the event loop must answer while a driver call is held (it answers in milliseconds)."""


def _public(cls: type) -> dict[str, Any]:
    return {name: member for name, member in inspect.getmembers(cls) if not name.startswith("_") and callable(member)}


def test_every_engine_operation_and_read_has_an_async_twin_with_the_same_parameters() -> None:
    """Each public method of Engine but close is a coroutine function of AsyncEngine with the same signature."""
    engine, aio = _public(Engine), _public(AsyncEngine)
    assert set(aio) - set(engine) == {"aclose"}, "AsyncEngine offers what Engine does not"
    for name in sorted(set(engine) - {"close"}):
        assert name in aio, f"AsyncEngine has no {name}"
        assert inspect.iscoroutinefunction(aio[name]), f"AsyncEngine.{name} is not async"
        assert inspect.signature(aio[name]) == inspect.signature(engine[name]), name


def test_operations_await_the_end_and_raise_as_the_blocking_calls(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """wait=True awaits the task's end; wait=False returns it running for wait(); failures raise TaskFailed."""
    uuid = new_instance()

    async def scenario() -> None:
        async with AsyncEngine(engine, threads=2) as aengine:
            stopped = await aengine.stop(uuid)
            assert stopped.outcome is Outcome.SUCCEEDED and (await aengine.get(uuid)).vm_state is VmState.STOPPED
            gate = fakes["h1"].faults.hold("power_on")
            running = await aengine.start(uuid, wait=False)
            assert running.outcome is Outcome.RUNNING
            with pytest.raises(TaskWaitTimeout):
                await aengine.wait(running.id, timeout=0.05)
            gate.release()
            assert (await aengine.wait(running.id)).outcome is Outcome.SUCCEEDED
            fakes["h1"].faults.fail_next("power_off")
            with pytest.raises(TaskFailed) as failed:
                await aengine.stop(uuid, timeout=0)
            assert str(failed.value) == str(_raised(lambda: engine.wait(failed.value.task.id)))
            with pytest.raises(InvalidInput, match="wait must be True or False"):
                await aengine.stop(uuid, wait="no")  # type: ignore[typeddict-item]
            created = await aengine.create("vm2", flavor=FLAVOR, image="cirros", host="h2")
            assert [t.id for t in await aengine.tasks(created.instance_uuid)] == [created.id]
            assert created.outcome is Outcome.SUCCEEDED

    asyncio.run(scenario())


def test_aclose_lets_an_awaited_operation_end_and_refuses_later_calls(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A stop awaited across aclose() returns its outcome (no RuntimeError); a call after aclose raises InvalidInput."""
    uuid = new_instance()

    async def scenario() -> None:
        aengine = AsyncEngine(engine, threads=1)
        gate = fakes["h1"].faults.hold("power_off")
        stopping = asyncio.create_task(aengine.stop(uuid))
        assert await asyncio.to_thread(gate.wait_entered), "the stop never reached the driver"
        await aengine.aclose()
        gate.release()
        assert (await stopping).outcome is Outcome.SUCCEEDED
        for late in (aengine.get(uuid), aengine.wait(stopping.result().id), aengine.start(uuid)):
            with pytest.raises(InvalidInput, match="the AsyncEngine is closed"):
                await late
        await aengine.aclose()  # a second aclose is harmless

    asyncio.run(scenario())
    assert engine.get(uuid).vm_state is VmState.STOPPED


def _raised(call: Callable[[], object]) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


def test_the_event_loop_answers_while_an_awaited_operation_is_held_in_the_driver(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """Under uvicorn, GET /health answers within 0.5 s while a POST awaits a stop held in the driver; it then ends."""
    uuid = new_instance()
    aengine = AsyncEngine(engine)

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def stop(request: Request) -> JSONResponse:
        task = await aengine.stop(request.path_params["uuid"])
        return JSONResponse({"outcome": task.outcome.value})

    app = Starlette(routes=[Route("/health", health), Route("/vms/{uuid}/stop", stop, methods=["POST"])])
    gate = engine.hosts.driver("h1").faults.hold("power_off")  # type: ignore[attr-defined]
    answers: list[httpx.Response] = []
    poster = threading.Thread(target=lambda: answers.append(httpx.post(f"{base}/vms/{uuid}/stop", timeout=20)))
    with served_here(app) as base:
        try:
            poster.start()
            assert gate.wait_entered(), "the stop never reached the driver"
            took = []
            for _ in range(5):
                started = time.monotonic()
                assert httpx.get(f"{base}/health", timeout=RESPONSIVE).json() == {"ok": True}
                took.append(time.monotonic() - started)
            assert max(took) < RESPONSIVE, took
            assert not answers, "the stop answered while its driver call was held"
        finally:  # a blocked loop would hold the server (and the stop) until the gate's own timeout
            gate.release()
            poster.join(20)
            asyncio.run(aengine.aclose())
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"outcome": "succeeded"})]
    assert engine.get(uuid).vm_state is VmState.STOPPED


MISTYPED = """
from lifecycle import AsyncEngine


async def handler(aengine: AsyncEngine, uuid: str) -> None:
    await aengine.stop(uuid, wait=True, timeout=5.0)
    await aengine.stop(uuid, wiat=True)
    await aengine.start(uuid, wait="no")
"""


@pytest.mark.slow
def test_mypy_strict_catches_a_mistyped_keyword_of_an_awaited_operation(tmp_path: Path) -> None:
    """mypy --strict refuses an unknown keyword and a wrongly typed option, not the right call nor the example app."""
    (tmp_path / "app.py").write_text(MISTYPED)
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    example = str(ROOT / "examples" / "fastapi_app.py")  # what a reader copies type-checks clean
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), "app.py", example]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["7", "8"], done.stdout
    assert '"wiat"' in errors[0] and '"wait"' in errors[1], done.stdout
