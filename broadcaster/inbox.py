"""A connection's inbox: the client's messages put together, charged, and answered in order.

A message is answered inside the read callback; one whose answer must wait (a resume reading
Redis) runs as a task, and the messages that arrive meanwhile wait their turn; past
MAX_WAITING of them, reading pauses (the hold) until the task is done.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

import structlog
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from broadcaster.errors import CloseConnection
from broadcaster.handler import Conversation, Work

__all__ = ["MAX_FRAGMENTS", "MAX_WAITING", "Inbox", "Reader"]

log = structlog.get_logger()

MAX_WAITING = 16  # messages held while a resume runs; past this, reading pauses
# Frames one message may come in. Browsers send a message in one frame; empty continuation
# frames count nothing towards max_size, so without this a message could grow forever.
MAX_FRAGMENTS = 64


class Reader(Protocol):
    """What the inbox uses of its connection (connection.Connection)."""

    conversation: Conversation | None
    protocol: ServerProtocol
    transport: asyncio.Transport

    def data_received(self, data: bytes) -> None: ...
    def close(self, code: int, reason: str) -> None: ...
    def fail(self, code: int, reason: str) -> None: ...


class Inbox:
    """The fragments of the message being received, the task answering a message, the
    messages waiting for it, and the hold with what was read but not parsed meanwhile.

    It keeps no reference to its connection: each call is handed it, and so is the task,
    whose reference goes when it ends. The connection is then freed by reference counting
    when it ends (see Connection.connection_lost).
    """

    __slots__ = ("_fragments", "_held", "_loop", "_task", "_unread", "_waiting", "_work_began")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._fragments: list[Frame] | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiting: deque[str | bytes] | None = None
        self._held = False  # reading paused: messages wait behind a running task
        self._unread = b""  # what was read but not parsed when reading paused
        self._work_began = 0.0  # loop time the task began: messages wait from then on

    @property
    def held(self) -> bool:
        """Whether reading is paused: the connection parses nothing, and keeps what it read."""
        return self._held

    @property
    def working(self) -> bool:
        """Whether a message's waiting part runs (a resume), other messages waiting behind it."""
        return self._task is not None

    def keep(self, unread: bytes) -> None:
        """Keep what was read during the hold, to be parsed when it ends (`release`)."""
        self._unread += unread

    def receive(self, connection: Reader, frame: Frame) -> None:
        """Take a data frame (text, binary or continuation): answer the message it ends,
        and charge the conversation for a fragment."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(connection, frame.opcode, bytes(frame.data))
                return
            self._fragments = [frame]
            self.charge(connection, "fragment")
        elif opcode is Opcode.CONT:
            fragments = self._fragments
            if fragments is None:  # the protocol refuses this already; never reached
                return
            fragments.append(frame)
            if frame.fin:
                self._fragments = None
                self._message(
                    connection, fragments[0].opcode, b"".join(bytes(f.data) for f in fragments)
                )
            elif len(fragments) >= MAX_FRAGMENTS:
                self._fragments = None
                connection.fail(CloseCode.MESSAGE_TOO_BIG, f"more than {MAX_FRAGMENTS} frames")
            else:
                self.charge(connection, "fragment")

    def charge(self, connection: Reader, kind: str) -> None:
        """Count a frame that is not a message to answer (Conversation.charge); fail the
        connection for a flood."""
        # Also during a closing handshake we started: the frames before the client's close
        # frame are parsed, so a flood then costs as much. Once the connection is failed or
        # the client's close came (EOF sent), nothing more is parsed.
        conversation = connection.conversation
        if conversation is None or connection.protocol.eof_sent:
            return
        try:
            conversation.charge(kind)
        except CloseConnection as decision:
            connection.fail(decision.code, decision.reason)

    def release(self, connection: Reader) -> None:
        """Read again after a hold: what was read but not parsed first, then the socket."""
        if not self._held:
            return
        self._held = False
        unread, self._unread = self._unread, b""
        connection.transport.resume_reading()
        connection.data_received(unread)  # may hold again

    def stop(self) -> None:
        """Answer nothing more: the waiting messages are dropped and the task cancelled."""
        self._waiting = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _message(self, connection: Reader, opcode: Opcode, data: bytes) -> None:
        if connection.protocol.state is not OPEN:
            self.charge(connection, "message")  # read only to find the client's close frame
            return
        message: str | bytes = data
        if opcode is Opcode.TEXT:
            try:
                message = data.decode()
            except UnicodeDecodeError as exc:
                connection.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
        if self._task is not None:  # a resume is running: this message waits its turn
            waiting = self._waiting
            if waiting is None:
                waiting = self._waiting = deque()
            waiting.append(message)
            if len(waiting) >= MAX_WAITING:
                self._held = True
                connection.transport.pause_reading()
            return
        self._deliver(connection, message)

    def _deliver(self, connection: Reader, message: str | bytes) -> None:
        assert connection.conversation is not None
        try:
            work = connection.conversation.handle(message)
        except CloseConnection as decision:
            connection.fail(decision.code, decision.reason)
            return
        except Exception:  # a bug: this client is closed, the others are not affected
            log.exception("client message failed")
            connection.close(CloseCode.INTERNAL_ERROR, "internal error")
            return
        if work is not None:
            self._work_began = self._loop.time()
            self._task = self._loop.create_task(self._run(connection, work))
            # A task cancelled before its first step never awaits `work`: closed here then
            # (when the task is done, `work` has finished or never started).
            self._task.add_done_callback(lambda _: work.close())

    async def _run(self, connection: Reader, work: Work) -> None:
        """Run a message's waiting part, then the messages that arrived meanwhile."""
        try:
            await work
        except CloseConnection as decision:
            self._task = None
            connection.fail(decision.code, decision.reason)
            return
        except Exception:
            log.exception("client message failed")
            self._task = None
            connection.close(CloseCode.INTERNAL_ERROR, "internal error")
            return
        self._task = None
        if connection.conversation is not None:
            # What waited, here and in the socket, comes at once now; the client sent it
            # over the time the work ran.
            connection.conversation.excuse(self._loop.time() - self._work_began)
        waiting = self._waiting
        while waiting and self._task is None and connection.protocol.state is OPEN:
            self._deliver(connection, waiting.popleft())
        if self._task is None:
            self.release(connection)
