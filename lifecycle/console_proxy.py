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

Token checks (database, then hypervisor, each on a pool and a deadline of its own) are
:class:`lifecycle.console_checks.TokenChecker`'s; the page's files are served by :mod:`lifecycle.console_page`.
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
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from lifecycle.config import Settings, listen_address
from lifecycle.console import ConsoleConnection, TokenClaim, token_hash
from lifecycle.console_checks import TokenChecker, Unavailable
from lifecycle.console_page import PAGE_DIR, page_file, response, text
from lifecycle.console_pump import pump
from lifecycle.errors import InvalidInput
from lifecycle.logs import get_logger

__all__ = ["REFUSAL_REASONS", "ConsoleProxy", "serve"]

log = get_logger(__name__)

REFUSAL_REASONS: Final = ("origin", "no_token", "bad_token", "invalid_token", "unavailable", "token_limit", "limit")
"""Why a websocket was refused (the ``reason`` label of ``lifecycle_console_refusals_total``)."""

_WEBSOCKET_PATHS = ("/websockify", "/")
_CONNECT_TIMEOUT = 10.0
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
        self._checker = TokenChecker(lookup, serving)
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
        self._checker.shutdown()
        log.info("console_proxy_stopped")

    async def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
            self._metrics_server = None

    def _metrics(self) -> Response:
        headers = Headers({"Content-Type": "text/plain; version=0.0.4; charset=utf-8", "Cache-Control": "no-store"})
        return response(200, "OK", headers, generate_latest(self.registry))

    async def _metrics_only(self, _connection: ServerConnection, request: Request) -> Response:
        """Answer a request to the metrics address: ``GET /metrics``, and 404 for anything else."""
        return self._metrics() if urlsplit(request.path).path == "/metrics" else text(404, "Not Found", "not found\n")

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
            return text(404, "Not Found", "no websocket here\n")
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
            target = await self._checker.check(token)
        except InvalidInput:
            return self._refuse(connection, "bad_token", hashed)
        except Unavailable as exc:
            log.warning("console_check_unavailable", token_hash=hashed, error=str(exc))
            return self._refuse(connection, "unavailable", hashed, status=503)
        except Exception:  # the database is away: this handshake fails, the proxy goes on
            log.exception("console_token_check_failed", token_hash=hashed)
            return self._refuse(connection, "unavailable", hashed, status=503)
        if target is None:
            return self._refuse(connection, "invalid_token", hashed)
        self._resolved[connection] = (token_hash(token), target)
        return None

    def _refuse(self, connection: ServerConnection, reason: str, hashed: str | None, status: int = 403) -> Response:
        self._count_refusal(connection, reason, hashed)
        return text(status, "Forbidden" if status == 403 else "Service Unavailable", f"console refused: {reason}\n")

    def _count_refusal(self, connection: ServerConnection, reason: str, hashed: str | None) -> None:
        self.refusals.labels(reason=reason).inc()
        log.warning("console_refused", reason=reason, token_hash=hashed, peer=_peer(connection))

    def _http(self, path: str) -> Response:
        """Answer a plain GET: the page and noVNC's files, or the metrics."""
        if path == "/metrics" and self.settings.console_metrics_listen == "":  # else moved or off: a 404 below
            return self._metrics()
        return page_file(self.page_dir, path)

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
        ended = await pump(ws, reader, writer, self.settings.console_idle_timeout)
        if ended == "idle":
            await ws.close(CloseCode.NORMAL_CLOSURE, "idle")
        elif ended == "console_closed":
            await ws.close(CloseCode.NORMAL_CLOSURE, "console closed")
        bound.info("console_closed", ended=ended, code=ws.close_code)


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
            functools.partial(console.serving, driver_for=engine.hosts.driver),
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
