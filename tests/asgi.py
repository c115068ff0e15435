"""Serving an ASGI application with a real uvicorn for a test: in this process on a thread, or as a child process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tests.conftest import wait_until


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def served_here(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a thread of this process; yield its base URL; stop it even if the test fails."""
    sock = _free_socket()
    config = uvicorn.Config(app, lifespan="on", log_level="warning", ws="none", http="h11")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until("uvicorn started", lambda: server.started or not thread.is_alive())
        assert server.started, "uvicorn ended before it started"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def served_apart(target: str, cwd: Path, env: Mapping[str, str], log: Path, *, app_dir: str) -> Iterator[str]:
    """Serve ``target`` (``module:app`` in ``app_dir``) with ``python -m uvicorn`` as a child; stop it by its pid after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        target,
        "--app-dir",
        app_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("wb") as out:
        child = subprocess.Popen(
            [*command, "--ws", "none", "--http", "h11"], cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            assert child.poll() is None, f"uvicorn exited {child.returncode}: {log.read_text()}"
            try:
                return httpx.get(f"{base}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(f"{target} answering at {base}", answers, 30)
        yield base
    finally:
        os.kill(child.pid, signal.SIGTERM)
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
