"""The console proxy: browsers' websockets bridged to guests' VNC servers, each connection token-checked.

``lifecycle console-proxy`` serves, on one port (``console_proxy_listen``, 6080):

- the console page and noVNC (``console_page_dir``, built by ``scripts/console-assets.sh``);
- ``/metrics``: this proxy's Prometheus registry (connections open, refusals by reason), unless
  ``console_metrics_listen`` moves it to an address of its own (``ADDR:PORT``: the console port
  then answers 404 there) or turns it off (``off``);
- websockets (``/websockify?token=...``, subprotocol ``binary`` when offered), each bridged to
  the VNC address and port the engine resolves for the token at connect time, and nowhere else.

A websocket is refused with HTTP 403, before any connection to a VNC server is opened, when its
Origin is not allowed (``console_allowed_origins``; empty: ``console_base_url``'s own), when it
carries no token, or when the engine does not know the token as valid (unknown, forged, expired,
revoked, or its instance deleted or moved). Past the handshake, a token over its session limit
(``console_max_connections_per_token``) or a proxy at ``console_max_connections`` gets close code
1013 (try again later), still before any VNC connection. Each refusal is logged with the token's
SHA-256 (as stored by the engine), never the token. A session passing ``console_idle_timeout``
seconds with no byte either way is closed (1000, ``idle``). Stopping (SIGTERM, SIGINT, or
:meth:`ConsoleProxy.stop`) closes every websocket with a close frame (1001, going away).

A token check is two synchronous halves, each on a thread pool of the proxy's own (never
asyncio's default, which the websockets library shares) and each with a deadline of
``_CHECK_DEADLINE`` seconds, past which the handshake gets HTTP 503: the database's (the token
is valid, its instance where it was issued), then the hypervisor's (the guest still serves the
port). A host holds at most ``_CHECKS_PER_HOST`` threads in a check (counted until the thread
really returns: a libvirt call stuck on a hung host keeps its thread), further handshakes to its
guests get 503 at once, and so do they for ``_SILENT_FOR`` seconds after one of its checks missed
the deadline: one hung hypervisor never takes the threads other hosts' handshakes need. A check
not yet started when its handshake is given up (deadline, or the client gone) never runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import signal
import weakref
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from lifecycle.config import Settings, listen_address
from lifecycle.console import ConsoleConnection, TokenClaim, token_hash
from lifecycle.errors import DriverUnavailable, InvalidInput

__all__ = ["REFUSAL_REASONS", "ConsoleProxy", "serve"]

log = structlog.get_logger(__name__)

REFUSAL_REASONS: Final = ("origin", "no_token", "bad_token", "invalid_token", "unavailable", "token_limit", "limit")
"""Why a websocket was refused (the ``reason`` label of ``lifecycle_console_refusals_total``)."""

PAGE_DIR = Path(__file__).resolve().parents[1] / "console" / "dist"
"""Where ``scripts/console-assets.sh`` builds the page in a checkout (used when console_page_dir is empty)."""

_WEBSOCKET_PATHS = ("/websockify", "/")
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the page's URL holds the token
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"
    ),
}
_CONNECT_TIMEOUT = 10.0
_CHECK_DEADLINE = 5.0
"""Seconds each half of a token check (database, hypervisor) may take before the handshake gets 503."""
_CHECKS_PER_HOST = 2
"""Threads one host may hold in hypervisor checks; a handshake beyond that gets 503 at once."""
_SILENT_FOR = 10.0
"""Seconds a host whose check missed the deadline is answered 503 at once, without asking it."""
_DB_THREADS = 4
_HYPERVISOR_THREADS = 16
R = TypeVar("R")
_CHUNK = 65536
_TOKEN_IN_TEXT = re.compile(r"token=[^&\s\"']*")


class _NoTokens(logging.Filter):
    """Blank tokens out of the websockets library's lines (its debug lines carry request paths)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "token=" in text:
            record.msg, record.args = _TOKEN_IN_TEXT.sub("token=<redacted>", text), None
        return True


_wire_log = logging.getLogger(f"{__name__}.websockets")
_wire_log.addFilter(_NoTokens())


class _Unavailable(Exception):
    """A token check could not be answered in time (the database or the hypervisor): the handshake gets 503."""


