"""A connection's heartbeat: a ping every ping_interval, answered within ping_timeout or the
connection fails (1011), unless the ping may still wait behind what was sent before it."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Protocol

from websockets.frames import CloseCode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from broadcaster.inbox import Inbox

__all__ = ["Heartbeat", "Pinged"]

# Bytes a second a client must take of what was sent before the ping for its answer to be
# waited for again: a third of what a replay needs (its buffer down to an eighth within
# REPLAY_DRAIN_TIMEOUT, ~13 KB/s with the default WS_SEND_BUFFER_BYTES).
MIN_READ_RATE = 4096


class Pinged(Protocol):
    """What the heartbeat uses of its connection (connection.Connection)."""

    protocol: ServerProtocol

    def flush(self) -> None: ...
    def fail(self, code: int, reason: str) -> None: ...
    def unsent(self) -> int: ...


class Heartbeat:
    """The ping timer and the payload of the ping awaiting its answer.

    It keeps no reference to its connection: each call is handed it, and so is the timer,
    whose reference goes when it fires or is cancelled. The connection is then freed by
    reference counting when it ends (see Connection.connection_lost).
    """

    __slots__ = ("_inbox", "_interval", "_loop", "_payload", "_timeout", "_timer", "_unsent")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        interval: float | None,
        timeout: float | None,
        inbox: Inbox,
    ) -> None:
        self._loop = loop
        self._interval = interval
        self._timeout = timeout
        self._inbox = inbox  # whether the answer may be among what is not read yet
        self._payload: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes not taken by the client when last looked at, the ping's too

    def start(self, connection: Pinged) -> None:
        """Ping ping_interval from now (once open, and after each answer)."""
        interval = self._interval
        if interval is not None and connection.protocol.state is OPEN:
            self._timer = self._loop.call_later(interval, self._ping, connection)

    def answered(self, connection: Pinged, data: bytes | bytearray | memoryview) -> bool:
        """Whether a pong with `data` answers our ping; if so, the next ping is scheduled."""
        if data != self._payload:
            return False
        self._payload = None
        if self._timer is not None:
            self._timer.cancel()
        self.start(connection)
        return True

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _ping(self, connection: Pinged) -> None:
        self._timer = None
        if connection.protocol.state is not OPEN:
            return
        self._payload = os.urandom(4)
        connection.protocol.send_ping(self._payload)
        connection.flush()
        self._unsent = connection.unsent()
        timeout = self._timeout
        if timeout is None:
            self.start(connection)
        else:
            self._await_pong(connection, timeout)

    def _await_pong(self, connection: Pinged, timeout: float) -> None:
        self._timer = self._loop.call_later(timeout, self._timed_out, connection, timeout)

    def _timed_out(self, connection: Pinged, timeout: float) -> None:
        self._timer = None
        if connection.protocol.state is not OPEN:
            return
        unsent = connection.unsent()
        inbox = self._inbox
        if inbox.held or inbox.working:
            # Not the client's fault, so wait for the answer again: it may be among what is
            # not read yet while a resume runs, or the ping may wait behind the replay (bounded
            # by the resume's own limits), which also writes as the client reads: what is
            # unsent then says nothing of its progress. The first look after it waits again.
            self._unsent = sys.maxsize
            self._await_pong(connection, timeout)
            return
        if self._unsent - unsent >= MIN_READ_RATE * timeout:
            # The ping may still wait behind a backlog the client is reading down (less is
            # unsent than at the last look, by a useful amount): waited for again. A client
            # that reads nothing, or a trickle (slowloris), is failed.
            self._unsent = unsent
            self._await_pong(connection, timeout)
            return
        connection.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
