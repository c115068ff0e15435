"""Bytes between an admitted websocket and its VNC server, both ways, until one side ends or the session idles."""

from __future__ import annotations

import asyncio
import contextlib

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

__all__ = ["pump"]

_CHUNK = 65536


async def pump(
    ws: ServerConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle_timeout: float
) -> str:
    """Copy both ways; return why it ended (``browser_closed``, ``console_closed`` or ``idle``), the VNC socket closed.

    ``idle_timeout`` seconds with no byte either way end it (0: never).
    """
    loop = asyncio.get_running_loop()
    last = [loop.time()]
    tasks = [asyncio.create_task(_upstream(ws, writer, last)), asyncio.create_task(_downstream(reader, ws, last))]
    if idle_timeout > 0:
        tasks.append(asyncio.create_task(_idle(last, idle_timeout)))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return str(next(iter(done)).result())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _upstream(ws: ServerConnection, writer: asyncio.StreamWriter, last: list[float]) -> str:
    """Browser to VNC: binary messages only."""
    try:
        async for message in ws:
            if isinstance(message, str):
                await ws.close(CloseCode.UNSUPPORTED_DATA, "binary messages only")
                return "browser_closed"
            writer.write(message)
            await writer.drain()
            last[0] = asyncio.get_running_loop().time()
    except ConnectionClosed:
        pass
    except OSError:
        return "console_closed"
    return "browser_closed"


async def _downstream(reader: asyncio.StreamReader, ws: ServerConnection, last: list[float]) -> str:
    """VNC to browser."""
    try:
        while data := await reader.read(_CHUNK):
            await ws.send(data)
            last[0] = asyncio.get_running_loop().time()
    except ConnectionClosed:
        return "browser_closed"
    except OSError:
        pass
    return "console_closed"


async def _idle(last: list[float], timeout: float) -> str:
    """Return once ``timeout`` seconds have passed since the last byte either way."""
    loop = asyncio.get_running_loop()
    while (left := last[0] + timeout - loop.time()) > 0:
        await asyncio.sleep(left)
    return "idle"