class ConsoleProxy:
    """One proxy: its server, its sessions and its metrics.

    ``lookup`` is the database's half of a token check (:func:`lifecycle.console.lookup`: a claim, or None),
    ``serving`` the hypervisor's (:func:`lifecycle.console.serving`: where to connect, or None).
    """

    def __init__(
        self,
        lookup: Callable[[str], TokenClaim | None],
        serving: Callable[[TokenClaim], ConsoleConnection | None],
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._lookup = lookup
        self._serving = serving
        self._db = ThreadPoolExecutor(_DB_THREADS, thread_name_prefix="console-db")
        self._hypervisor = ThreadPoolExecutor(_HYPERVISOR_THREADS, thread_name_prefix="console-hypervisor")
        self._checking: Tally[str] = Tally()
        """Threads in a hypervisor check, per host, until each really returns."""
        self._silent_until: dict[str, float] = {}
        self.settings = settings
        self.page_dir = Path(settings.console_page_dir) if settings.console_page_dir else PAGE_DIR
        self._origins = set(settings.console_allowed_origins) or {_origin_of(settings.console_base_url)}
        self._resolved: weakref.WeakKeyDictionary[ServerConnection, tuple[str, ConsoleConnection]] = (
            weakref.WeakKeyDictionary()
        )
        self._per_token: Tally[str] = Tally()
        self._server: Server | None = None
        self._metrics_server: Server | None = None
        self.metrics_address: tuple[str, int] | None = None
        """Where ``/metrics`` is served on an address of its own, once started (None: on the console port, or off)."""
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.connections_open = Gauge(
            "lifecycle_console_connections_open", "Console sessions bridged right now", registry=self.registry
        )
        self.refusals = Counter(
            "lifecycle_console_refusals_total",
            "Console websockets refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason=reason)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0: any free one) and return the address bound.

        With ``console_metrics_listen`` set to ``ADDR:PORT``, ``/metrics`` is served there (see
        :attr:`metrics_address`). Raises InvalidInput when an address cannot be listened on (in use,
        not this machine's); then nothing listens.
        """
        metrics = self.settings.console_metrics_listen
        if metrics not in ("", "off"):
            address = listen_address("setting console_metrics_listen", metrics)
            if address == (host, port) and port != 0:
                raise InvalidInput(
                    f"setting console_metrics_listen ({metrics}) is the console proxy's own listen address"
                    f" ({host}:{port}): give /metrics an address of its own, or leave the setting empty to serve"
                    " it on the console port"
                )
            self._metrics_server = await _listen(
                _no_session, *address, process_request=self._metrics_only, label=" (console_metrics_listen)"
            )
            self.metrics_address = _bound(self._metrics_server)
            log.info("console_metrics_listening", address=self.metrics_address[0], port=self.metrics_address[1])
        try:
            self._server = await _listen(
                self._bridge,
                host,
                port,
                process_request=self._process_request,
                select_subprotocol=_binary_if_offered,
            )
        except InvalidInput:
            await self._stop_metrics()
            raise
        bound = _bound(self._server)
        log.info("console_proxy_listening", address=bound[0], port=bound[1], page_dir=str(self.page_dir))
        if not (self.page_dir / "vnc_lite.html").is_file():
            log.warning("console_page_missing", page_dir=str(self.page_dir), build="scripts/console-assets.sh")
        return bound

    async def stop(self) -> None:
        """Stop listening, close every websocket with 1001 (going away), and wait for the sessions to end."""
        await self._stop_metrics()
        if self._server is None:
            return
        self._server.close(close_connections=True, code=CloseCode.GOING_AWAY, reason="console proxy stopping")
        await self._server.wait_closed()
        for pool in (self._db, self._hypervisor):  # a thread stuck in a hung hypervisor is not waited for
            pool.shutdown(wait=False, cancel_futures=True)
        log.info("console_proxy_stopped")

    async def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
            self._metrics_server = None

    def _metrics(self) -> Response:
        headers = Headers({"Content-Type": "text/plain; version=0.0.4; charset=utf-8", "Cache-Control": "no-store"})
        return _response(200, "OK", headers, generate_latest(self.registry))

    async def _metrics_only(self, _connection: ServerConnection, request: Request) -> Response:
        """Answer a request to the metrics address: ``GET /metrics``, and 404 for anything else."""
        return self._metrics() if urlsplit(request.path).path == "/metrics" else _text(404, "Not Found", "not found\n")

    # -- handshake --------------------------------------------------------

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Serve plain HTTP requests; check a websocket's Origin and token before the handshake completes."""
        url = urlsplit(request.path)
        try:
            upgrade, origin = request.headers.get("Upgrade", ""), request.headers.get("Origin")
        except MultipleValuesError:  # two Upgrade or Origin headers: no browser sends that
            return self._refuse(connection, "origin", None)
        if upgrade.lower() != "websocket":
            return self._http(url.path)
        if url.path not in _WEBSOCKET_PATHS:
            return _text(404, "Not Found", "no websocket here\n")
        try:
            token = parse_qs(url.query, max_num_fields=4).get("token", [""])[0]
        except ValueError:
            token = ""
        hashed = token_hash(token) if token else None
        if origin not in self._origins:
            return self._refuse(connection, "origin", hashed)
        if not token:
            return self._refuse(connection, "no_token", hashed)
        try:
            target = await self._check(token)
        except InvalidInput:
            return self._refuse(connection, "bad_token", hashed)
        except _Unavailable as exc:
            log.warning("console_check_unavailable", token_hash=hashed, error=str(exc))
            return self._refuse(connection, "unavailable", hashed, status=503)
        except Exception:  # the database is away: this handshake fails, the proxy goes on
            log.exception("console_token_check_failed", token_hash=hashed)
            return self._refuse(connection, "unavailable", hashed, status=503)
        if target is None:
            return self._refuse(connection, "invalid_token", hashed)
        self._resolved[connection] = (token_hash(token), target)
        return None

    async def _check(self, token: str) -> ConsoleConnection | None:
        """Check a token: the database's half, then the hypervisor's, each on its own pool and deadline."""
        loop = asyncio.get_running_loop()
        claim = await self._within(self._db.submit(self._lookup, token), "the database")
        if claim is None:
            return None
        host = claim.host
        if loop.time() < self._silent_until.get(host, 0.0):
            raise _Unavailable(f"host {host} missed a check's deadline lately: not asked again yet")
        if self._checking[host] >= _CHECKS_PER_HOST:
            raise _Unavailable(f"host {host} has {self._checking[host]} checks in flight already")
        self._checking[host] += 1
        future = self._hypervisor.submit(self._serving, claim)
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._checked, host))
        try:
            return await self._within(future, f"host {host}")
        except _Unavailable:
            self._silent_until[host] = loop.time() + _SILENT_FOR
            raise
        except DriverUnavailable as exc:
            raise _Unavailable(f"host {host} does not answer: {exc}") from exc

    def _checked(self, host: str) -> None:
        self._checking[host] -= 1
        if self._checking[host] <= 0:
            del self._checking[host]

    async def _within(self, future: Future[R], who: str) -> R:
        """Wait for a check's thread up to the deadline (a check not started by then never runs)."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), _CHECK_DEADLINE)
        except TimeoutError:
            raise _Unavailable(f"{who} did not answer within {_CHECK_DEADLINE:.0f} s") from None

    def _refuse(self, connection: ServerConnection, reason: str, hashed: str | None, status: int = 403) -> Response:
        self._count_refusal(connection, reason, hashed)
        return _text(status, "Forbidden" if status == 403 else "Service Unavailable", f"console refused: {reason}\n")

    def _count_refusal(self, connection: ServerConnection, reason: str, hashed: str | None) -> None:
        self.refusals.labels(reason=reason).inc()
        log.warning("console_refused", reason=reason, token_hash=hashed, peer=_peer(connection))

    def _http(self, path: str) -> Response:
        """Answer a plain GET: the page and noVNC's files, or the metrics."""
        if path == "/metrics" and self.settings.console_metrics_listen == "":  # else moved or off: a 404 below
            return self._metrics()
        if path == "/":
            return _response(302, "Found", Headers({"Location": "/vnc_lite.html"}), b"")
        if not (self.page_dir / "vnc_lite.html").is_file():
            return _text(
                404, "Not Found", f"console page not built in {self.page_dir}: run scripts/console-assets.sh\n"
            )
        root = self.page_dir.resolve()
        try:
            file = (root / path.lstrip("/")).resolve()
            found = file.is_relative_to(root) and file.is_file()
        except (OSError, ValueError):  # a name too long, a NUL: no such file
            found = False
        content_type = _TYPES.get(file.suffix) if found else None
        if not found or content_type is None:
            return _text(404, "Not Found", "not found\n")
        return _response(200, "OK", Headers({"Content-Type": content_type, **_PAGE_HEADERS}), file.read_bytes())

    # -- sessions ---------------------------------------------------------

    async def _bridge(self, ws: ServerConnection) -> None:
        """Bridge one admitted websocket to its VNC server until either side ends, it idles, or the proxy stops."""
        hashed, target = self._resolved.pop(ws)
        limit = self._over_limit(hashed)
        if limit is not None:
            self._count_refusal(ws, limit, hashed)
            await ws.close(CloseCode.TRY_AGAIN_LATER, f"console refused: {limit}")
            return
        self._per_token[hashed] += 1
        self.connections_open.inc()
        try:
            await self._session(ws, hashed, target)
        finally:
            self._per_token[hashed] -= 1
            if not self._per_token[hashed]:
                del self._per_token[hashed]
            self.connections_open.dec()

    def _over_limit(self, hashed: str) -> str | None:
        if sum(self._per_token.values()) >= self.settings.console_max_connections:
            return "limit"
        if self._per_token[hashed] >= self.settings.console_max_connections_per_token:
            return "token_limit"
        return None

    async def _session(self, ws: ServerConnection, hashed: str, target: ConsoleConnection) -> None:
        bound = log.bind(instance_uuid=target.instance_uuid, token_hash=hashed, peer=_peer(ws))
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port), timeout=_CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            bound.warning("console_unreachable", host=target.host, port=target.port, error=str(exc))
            await ws.close(CloseCode.INTERNAL_ERROR, "console unreachable")
            return
        bound.info("console_opened", host=target.host, port=target.port)
        loop = asyncio.get_running_loop()
        last = [loop.time()]
        tasks = [asyncio.create_task(_upstream(ws, writer, last)), asyncio.create_task(_downstream(reader, ws, last))]
        if self.settings.console_idle_timeout > 0:
            tasks.append(asyncio.create_task(_idle(last, self.settings.console_idle_timeout)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            ended = next(iter(done)).result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if ended == "idle":
            await ws.close(CloseCode.NORMAL_CLOSURE, "idle")
        elif ended == "console_closed":
            await ws.close(CloseCode.NORMAL_CLOSURE, "console closed")
        bound.info("console_closed", ended=ended, code=ws.close_code)


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


async def _listen(
    handler: Callable[[ServerConnection], Awaitable[None]], host: str, port: int, *, label: str = "", **options: Any
) -> Server:
    """Serve websockets (and plain HTTP through ``process_request``) on ``host:port``; InvalidInput if it cannot."""
    try:
        return await ws_serve(
            handler,
            host,
            port,
            compression=None,  # VNC traffic is already encoded; deflate would only cost CPU
            logger=_wire_log,
            **options,
        )
    except OSError as exc:
        raise InvalidInput(f"console proxy cannot listen on {host}:{port}{label}: {exc.strerror or exc}") from None


def _bound(server: Server) -> tuple[str, int]:
    address = next(iter(server.sockets)).getsockname()
    return str(address[0]), int(address[1])


async def _no_session(ws: ServerConnection) -> None:
    """Close at once: the metrics address bridges nothing (every request there is answered before a handshake)."""
    await ws.close(CloseCode.POLICY_VIOLATION, "no websocket here")


def _binary_if_offered(_connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Choose ``binary`` (noVNC's) when the client offers it; accept a client that offers none."""
    return Subprotocol("binary") if "binary" in offered else None


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    port = "" if parts.port in (None, default) else f":{parts.port}"
    host = parts.hostname or ""
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{port}"


def _peer(connection: ServerConnection) -> str:
    with contextlib.suppress(Exception):  # a transport already gone has no address
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    return "?"


def _response(status: int, reason: str, headers: Headers, body: bytes) -> Response:
    headers["Content-Length"] = str(len(body))
    return Response(status, reason, headers, body)


def _text(status: int, reason: str, text: str) -> Response:
    headers = Headers({"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"})
    return _response(status, reason, headers, text.encode())


def serve(db_url: str, settings: Settings, listen: tuple[str, int] | None = None) -> None:
    """Run a console proxy over the engine at ``db_url`` until SIGTERM or SIGINT, then stop cleanly."""
    from lifecycle import console
    from lifecycle.engine import Engine  # the engine pulls in the whole package; the proxy module stays light

    address = (
        listen if listen is not None else listen_address("setting console_proxy_listen", settings.console_proxy_listen)
    )
    engine = Engine(db_url, settings=settings)
    try:
        proxy = ConsoleProxy(
            functools.partial(console.lookup, engine.store),
            functools.partial(console.serving, driver_for=engine.driver),
            settings,
        )
        asyncio.run(_run(proxy, address))
    finally:
        engine.close()


async def _run(proxy: ConsoleProxy, address: tuple[str, int]) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await proxy.start(*address)
    try:
        await stopping.wait()
    finally:
        await proxy.stop()
