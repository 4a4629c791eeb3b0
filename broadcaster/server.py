"""The WebSocket edge, the only module that speaks WebSocket (and the HTTP of its handshake).

websockets does the handshake, keepalive pings, reading and the closing handshake; events do
not go through its send(): the hub writes pre-built frames straight to each socket's
transport (see messages.text_frame), since a frame is the same bytes for every client. The
edge also answers GET /healthz and /metrics without upgrading, on the WebSocket port and on
a second, loopback port for scrapers (BROADCASTER_HTTP_HOST/PORT).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve, unix_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import OPEN

from broadcaster import messages
from broadcaster.errors import CloseConnection
from broadcaster.hub import Hub
from broadcaster.limits import ConnectionCounter, client_ip
from broadcaster.metrics import PROMETHEUS_CONTENT_TYPE, Metrics
from broadcaster.session import Session
from shared.settings import BroadcasterSettings

__all__ = ["Status", "serve_clients"]

log = structlog.get_logger()

Status = Callable[[], Awaitable[dict[str, Any]]]

CLOSE_TIMEOUT = 2.0  # for one client's closing handshake, then the socket is aborted
SHUTDOWN_GRACE = 1.0  # for all clients at stop: PM2 kills after 1.6 s by default
LISTEN_BACKLOG = 16384  # a reconnect storm must not overflow the accept queue (somaxconn caps it)
SERVER_HEADER = "kektech-broadcaster"
RESTART_REASON = "service restart: reconnect and resume with since"


class WsPeer:
    """One accepted connection as the hub sees it: a socket to write frames to."""

    __slots__ = ("buffered", "close_code", "close_reason", "connection", "scope", "write")

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection
        transport = connection.transport
        # The transport's own methods: the fan-out calls them per recipient.
        self.write: Callable[[bytes], None] = transport.write
        self.buffered: Callable[[], int] = transport.get_write_buffer_size
        self.scope: asyncio.Timeout | None = None
        self.close_code: int | None = None
        self.close_reason = ""

    def is_open(self) -> bool:
        return self.connection.protocol.state is OPEN

    async def drain(self) -> None:
        """Wait until the socket buffer is below the low-water mark (or the socket is gone)."""
        with contextlib.suppress(OSError):  # connection lost: is_open() says so now
            await self.connection.drain()

    def kick(self, code: int, reason: str) -> None:
        """Have the connection's handler close it with code, interrupting whatever it awaits."""
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = code, reason
        if self.scope is not None:
            # Expiring the handler's timeout scope cancels its current await (recv, a replay)
            # without another task; the handler then runs the closing handshake.
            self.scope.reschedule(asyncio.get_running_loop().time())


