"""One client socket: websockets' Sans-I/O protocol driven by asyncio's protocol callbacks.

websockets (`ServerProtocol`) parses the handshake request and the frames, answers pings
and runs the closing handshake; this module moves bytes between it and the socket and keeps
the connection's life: the handshake, the closing, flow control. What it reads from an open
connection goes to its Inbox (inbox.py) and its pings come from its Heartbeat (heartbeat.py);
both are handed the connection on each call and keep no reference to it. A connection
costs no task: its messages are answered inside `data_received`, and only work that must
wait (a resume reading Redis, an HTTP endpoint) runs as a task, while the connection's later
messages wait their turn, in order.

The hub writes event frames straight to the socket (`write`), not through the protocol
object. That keeps the order of bytes because the hub writes only to routed clients, and
the connection has its client unrouted (`Handler.closing`) the moment it stops being open,
before its close frame is written; whatever the protocol produces (pongs, the close frame)
is written at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import struct
import traceback
from collections.abc import Callable, Coroutine
from termios import TIOCOUTQ
from typing import Any, cast

import structlog
from websockets.exceptions import InvalidMessage
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING, OPEN
from websockets.server import ServerProtocol

from broadcaster import handshake
from broadcaster.handler import Conversation, Handler, Options
from broadcaster.heartbeat import Heartbeat
from broadcaster.inbox import Inbox

__all__ = ["Connection"]

log = structlog.get_logger()

CLOSE_TIMEOUT = 2.0  # for the closing handshake, then the socket is aborted
# Bytes of a read parsed before their frames are answered and charged (uvloop hands over
# up to 256 KiB per read): 341 empty frames, measured at 1.1-2.5 ms when every frame is
# handled (the rate out of reach), 2-4 ms while the machine was busy; 4 KiB took twice that.
READ_SLICE = 2048
WS_LOGGER = logging.getLogger("websockets.server")
OUTQ_BYTES = bytes(4)  # the int TIOCOUTQ (SIOCOUTQ on a socket) answers into


class Connection(asyncio.Protocol):
    """One socket, from the opening handshake to the end of the TCP connection."""

    __slots__ = (
        "_answering",
        "_deadline",
        "_drain_waiters",
        "_early",
        "_handler",
        "_head_tail",
        "_heartbeat",
        "_inbox",
        "_open",
        "_options",
        "_paused",
        "_refusal",
        "_requested",
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
        self._inbox = inbox = Inbox(self.loop)
        self._heartbeat = Heartbeat(
            self.loop, interval=options.ping_interval, timeout=options.ping_timeout, inbox=inbox
        )
        self._deadline: asyncio.TimerHandle | None = None
        self._answering: asyncio.Task[None] | None = None  # an HTTP endpoint's answer
        self._open = False  # whether the handler was told of the opening and not yet of its end
        self._paused = False
        self._requested = False  # an HTTP request was parsed (answered, or being answered)
        self._head_tail = b""  # the last bytes of the request's head read so far
        self._early: bytes | None = None  # what came after the request, until it is answered
        self._refusal: bytes | None = None  # the answer of a refused connection, until sent
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

    def unsent(self) -> int:
        """Bytes written but not yet taken by the client: the transport's buffer and the
        socket's send queue (unacknowledged on TCP, unread on a Unix socket)."""
        queued = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):  # closed meanwhile
                queued += struct.unpack("i", fcntl.ioctl(sock.fileno(), TIOCOUTQ, OUTQ_BYTES))[0]
        return queued

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
        still read, and charged (`Inbox.charge`)."""
        self._stop_work()
        if self.protocol.state is OPEN:
            self.protocol.send_close(code, reason)
            self._left_open()
            self.flush()
            self._expect_close()
            self._inbox.release(self)  # the client's answer must be read
        elif self.protocol.state is CONNECTING:
            self.abort()

    def abort(self) -> None:
        self.transport.abort()

    def refuse(self, response: bytes, *, within: float) -> None:
        """Answer with `response` (a whole HTTP response) once the request's head has come,
        unparsed, or `within` seconds from now, and close. Not before the request: nginx
        could read the answer before it sent its request, and then, trying the next
        instance, read the rest of this answer (the body) as that instance's answer (a
        502)."""
        self._refusal = response
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(within, self._send_refusal)

    def _send_refusal(self) -> None:
        if self._refusal is None:
            return
        self.transport.write(self._refusal)
        self._refusal = None
        self.transport.close()

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): close frame, end of stream, and what the
        client sends from now on is discarded unparsed (it costs nothing per frame) until
        it ends the socket or CLOSE_TIMEOUT aborts it. For a client that broke the protocol
        or abused it: a closing handshake would parse all it sends, looking for its close
        frame, and a flood would go on being parsed until the timeout."""
        self._stop_work()
        self.protocol.fail(code, reason)
        self._left_open()
        self.flush()
        self._expect_close()
        self._inbox.release(self)  # reading only to see the client end the connection

    def _left_open(self) -> None:
        """The connection is no longer open: nothing it started may go on (a resume that
        has not run yet would route it again), and the hub forgets it."""
        self._stop_work()
        if self._open:
            self._open = False
            self._handler.closing(self)

    def _stop_work(self) -> None:
        self._inbox.stop()
        if self._answering is not None:
            self._answering.cancel()
            self._answering = None
        self._heartbeat.stop()

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
            return
        if self._refusal is not None:
            if handshake.head_end(self._head_tail, data) < 0:
                self._head_tail = (self._head_tail + data)[-3:]
            else:
                self._send_refusal()
            return
        head, self._head_tail, early = handshake.cut_head(self._head_tail, data)
        if early is not None:
            self._early = early  # parsed once the request is answered (_respond)
        self._receive(head)

    def _feed(self, data: bytes) -> None:
        """Parse data READ_SLICE bytes at a time, each slice's frames answered and charged
        before the next is parsed: a flood is then stopped within a slice, not after the
        whole read (43,000 empty frames in 256 KiB). Stops once nothing more is to be parsed
        (the connection failed, or the client's close frame came: websockets discards the
        rest), and keeps the rest for later while reading is paused behind a resume."""
        protocol = self.protocol
        inbox = self._inbox
        for start in range(0, len(data), READ_SLICE):
            if protocol.eof_sent:
                return
            if inbox.held:
                inbox.keep(data[start:])
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
        self.flush()  # pongs, the echo of a close frame, a refused request
        self._expect_close()
        if self._open and self.backed_up():
            self._handler.backed_up(self)  # a ping flood it does not read the answers to
        for event in events:
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Request):  # a server receives no Response
                self._request(event)

    def eof_received(self) -> bool | None:
        if self._refusal is not None:  # the request ended unfinished: answered all the same
            self._send_refusal()
            return None
        if self.protocol.state is CONNECTING and self._answering is not None:
            # An HTTP answer being prepared: the client ended only its side, the answer
            # still goes out (_respond then ends the connection).
            return True
        self.protocol.receive_eof()
        self._left_open()
        self.flush()
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
        # connections in memory, then stall every client while walking them. (The inbox
        # and the heartbeat hold no reference to the connection; their task and timer,
        # which do, are cancelled above.)
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

    def flush(self) -> None:
        """Write what the protocol produced (pongs, pings, a close frame, an answer)."""
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
            self._answering = self.loop.create_task(self._respond_later(answer))

    async def _respond_later(self, answer: Coroutine[Any, Any, Response]) -> None:
        try:
            response = await answer
        except Exception:
            log.exception("HTTP endpoint failed")
            response = self.protocol.reject(500, "internal error\n")
        self._answering = None
        self._respond(response)

    def _respond(self, response: Response) -> None:
        if self.protocol.state is not CONNECTING:
            return  # the client left meanwhile
        response.headers["Server"] = self._options.server_header
        self.protocol.send_response(response)
        if self.protocol.state is not OPEN:
            self._early = None
            self.flush()
            self.transport.close()  # an HTTP answer or a refusal: sent, then the socket ends
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.conversation = conversation = self._handler.opened(self)
        self._open = True
        # The 101 and the greeting in one write: one system call, one read for the client.
        self.transport.write(b"".join(self.protocol.data_to_send()) + conversation.greeting())
        self._heartbeat.start(self)
        if self._early is not None:  # frames sent right behind the request
            early, self._early = self._early, None
            self.data_received(early)

    # Frames of an open connection

    def _frame(self, frame: Frame) -> None:
        """Hand a message to the inbox, and charge the conversation for every other frame
        but the answer to our ping and the close: parsing a frame costs about as much as
        answering a small message, so a flood of any kind of frame is a flood of messages."""
        opcode = frame.opcode
        if opcode is Opcode.PING:  # answered by the protocol itself (flushed above)
            self._inbox.charge(self, "ping")
        elif opcode is Opcode.PONG:
            if not self._heartbeat.answered(self, frame.data):
                self._inbox.charge(self, "pong")
        elif opcode is not Opcode.CLOSE:  # a close is echoed by the protocol (flushed above)
            self._inbox.receive(self, frame)


def _release_parser(protocol: ServerProtocol) -> None:
    """Break the cycles websockets' protocol is left in at the end of a connection.

    Its parser is a generator suspended in a frame that refers to the protocol, and the
    exception that ended parsing, if any, holds such frames in its traceback: parser_exc,
    or, for a connection that ended before its handshake did (no request, half a request,
    a request refused), handshake_exc and the errors it was raised from.
    """
    protocol.parser.close()
    pending: list[BaseException | None] = [protocol.parser_exc, protocol.handshake_exc]
    seen: set[int] = set()
    while pending:
        ended = pending.pop()
        if ended is not None and id(ended) not in seen:
            seen.add(id(ended))
            traceback.clear_frames(ended.__traceback__)
            pending += (ended.__cause__, ended.__context__)
