"""One client socket: websockets' Sans-I/O protocol driven by asyncio's protocol callbacks.

websockets (`ServerProtocol`) parses the handshake request and the frames, answers pings
and runs the closing handshake; this module moves bytes between it and the socket and keeps
the connection's timers. A connection costs no task: its messages are answered inside
`data_received`, and only work that must wait (a resume reading Redis, an HTTP endpoint)
runs as a task, while the connection's later messages wait their turn, in order.

The hub writes event frames straight to the socket (`write`), not through the protocol
object. That keeps the order of bytes because the hub writes only to routed clients, and
the connection has its client unrouted (`Handler.closing`) the moment it stops being open,
before its close frame is written; whatever the protocol produces (pongs, the close frame)
is written at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import os
import time
import traceback
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, cast

import structlog
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING, OPEN
from websockets.server import ServerProtocol

from broadcaster.errors import CloseConnection

__all__ = ["Connection", "Conversation", "Handler", "Options"]

log = structlog.get_logger()

CLOSE_TIMEOUT = 2.0  # for the closing handshake, then the socket is aborted
MAX_WAITING = 16  # messages held while a resume runs; past this, reading pauses
# Bytes of a read parsed before their frames are answered and charged (uvloop hands over
# up to 256 KiB per read): 341 empty frames, measured at 1.1-2.5 ms when every frame is
# handled (the rate out of reach), 2-4 ms while the machine was busy; 4 KiB took twice that.
READ_SLICE = 2048
# Frames one message may come in. Browsers send a message in one frame; empty continuation
# frames count nothing towards max_size, so without this a message could grow forever.
MAX_FRAGMENTS = 64
WS_LOGGER = logging.getLogger("websockets.server")

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


class Connection(asyncio.Protocol):
    """One socket, from the opening handshake to the end of the TCP connection."""

    __slots__ = (
        "_deadline",
        "_drain_waiters",
        "_early",
        "_fragments",
        "_handler",
        "_head_tail",
        "_held",
        "_open",
        "_options",
        "_paused",
        "_ping_payload",
        "_ping_timer",
        "_requested",
        "_task",
        "_unread",
        "_waiting",
        "buffered",
        "conversation",
        "ip",
        "loop",
        "protocol",
        "transport",
        "write",
    )

    def __init__(self, handler: Handler, options: Options) -> None:
        self._handler = handler
        self._options = options
        self.loop = asyncio.get_running_loop()
        self.protocol = ServerProtocol(max_size=options.max_size, logger=WS_LOGGER)
        self.transport: asyncio.Transport
        self.write: Callable[[bytes], None]
        self.buffered: Callable[[], int]
        self.conversation: Conversation | None = None
        self.ip: str | None = None  # its per-IP key once admitted (limits.per_ip_key)
        self._deadline: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None
        self._fragments: list[Frame] | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiting: deque[str | bytes] | None = None
        self._open = False  # whether the handler was told of the opening and not yet of its end
        self._paused = False
        self._requested = False  # an HTTP request was parsed (answered, or being answered)
        self._held = False  # reading paused: messages wait behind a running task
        self._unread = b""  # what was read but not parsed when reading paused
        self._head_tail = b""  # the last bytes of the request's head read so far
        self._early: bytes | None = None  # what came after the request, until it is answered
        self._drain_waiters: list[asyncio.Future[None]] = []

    # What the hub uses (hub.Peer): write and buffered are the transport's own methods.

    @property
    def id(self) -> str:
        return str(self.protocol.id)

    def is_open(self) -> bool:
        return self.protocol.state is OPEN

    def backed_up(self) -> bool:
        """Whether more than Options.max_buffered waits in the socket buffer for the client."""
        return self.transport.get_write_buffer_size() > self._options.max_buffered

    def server_close_code(self) -> int | None:
        """The code of the close frame the server sent, unless it answered the client's."""
        protocol = self.protocol
        sent = protocol.close_sent
        if sent is None or protocol.close_rcvd_then_sent:
            return None
        return sent.code

    def remote_address(self) -> Any:
        """The peer's (host, port), or the Unix socket's peer name (not a tuple)."""
        return self.transport.get_extra_info("peername")

    async def drain(self) -> None:
        """Wait until the socket buffer is below the low-water mark (or the socket is gone)."""
        if not self._paused:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            self._drain_waiters.remove(waiter)

    # Closing

    def close(self, code: int, reason: str) -> None:
        """Stop whatever the connection was doing and start the closing handshake; abort the
        socket if it is not done in CLOSE_TIMEOUT. For a client that did nothing wrong (a
        stop, a slow consumer, our own error): what it sends until its close frame is
        still read, and charged (`_charge`)."""
        self._stop_work()
        if self.protocol.state is OPEN:
            self.protocol.send_close(code, reason)
            self._left_open()
            self._flush()
            self._expect_close()
            self._release_hold()  # the client's answer must be read
        elif self.protocol.state is CONNECTING:
            self.abort()

    def abort(self) -> None:
        self.transport.abort()

    def refuse(self, response: bytes) -> None:
        """Answer with `response` (a whole HTTP response) before reading anything, and close."""
        self.transport.write(response)
        self.transport.close()

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): close frame, end of stream, and what the
        client sends from now on is discarded unparsed (it costs nothing per frame) until
        it ends the socket or CLOSE_TIMEOUT aborts it. For a client that broke the protocol
        or abused it: a closing handshake would parse all it sends, looking for its close
        frame, and a flood would go on being parsed until the timeout."""
        self._stop_work()
        self.protocol.fail(code, reason)
        self._left_open()
        self._flush()
        self._expect_close()
        self._release_hold()  # reading only to see the client end the connection

    def _left_open(self) -> None:
        """The connection is no longer open: nothing it started may go on (a resume that
        has not run yet would route it again), and the hub forgets it."""
        self._stop_work()
        if self._open:
            self._open = False
            self._handler.closing(self)

    def _stop_work(self) -> None:
        self._waiting = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None

    def _expect_close(self) -> None:
        if self.protocol.close_expected():
            self._abort_later()

    def _abort_later(self) -> None:
        """Abort the socket CLOSE_TIMEOUT from now unless it ends first (or a deadline for
        it is set already). Counted from when the close frame is queued, not sent: a client
        that reads nothing would otherwise never see it go, and keep its socket."""
        if self._deadline is None:
            self._deadline = self.loop.call_later(CLOSE_TIMEOUT, self.transport.abort)

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.write
        self.buffered = self.transport.get_write_buffer_size
        self.transport.set_write_buffer_limits(*self._options.write_limit)
        self._deadline = self.loop.call_later(self._options.open_timeout, self.transport.abort)
        self._handler.connected(self)

    def data_received(self, data: bytes) -> None:
        if self._requested:
            self._feed(data)
        else:
            self._receive(self._up_to_request_end(data))

    def _feed(self, data: bytes) -> None:
        """Parse data READ_SLICE bytes at a time, each slice's frames answered and charged
        before the next is parsed: a flood is then stopped within a slice, not after the
        whole read (43,000 empty frames in 256 KiB). Stops once nothing more is to be parsed
        (the connection failed, or the client's close frame came: websockets discards the
        rest), and keeps the rest for later while reading is paused behind a resume."""
        protocol = self.protocol
        for start in range(0, len(data), READ_SLICE):
            if protocol.eof_sent:
                return
            if self._held:
                self._unread += data[start:]
                return
            self._receive(data[start : start + READ_SLICE])

    def _receive(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        if self._open and protocol.state is not OPEN:
            self._left_open()  # a close frame arrived, or the data broke the protocol
        events = protocol.events_received()
        if not self._requested and protocol.handshake_exc is not None:
            self._requested = True
            if isinstance(protocol.handshake_exc, InvalidMessage):  # websockets answers nothing
                self._refuse_unparsable()
        self._flush()  # pongs, the echo of a close frame, a refused request
        self._expect_close()
        if self._open and self.backed_up():
            self._handler.backed_up(self)  # a ping flood it does not read the answers to
        for event in events:
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Request):  # a server receives no Response
                self._request(event)

    def eof_received(self) -> bool | None:
        if self.protocol.state is CONNECTING and self._task is not None:
            # An HTTP answer being prepared: the client ended only its side, the answer
            # still goes out (_respond then ends the connection).
            return True
        self.protocol.receive_eof()
        self._left_open()
        self._flush()
        # Returning None closes the socket: WebSocket never writes after the peer's EOF.
        # The socket ends once what waits in its buffer is sent, which a client that ended
        # its side but reads nothing never lets happen.
        self._abort_later()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent: the protocol state is CLOSED now
        self._left_open()
        self._stop_work()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.resume_writing()  # nothing more will be written: release drain() waiters
        self._handler.closed(self)
        # Leave no reference cycle behind, so that reference counting frees the connection
        # now: the cycle collector's rare full passes would keep thousands of ended
        # connections in memory, then stall every client while walking them.
        self.conversation = None  # session -> hub client -> this connection
        _release_parser(self.protocol)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    # Sending what the protocol produced

    def _flush(self) -> None:
        chunks = self.protocol.data_to_send()
        if not chunks:
            return
        if len(chunks) > 1 and all(chunks):  # pongs to a burst of pings: one write for all
            chunks = [b"".join(chunks)]
        for data in chunks:
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                try:
                    self.transport.write_eof()
                except (OSError, RuntimeError):  # the socket is already going away
                    self.transport.abort()
            else:
                self.transport.close()

    # The opening handshake

    def _up_to_request_end(self, data: bytes) -> bytes:
        """The part of data up to the end of the request's head; what follows is kept in
        _early until the request is answered. websockets would parse it as frames at once,
        before the answer: a ping's pong would go out ahead of the 101, and the bytes after
        an HTTP request (a pipelined one) would fail the connection before its answer."""
        seen = self._head_tail + data
        end = seen.find(b"\r\n\r\n")
        if end < 0:
            self._head_tail = seen[-3:]
            return data
        cut = end + 4 - len(self._head_tail)
        self._head_tail = b""
        if cut < len(data):
            self._early = data[cut:]
        return data[:cut]

    def _refuse_unparsable(self) -> None:
        """Answer 400 to a request websockets could not parse (a body, a byte that is not
        ASCII), which it would end with nothing: a proxy such as Nginx counts an upstream
        that answers nothing as failed, and three such requests took every instance out."""
        response = self.protocol.reject(400, "malformed HTTP request\n")
        response.headers["Server"] = self._options.server_header
        self.transport.write(response.serialize())  # before the end the protocol queued

    def _request(self, request: Request) -> None:
        self._requested = True
        try:
            answer = self._handler.respond(self, request)
        except Exception:  # a bug: answered, logged, and the server goes on
            log.exception("handshake answer failed")
            answer = self.protocol.reject(500, "internal error\n")
        if isinstance(answer, Response):
            self._respond(answer)
        else:
            # Nothing more is read until the answer is sent, and then the connection ends.
            self.transport.pause_reading()
            self._task = self.loop.create_task(self._respond_later(answer))

    async def _respond_later(self, answer: Coroutine[Any, Any, Response]) -> None:
        try:
            response = await answer
        except Exception:
            log.exception("HTTP endpoint failed")
            response = self.protocol.reject(500, "internal error\n")
        self._task = None
        self._respond(response)

    def accept(self, request: Request) -> Response:
        """The 101 answer to a valid handshake request, or websockets' refusal of another.

        websockets checks the request (`process_request`); the 101 is built here only to
        date it from a clock read once a second (`ServerProtocol.accept` formats the date
        for every connection, a tenth of a connect storm's Python time).
        """
        protocol = self.protocol
        try:
            accept_header, extensions_header, protocol_header = protocol.process_request(request)
        except Exception:
            return protocol.accept(request)  # checks again and builds the fitting refusal
        protocol.accept_called = True
        headers = Headers(
            [
                ("Date", _http_date()),
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", accept_header),
            ]
        )
        if extensions_header is not None:
            headers["Sec-WebSocket-Extensions"] = extensions_header
        if protocol_header is not None:
            headers["Sec-WebSocket-Protocol"] = protocol_header
        return Response(101, "Switching Protocols", headers)

    def _respond(self, response: Response) -> None:
        if self.protocol.state is not CONNECTING:
            return  # the client left meanwhile
        response.headers["Server"] = self._options.server_header
        self.protocol.send_response(response)
        if self.protocol.state is not OPEN:
            self._early = None
            self._flush()
            self.transport.close()  # an HTTP answer or a refusal: sent, then the socket ends
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.conversation = conversation = self._handler.opened(self)
        self._open = True
        # The 101 and the greeting in one write: one system call, one read for the client.
        self.transport.write(b"".join(self.protocol.data_to_send()) + conversation.greeting())
        self._schedule_ping()
        if self._early is not None:  # frames sent right behind the request
            early, self._early = self._early, None
            self.data_received(early)

    # Frames and messages

    def _frame(self, frame: Frame) -> None:
        """Hand a message to the conversation, and charge it for every other frame but the
        answer to our ping and the close: parsing a frame costs about as much as answering
        a small message, so a flood of any kind of frame is a flood of messages."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(frame.opcode, bytes(frame.data))
                return
            self._fragments = [frame]
            self._charge("fragment")
        elif opcode is Opcode.CONT:
            fragments = self._fragments
            if fragments is None:  # the protocol refuses this already; never reached
                return
            fragments.append(frame)
            if frame.fin:
                self._fragments = None
                self._message(fragments[0].opcode, b"".join(bytes(f.data) for f in fragments))
            elif len(fragments) >= MAX_FRAGMENTS:
                self._fragments = None
                self._fail(CloseCode.MESSAGE_TOO_BIG, f"more than {MAX_FRAGMENTS} frames")
            else:
                self._charge("fragment")
        elif opcode is Opcode.PING:  # answered by the protocol itself (flushed above)
            self._charge("ping")
        elif opcode is Opcode.PONG:
            if frame.data != self._ping_payload:
                self._charge("pong")
                return
            self._ping_payload = None
            if self._ping_timer is not None:
                self._ping_timer.cancel()
            self._schedule_ping()
        # CLOSE is echoed by the protocol itself (flushed above).

    def _charge(self, kind: str) -> None:
        # Also during a closing handshake we started: the frames before the client's close
        # frame are parsed, so a flood then costs as much. Once the connection is failed or
        # the client's close came (EOF sent), nothing more is parsed.
        if self.conversation is None or self.protocol.eof_sent:
            return
        try:
            self.conversation.charge(kind)
        except CloseConnection as decision:
            self._fail(decision.code, decision.reason)

    def _message(self, opcode: Opcode, data: bytes) -> None:
        if self.protocol.state is not OPEN:
            self._charge("message")  # read only to find the client's close frame
            return
        message: str | bytes = data
        if opcode is Opcode.TEXT:
            try:
                message = data.decode()
            except UnicodeDecodeError as exc:
                self._fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
        if self._task is not None:  # a resume is running: this message waits its turn
            waiting = self._waiting
            if waiting is None:
                waiting = self._waiting = deque()
            waiting.append(message)
            if len(waiting) >= MAX_WAITING:
                self._held = True
                self.transport.pause_reading()
            return
        self._deliver(message)

    def _deliver(self, message: str | bytes) -> None:
        assert self.conversation is not None
        try:
            work = self.conversation.handle(message)
        except CloseConnection as decision:
            self._fail(decision.code, decision.reason)
            return
        except Exception:  # a bug: this client is closed, the others are not affected
            log.exception("client message failed")
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
            return
        if work is not None:
            self._task = self.loop.create_task(self._run(work))
            # A task cancelled before its first step never awaits `work`: closed here then
            # (when the task is done, `work` has finished or never started).
            self._task.add_done_callback(lambda _: work.close())

    async def _run(self, work: Work) -> None:
        """Run a message's waiting part, then the messages that arrived meanwhile."""
        try:
            await work
        except CloseConnection as decision:
            self._task = None
            self._fail(decision.code, decision.reason)
            return
        except Exception:
            log.exception("client message failed")
            self._task = None
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
            return
        self._task = None
        waiting = self._waiting
        while waiting and self._task is None and self.protocol.state is OPEN:
            self._deliver(waiting.popleft())
        if self._task is None:
            self._release_hold()

    def _release_hold(self) -> None:
        """Read again after a hold: what was read but not parsed first, then the socket."""
        if not self._held:
            return
        self._held = False
        unread, self._unread = self._unread, b""
        self.transport.resume_reading()
        self._feed(unread)  # may hold again

    # Heartbeat: a ping every ping_interval, answered within ping_timeout or the end (1011)

    def _schedule_ping(self) -> None:
        interval = self._options.ping_interval
        if interval is not None and self.protocol.state is OPEN:
            self._ping_timer = self.loop.call_later(interval, self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        if self.protocol.state is not OPEN:
            return
        self._ping_payload = os.urandom(4)
        self.protocol.send_ping(self._ping_payload)
        self._flush()
        timeout = self._options.ping_timeout
        if timeout is None:
            self._schedule_ping()
        else:
            self._await_pong(timeout)

    def _await_pong(self, timeout: float) -> None:
        self._ping_timer = self.loop.call_later(timeout, self._ping_timed_out, timeout)

    def _ping_timed_out(self, timeout: float) -> None:
        self._ping_timer = None
        if self.protocol.state is not OPEN:
            return
        if self._held:
            # Its answer may be among what is not read yet, while a resume runs (bounded by
            # the resume's own limits): not the client's fault, so wait for it again.
            self._await_pong(timeout)
            return
        self._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")


def _release_parser(protocol: ServerProtocol) -> None:
    """Break the cycles websockets' protocol is left in at the end of a connection.

    Its parser is a generator suspended in a frame that refers to the protocol, and the
    exception that ended parsing, if any, holds such frames in its traceback.
    """
    protocol.parser.close()
    if protocol.parser_exc is not None:
        traceback.clear_frames(protocol.parser_exc.__traceback__)


def _http_date() -> str:
    """The HTTP Date header's value, formatted once per second."""
    return _formatted_date(int(time.time()))


@functools.lru_cache(maxsize=1)
def _formatted_date(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)
