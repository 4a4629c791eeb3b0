"""What a connection is given: the edge's Handler, the session's Conversation and the
listener's Options (connection.Connection drives them)."""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from websockets.http11 import Request, Response

if TYPE_CHECKING:
    from broadcaster.connection import Connection

__all__ = ["Conversation", "Handler", "Options", "Work"]

Work = Coroutine[Any, Any, None]


class Conversation(Protocol):
    """Whom an open connection hands its messages to (session.Session)."""

    def greeting(self) -> bytes:
        """The first frame to send, right after the handshake response."""
        ...

    def handle(self, message: str | bytes) -> Work | None:
        """Answer a message; return work that must wait (run in order), or raise
        CloseConnection (for abuse: the connection is failed)."""
        ...

    def charge(self, kind: str) -> None:
        """Count a frame that is not a message to answer (kind: "ping", "pong", "fragment",
        or "message" for one read during our closing handshake); raise CloseConnection for
        a flood."""
        ...

    def excuse(self, held: float) -> None:
        """The connection answered none of the client's messages for `held` seconds (work
        ran): those it sent meanwhile come at once now, and must not count as a flood."""
        ...


class Handler(Protocol):
    """The edge's policy, told of each connection's life (server.Edge)."""

    def connected(self, connection: Connection) -> None: ...
    def respond(
        self, connection: Connection, request: Request
    ) -> Response | Coroutine[Any, Any, Response]: ...
    def opened(self, connection: Connection) -> Conversation: ...
    def backed_up(self, connection: Connection) -> None:
        """What an open connection wrote on its own (pongs to the client's pings) took its
        buffer past Options.max_buffered: the client sends but does not read."""
        ...

    def closing(self, connection: Connection) -> None:
        """An open connection stopped being open (closing handshake, failure, end of the
        socket): nothing may be sent to it from now on. Told once per connection, with the
        close frame that ended it already sent (Connection.server_close_code)."""
        ...

    def closed(self, connection: Connection) -> None: ...


@dataclass(frozen=True, slots=True)
class Options:
    """What every connection of a listener shares."""

    max_size: int
    open_timeout: float  # for the opening handshake, then the socket is aborted
    ping_interval: float | None
    ping_timeout: float | None
    write_limit: tuple[int, int]  # (high, low): drain() waits above high until below low
    max_buffered: int  # bytes waiting for the client past which it is a slow consumer
    server_header: str