class Edge:
    """Handshake policy, HTTP endpoints and the per-connection handler."""

    def __init__(
        self, settings: BroadcasterSettings, *, hub: Hub, metrics: Metrics, status: Status
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.metrics = metrics
        self.status = status
        self.per_ip = ConnectionCounter(settings.ws_max_connections_per_ip)
        self._origins = frozenset(settings.ws_allowed_origins)
        self._burst = float(max(2 * settings.ws_rate_limit, settings.ws_max_subscriptions))

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Admit a WebSocket handshake on WS_PATH, answer /healthz and /metrics, 404 the rest."""
        path = request.path.partition("?")[0]
        if path != self.settings.ws_path:
            return await self.process_http(connection, request)
        origin = request.headers.get("Origin")
        if self._origins and origin is not None and origin.lower() not in self._origins:
            self.metrics.rejected.labels(reason="origin").inc()
            return _text(http.HTTPStatus.FORBIDDEN, "origin not allowed\n")
        peer = connection.remote_address
        ip = client_ip(
            peer[0] if isinstance(peer, tuple) else None,
            forwarded_for=request.headers.get_all("X-Forwarded-For"),
            real_ip=request.headers.get("X-Real-IP"),
            trusted=self.settings.ws_trusted_proxies,
            local=not isinstance(peer, tuple),  # the Unix socket
        )
        if not self.per_ip.acquire(ip):
            self.metrics.rejected.labels(reason="ip_limit").inc()
            return _text(http.HTTPStatus.TOO_MANY_REQUESTS, "too many connections\n")
        # Released when the TCP connection ends, however the handshake turns out.
        connection.connection_lost_waiter.add_done_callback(lambda _: self.per_ip.release(ip))
        return None

    async def process_http(self, connection: ServerConnection, request: Request) -> Response:
        """The operations endpoints (on both ports)."""
        path = request.path.partition("?")[0]
        if path == "/healthz":
            body = await self.status()
            up = body.get("redis") == "up"
            status = http.HTTPStatus.OK if up else http.HTTPStatus.SERVICE_UNAVAILABLE
            return _response(status, orjson.dumps(body), "application/json")
        if path == "/metrics":
            return _response(http.HTTPStatus.OK, self.metrics.render(), PROMETHEUS_CONTENT_TYPE)
        self.metrics.rejected.labels(reason="path").inc()
        return _text(http.HTTPStatus.NOT_FOUND, "not found\n")

    async def handle(self, connection: ServerConnection) -> None:
        """Serve one WebSocket client until it leaves or is closed."""
        self.metrics.connections_opened.inc()
        peer = WsPeer(connection)
        client = self.hub.connect(str(connection.id), peer)
        session = Session(self.hub, client, rate=self.settings.ws_rate_limit, burst=self._burst)
        try:
            session.greet()
            try:
                async with asyncio.timeout(None) as scope:
                    peer.scope = scope
                    async for message in connection:
                        await session.handle(message)
            finally:
                peer.scope = None
        except TimeoutError:
            if peer.close_code is None:
                raise  # not ours: a bug
            await _close(connection, peer.close_code, peer.close_reason)
        except CloseConnection as decision:
            self.metrics.closes.labels(code=str(decision.code)).inc()
            await _close(connection, decision.code, decision.reason)
        except ConnectionClosed:
            pass
        finally:
            self.hub.disconnect(client)


async def _close(connection: ServerConnection, code: int, reason: str) -> None:
    """Close with code; a client that does not read cannot hold this up past CLOSE_TIMEOUT."""
    # A flooding client may have filled websockets' incoming queue, which pauses reading;
    # its reply to our close frame must still be read.
    connection.transport.resume_reading()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await connection.close(code, reason)
    except TimeoutError:
        connection.transport.abort()


async def _never(connection: ServerConnection) -> None:
    """The ops port upgrades nothing: process_http answers every request."""
    await connection.close(messages.CLOSE_GOING_AWAY)


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _text(status: http.HTTPStatus, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


@asynccontextmanager
async def serve_clients(
    settings: BroadcasterSettings, *, hub: Hub, metrics: Metrics, status: Status
) -> AsyncIterator[Server]:
    """Listen on WS_HOST:WS_PORT (and the ops port) until the block exits, then stop cleanly.

    On exit: stop accepting, close every client with 1012 (service restart) so it reconnects
    and resumes, abort whoever has not finished the closing handshake within SHUTDOWN_GRACE.
    """
    edge = Edge(settings, hub=hub, metrics=metrics, status=status)
    limit = settings.ws_send_buffer_bytes
    options: dict[str, Any] = {
        "process_request": edge.process_request,
        "compression": None,  # frames are shared between clients; compressing is per client
        "max_size": settings.ws_max_message_bytes,
        "ping_interval": settings.ws_heartbeat_interval,
        "ping_timeout": settings.ws_heartbeat_timeout,
        "close_timeout": CLOSE_TIMEOUT,
        # drain() (replays) waits above half the buffer limit; the hub drops at the limit.
        "write_limit": (limit // 2, limit // 8),
        "server_header": SERVER_HEADER,
        "backlog": LISTEN_BACKLOG,
    }
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await serve(
                edge.handle,
                settings.ws_host,
                settings.ws_port,
                reuse_port=settings.ws_reuse_port,
                **options,
            )
        ]
        stack.push_async_callback(_shut_down, servers, metrics)
        if settings.ws_unix_socket:
            servers.append(await unix_serve(edge.handle, settings.ws_unix_socket, **options))
        ops = await serve(
            _never,
            settings.broadcaster_http_host,
            settings.broadcaster_http_port,
            process_request=edge.process_http,
            compression=None,
            server_header=SERVER_HEADER,
        )
        stack.push_async_callback(_close_ops, ops)
        yield servers[0]


async def _close_ops(ops: Server) -> None:
    ops.close()
    await _bounded_wait(ops)


async def _shut_down(servers: list[Server], metrics: Metrics) -> None:
    """Stop accepting, close clients with 1012, abort those that do not finish in time."""
    clients = sum(len(server.connections) for server in servers)
    for server in servers:
        server.close(code=messages.CLOSE_SERVICE_RESTART, reason=RESTART_REASON)
    if clients:
        metrics.closes.labels(code=str(messages.CLOSE_SERVICE_RESTART)).inc(clients)
    for server in servers:
        if not await _bounded_wait(server):
            stuck = list(server.all_connections)
            log.warning("aborting clients that did not close in time", clients=len(stuck))
            for connection in stuck:
                connection.transport.abort()
            await _bounded_wait(server)
    log.info("websocket server closed", clients=clients)


async def _bounded_wait(server: Server) -> bool:
    try:
        async with asyncio.timeout(SHUTDOWN_GRACE):
            await server.wait_closed()
    except TimeoutError:
        return False
    return True
