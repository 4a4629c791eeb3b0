"""Exceptions the broadcaster raises on purpose, all rooted at BroadcasterError.

`InvalidEntry`, `CloseConnection` and `StreamUnavailable` name what happened, in the manner
of websockets' `ConnectionClosed`, hence the N818 exemptions.
"""

from __future__ import annotations

from shared.errors import KektechError

__all__ = [
    "BroadcasterError",
    "ClientError",
    "CloseConnection",
    "InvalidEntry",
    "SocketInUse",
    "StreamUnavailable",
]


class BroadcasterError(KektechError):
    """Root of every broadcaster error."""


class InvalidEntry(BroadcasterError):  # noqa: N818
    """A Redis Stream entry that is not a valid event; it is skipped and counted."""

    entry_id: str
    reason: str

    def __init__(self, entry_id: str, reason: str) -> None:
        self.entry_id = entry_id
        self.reason = reason
        super().__init__(entry_id, reason)

    def __str__(self) -> str:
        return f"stream entry {self.entry_id}: {self.reason}"


class ClientError(BroadcasterError):
    """A client message the server refuses; answered with {"type":"error"}, never fatal alone.

    `code` is a stable slug for programs, `message` a sentence for people; neither quotes the
    client's input, which is untrusted and may end up in logs.
    """

    code: str
    message: str
    channel: str | None

    def __init__(self, code: str, message: str, *, channel: str | None = None) -> None:
        self.code = code
        self.message = message
        self.channel = channel
        super().__init__(code, message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class CloseConnection(BroadcasterError):  # noqa: N818
    """The server decided to close one client connection with a WebSocket close code."""

    code: int
    reason: str

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(code, reason)

    def __str__(self) -> str:
        return f"close {self.code}: {self.reason}"


class StreamUnavailable(BroadcasterError):  # noqa: N818
    """Redis did not answer a read of the stream (down, restarting, or unreachable)."""

    reason: str

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    def __str__(self) -> str:
        return f"redis stream unavailable: {self.reason}"


class SocketInUse(BroadcasterError):  # noqa: N818
    """WS_UNIX_SOCKET names a socket another server listens on."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"WS_UNIX_SOCKET {path} is in use by another server (an instance with the same "
            "BROADCASTER_INSTANCE?); taking it over would cut that server off silently"
        )
