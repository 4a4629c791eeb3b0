"""The WebSocket edge: listeners, the handshake policy, the HTTP endpoints, the stop.

Each accepted socket is a connection.Connection (websockets' Sans-I/O protocol on asyncio
callbacks, no task per client); this module decides whom to admit, starts each admitted
client's Session, and answers GET /healthz and /metrics without upgrading, on the WebSocket
port and on a second, loopback port for scrapers (BROADCASTER_HTTP_HOST/PORT). Events do not
pass through here: the hub writes pre-built frames straight to each connection's socket
(see messages.text_frame), since a frame is the same bytes for every client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import http
import os
import pwd
import resource
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import orjson
import structlog
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from broadcaster import handshake, messages
from broadcaster.connection import Connection
from broadcaster.errors import SocketInUse
from broadcaster.handler import Options
from broadcaster.hub import Hub
from broadcaster.limits import (
    FILES_RESERVED,
    ConnectionCounter,
    client_ip,
    connection_ceiling,
    per_ip_key,
)
from broadcaster.metrics import PROMETHEUS_CONTENT_TYPE, Metrics
from broadcaster.session import Session
from shared.broadcaster_settings import BroadcasterSettings
from shared.errors import ConfigError

__all__ = ["Status", "serve_clients"]

log = structlog.get_logger()

Status = Callable[[], Awaitable[dict[str, Any]]]

SHUTDOWN_GRACE = 1.0  # for all clients at stop (the app's kill_timeout is 15 s)
LISTEN_BACKLOG = 16384  # a reconnect storm must not overflow the accept queue (somaxconn caps it)
SERVER_HEADER = "kektech-broadcaster"
UNIX_SOCKET_MODE = 0o660  # owner and group (WS_UNIX_SOCKET_GROUP) may connect, nobody else
RESTART_REASON = "service restart: reconnect and resume with since"
FULL_WARNING_INTERVAL = 60.0  # seconds between warnings while connections are refused
# How long a connection refused as the server is full waits for its request's head before it
# is answered anyway (nginx sends its request at once), and how many wait so at most: half the
# descriptors kept free (limits.FILES_RESERVED), the rest left for Redis and the ops port.
REFUSAL_WAIT = 1.0
REFUSALS_WAITING = FILES_RESERVED // 2


class Edge:
    """Handshake policy, HTTP endpoints and the sessions of open connections."""

    def __init__(
        self,
        settings: BroadcasterSettings,
        *,
        hub: Hub,
        metrics: Metrics,
        status: Status,
        max_connections: int,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.metrics = metrics
        self.status = status
        self.max_connections = max_connections
        self.per_ip = ConnectionCounter(settings.ws_max_connections_per_ip)
        self.connections: set[Connection] = set()
        self.sessions: dict[Connection, Session] = {}
        self.serving = True
        self._all_closed = asyncio.Event()
        self._origins = frozenset(settings.ws_allowed_origins)
        self._burst = float(max(2 * settings.ws_rate_limit, settings.ws_max_subscriptions))
        self._full = _text(http.HTTPStatus.SERVICE_UNAVAILABLE, "server full\n").serialize()
        self._refusal_wait = min(REFUSAL_WAIT, settings.ws_handshake_timeout)
        self._refusing: set[Connection] = set()  # refused, waiting for their request's head
        self._full_warned_at: float | None = None

    def connected(self, connection: Connection) -> None:
        """A socket was accepted: hold it, or, when max_connections are held, answer 503
        as soon as its request's head has come, without parsing it (`Connection.refuse`).
        At most REFUSALS_WAITING wait so: the descriptors are what is short, and past them
        a connection is closed at the accept, unanswered."""
        if len(self.connections) >= self.max_connections:
            self.metrics.rejected.labels(reason="full").inc()
            now = time.monotonic()
            if self._full_warned_at is None or now - self._full_warned_at >= FULL_WARNING_INTERVAL:
                self._full_warned_at = now
                log.warning("server full: refusing connections", connections=self.max_connections)
            if len(self._refusing) < REFUSALS_WAITING:
                self._refusing.add(connection)
                connection.refuse(self._full, within=self._refusal_wait)
            else:
                # Closed unanswered: an answer now could reach nginx before it sent its
                # request, which it can turn into a 502 (Connection.refuse), while an end
                # with nothing read is an error to nginx, which tries the next instance.
                connection.abort()
            return
        self.connections.add(connection)
        self._all_closed.clear()

    def respond(
        self, connection: Connection, request: Request
    ) -> Response | Coroutine[Any, Any, Response]:
        """Admit a WebSocket handshake on WS_PATH, answer /healthz and /metrics, 404 the rest."""
        path = request.path.partition("?")[0]
        if path != self.settings.ws_path:
            return self.process_http(request)
        origins, real_ips = request.headers.get_all("Origin"), request.headers.get_all("X-Real-IP")
        if len(origins) > 1 or len(real_ips) > 1:  # ambiguous: neither can be trusted
            self.metrics.rejected.labels(reason="headers").inc()
            return _text(http.HTTPStatus.BAD_REQUEST, "repeated Origin or X-Real-IP\n")
        origin = origins[0] if origins else None
        if self._origins and origin is not None and origin.lower() not in self._origins:
            self.metrics.rejected.labels(reason="origin").inc()
            return _text(http.HTTPStatus.FORBIDDEN, "origin not allowed\n")
        if not self.serving:
            return _text(http.HTTPStatus.SERVICE_UNAVAILABLE, "server is stopping\n")
        peer = connection.remote_address()
        ip = client_ip(
            peer[0] if isinstance(peer, tuple) else None,
            forwarded_for=request.headers.get_all("X-Forwarded-For"),
            real_ip=real_ips[0] if real_ips else None,
            trusted=self.settings.ws_trusted_proxies,
            local=not isinstance(peer, tuple),  # the Unix socket
        )
        key = per_ip_key(ip)
        if not self.per_ip.acquire(key):
            self.metrics.rejected.labels(reason="ip_limit").inc()
            return _text(http.HTTPStatus.TOO_MANY_REQUESTS, "too many connections\n")
        connection.ip = key  # released when the TCP connection ends, whatever the handshake
        return handshake.accept(connection.protocol, request)

    async def process_http(self, request: Request) -> Response:
        """The operations endpoints (on both ports), for GET and HEAD."""
        path = request.path.partition("?")[0]
        if path not in ("/healthz", "/metrics"):
            self.metrics.rejected.labels(reason="path").inc()
            return _text(http.HTTPStatus.NOT_FOUND, "not found\n")
        if request.method not in ("GET", "HEAD"):
            refusal = _text(http.HTTPStatus.METHOD_NOT_ALLOWED, "GET or HEAD only\n")
            refusal.headers["Allow"] = "GET, HEAD"
            return refusal
        if path == "/healthz":
            body = await self.status()
            up = body.get("redis") == "up" and body.get("reading") is True
            status = http.HTTPStatus.OK if up else http.HTTPStatus.SERVICE_UNAVAILABLE
            response = _response(status, orjson.dumps(body), "application/json")
        else:
            response = _response(http.HTTPStatus.OK, self.metrics.render(), PROMETHEUS_CONTENT_TYPE)
        if request.method == "HEAD":  # the same headers, Content-Length included; no body
            return dataclasses.replace(response, body=b"")
        return response

    def opened(self, connection: Connection) -> Session:
        """A client is connected: start its session (its greeting is sent with the 101)."""
        self.metrics.connections_opened.inc()
        client = self.hub.connect(connection.id, connection, address=connection.ip or "")
        session = Session(self.hub, client, rate=self.settings.ws_rate_limit, burst=self._burst)
        self.sessions[connection] = session
        return session

    def backed_up(self, connection: Connection) -> None:
        session = self.sessions.get(connection)
        if session is not None:
            self.hub.cut_slow(session.client)

    def closing(self, connection: Connection) -> None:
        """Route nothing more to a connection that is no longer open, and count its close if
        the server made it: whoever decided it (the session, the hub, the connection's own
        checks, websockets), and once, whatever follows."""
        session = self.sessions.get(connection)
        if session is not None:
            self.hub.disconnect(session.client)
        code = connection.server_close_code()
        if code is not None:
            self.metrics.closes.labels(code=str(code)).inc()

    def closed(self, connection: Connection) -> None:
        self._refusing.discard(connection)
        session = self.sessions.pop(connection, None)
        if session is not None:
            self.hub.disconnect(session.client)
        if connection.ip is not None:
            self.per_ip.release(connection.ip)
            connection.ip = None
        self.connections.discard(connection)
        if not self.connections:
            self._all_closed.set()

    async def all_closed(self, within: float) -> bool:
        """Wait until no connection is left; False on timeout."""
        if not self.connections:
            return True
        try:
            async with asyncio.timeout(within):
                await self._all_closed.wait()
        except TimeoutError:
            return False
        return True


class OpsEdge:
    """The loopback operations port: HTTP endpoints only, nothing upgrades."""

    def __init__(self, edge: Edge) -> None:
        self._edge = edge
        self.connections: set[Connection] = set()

    def connected(self, connection: Connection) -> None:
        self.connections.add(connection)

    def respond(self, connection: Connection, request: Request) -> Coroutine[Any, Any, Response]:
        return self._edge.process_http(request)

    def opened(self, connection: Connection) -> Session:
        raise AssertionError("the operations port never upgrades")

    def backed_up(self, connection: Connection) -> None:
        raise AssertionError("the operations port never upgrades")

    def closing(self, connection: Connection) -> None:
        raise AssertionError("the operations port never upgrades")

    def closed(self, connection: Connection) -> None:
        self.connections.discard(connection)


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
) -> AsyncIterator[None]:
    """Listen on WS_HOST:WS_PORT (and the ops port) until the block exits, then stop cleanly.

    On exit: stop accepting, close every client with 1012 (service restart) so it reconnects
    and resumes, abort whoever has not finished the closing handshake within SHUTDOWN_GRACE.
    """
    open_files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    max_connections = connection_ceiling(settings.ws_max_connections, open_files)
    if max_connections < settings.ws_max_connections:
        log.warning(
            "the open files limit lowers WS_MAX_CONNECTIONS",
            ws_max_connections=settings.ws_max_connections,
            connections=max_connections,
            open_files=open_files,
        )
    group = _socket_group(settings.ws_unix_socket_group)  # before anything listens
    edge = Edge(settings, hub=hub, metrics=metrics, status=status, max_connections=max_connections)
    ops = OpsEdge(edge)
    limit = settings.ws_send_buffer_bytes
    options = Options(
        max_size=settings.ws_max_message_bytes,
        open_timeout=settings.ws_handshake_timeout,
        ping_interval=settings.ws_heartbeat_interval,
        ping_timeout=settings.ws_heartbeat_timeout,
        # drain() (replays) waits above half the buffer limit; the hub drops at the limit.
        write_limit=(limit // 2, limit // 8),
        max_buffered=limit,
        server_header=SERVER_HEADER,
    )
    loop = asyncio.get_running_loop()

    def client() -> Connection:
        return Connection(edge, options)

    async with contextlib.AsyncExitStack() as stack:
        try:
            listeners = [
                await loop.create_server(
                    client,
                    settings.ws_host,
                    settings.ws_port,
                    reuse_port=settings.ws_reuse_port,
                    backlog=LISTEN_BACKLOG,
                )
            ]
        except OSError as exc:
            raise _listen_error(settings.ws_host, settings.ws_port, "WS", exc) from exc
        stack.push_async_callback(_shut_down, edge, listeners)
        if settings.ws_unix_socket:
            path = settings.ws_unix_socket
            _refuse_live_socket(path)
            bound = _bind_unix(path, group)
            with contextlib.ExitStack() as undo:  # until a server owns the socket
                undo.callback(bound.close)
                stack.callback(_remove_socket, path, os.stat(path).st_ino)
                # Not serving yet: asyncio's loop awaits once it serves, and a failure or a
                # cancellation there would leave no server to close the socket with.
                unix = await loop.create_unix_server(
                    client, sock=bound, backlog=LISTEN_BACKLOG, start_serving=False
                )
                undo.pop_all()
            listeners.append(unix)  # _shut_down closes it, and the socket, from here on
            try:
                await unix.start_serving()
            except OSError as exc:
                raise _unix_socket_error(path, "listen on", exc) from exc
        host, port = settings.broadcaster_http_host, settings.broadcaster_http_port
        try:
            ops_listener = await loop.create_server(lambda: Connection(ops, options), host, port)
        except OSError as exc:
            raise _listen_error(host, port, "BROADCASTER_HTTP", exc) from exc
        stack.callback(_close_ops, ops, ops_listener)
        yield


def _listen_error(host: str, port: int, prefix: str, exc: OSError) -> OSError:
    """exc, its message naming the settings of the address (two ports: which one failed?)."""
    why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else (exc.strerror or str(exc))
    message = f"cannot listen on {host}:{port} ({prefix}_HOST, {prefix}_PORT): {why}"
    return OSError(message) if exc.errno is None else OSError(exc.errno, message)


def _unix_socket_error(path: str, doing: str, exc: OSError) -> OSError:
    """exc, its message naming the setting and the path (the kernel's names neither)."""
    message = f"cannot {doing} WS_UNIX_SOCKET {path}: {exc.strerror or exc}"
    return OSError(message) if exc.errno is None else OSError(exc.errno, message)


def _refuse_live_socket(path: str) -> None:
    """Raise SocketInUse if a server answers at path; binding there would replace its socket
    (a stale file, left by a server that is gone, is replaced as usual)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:  # nothing there, or nobody listening
            return
    raise SocketInUse(path)


def _socket_group(name: str) -> grp.struct_group | None:
    """The group WS_UNIX_SOCKET_GROUP names (None when empty), or ConfigError."""
    if not name:
        return None
    try:
        return grp.getgrnam(name)
    except KeyError:
        raise ConfigError("WS_UNIX_SOCKET_GROUP", f"this host has no group {name}") from None


def _bind_unix(path: str, group: grp.struct_group | None) -> socket.socket:
    """A socket bound at path, with UNIX_SOCKET_MODE and group (None: the process's), that
    does not listen yet: until it does a connect is refused, so nobody gets in through the
    umask's mode or the process's group meanwhile. Raises ConfigError if the process may not
    give the socket to group.

    Nginx connects as another user, through the group (see docs/broadcaster.md): one it
    shares with this service's user, never this user's own group, which can read the
    services' Redis credentials on the VPS (docs/deployment.md).
    """
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # stale: _refuse_live_socket found nobody answering there
    with contextlib.ExitStack() as undo:
        bound = undo.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        try:
            bound.bind(path)
        except OSError as exc:  # a missing directory, no permission, a path too long
            raise _unix_socket_error(path, "bind", exc) from exc
        undo.callback(os.unlink, path)
        if group is not None:
            try:
                os.chown(path, -1, group.gr_gid)
            except PermissionError:
                raise _group_refused(group.gr_name) from None
        os.chmod(path, UNIX_SOCKET_MODE)
        undo.pop_all()
    return bound


def _group_refused(group: str) -> ConfigError:
    """Giving a file to a group takes membership of it (or root); a process keeps the groups
    it started with, so a PM2 daemon started before `usermod -aG` passes on the old ones."""
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return ConfigError(
        "WS_UNIX_SOCKET_GROUP",
        f"user {user} may not give its socket to group {group}: add it (usermod -aG {group} "
        f"{user}), then restart the PM2 daemon (systemctl restart pm2-{user}), whose "
        "processes keep the groups it had",
    )


def _remove_socket(path: str, inode: int) -> None:
    """Remove the socket file at stop (the server does not), unless another server has bound
    a new one there since."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


def _close_ops(ops: OpsEdge, listener: asyncio.Server) -> None:
    listener.close()
    for connection in list(ops.connections):
        connection.abort()


async def _shut_down(edge: Edge, listeners: list[asyncio.Server]) -> None:
    """Stop accepting, close clients with 1012, abort those that do not finish in time."""
    edge.serving = False
    for listener in listeners:
        listener.close()
    clients = 0
    for connection in list(edge.connections):
        if connection.is_open():
            connection.close(messages.CLOSE_SERVICE_RESTART, RESTART_REASON)
            clients += 1
        elif connection.conversation is None:
            connection.abort()  # still in its opening handshake, or an HTTP request
    if not await edge.all_closed(SHUTDOWN_GRACE):
        log.warning("aborting clients that did not close in time", clients=len(edge.connections))
        for connection in list(edge.connections):
            connection.abort()
        await edge.all_closed(SHUTDOWN_GRACE)
    log.info("websocket server closed", clients=clients)
