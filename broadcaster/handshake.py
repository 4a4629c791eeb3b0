"""The opening handshake's plain parts: where the request's head ends, and the 101 answer.

connection.Connection drives the handshake (it owns the socket and the protocol's state);
these functions only compute, over bytes and websockets' protocol object.
"""

from __future__ import annotations

import email.utils
import functools
import time

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

__all__ = ["accept", "cut_head"]


def cut_head(tail: bytes, data: bytes) -> tuple[bytes, bytes, bytes | None]:
    """Split a read at the end of the request's head: (what to parse now, the new tail,
    what came after the head or None), given `tail`, the last bytes of the head read so far.

    What follows the head waits until the request is answered. websockets would parse it as
    frames at once, before the answer: a ping's pong would go out ahead of the 101, and the
    bytes after an HTTP request (a pipelined one) would fail the connection before its answer.
    """
    cut = head_end(tail, data)
    if cut < 0:
        return data, (tail + data)[-3:], None
    return data[:cut], b"", data[cut:] if cut < len(data) else None


def head_end(tail: bytes, data: bytes) -> int:
    """Where in `data` the request's head ends (just past its blank line), or -1 if it does
    not, given `tail`, the last (up to 3) bytes of the head read before `data`."""
    end = (tail + data).find(b"\r\n\r\n")
    return end if end < 0 else end + 4 - len(tail)


def accept(protocol: ServerProtocol, request: Request) -> Response:
    """The 101 answer to a valid handshake request, or websockets' refusal of another.

    websockets checks the request (`process_request`); the 101 is built here only to
    date it from a clock read once a second (`ServerProtocol.accept` formats the date
    for every connection, a tenth of a connect storm's Python time).
    """
    try:
        accept_header, extensions_header, protocol_header = protocol.process_request(request)
    except Exception:
        refusal = protocol.accept(request)  # checks again and builds the fitting refusal
        _drop_tracebacks(protocol.handshake_exc)
        return refusal
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


def _drop_tracebacks(refused: BaseException | None) -> None:
    """Let a refusal's errors (kept by the protocol and the request: handshake_exc, and the
    errors it was raised from) go of their tracebacks. Their frames link to their callers'
    (f_back), up to the one that holds the connection: a cycle that only the cycle collector
    would free, for every refused request (a plain GET of the WebSocket path, a bad key).
    The error itself, all the connection reads of it, stays."""
    seen: set[int] = set()
    pending = [refused]
    while pending:
        error = pending.pop()
        if error is not None and id(error) not in seen:
            seen.add(id(error))
            error.__traceback__ = None
            pending += (error.__cause__, error.__context__)


def _http_date() -> str:
    """The HTTP Date header's value, formatted once per second."""
    return _formatted_date(int(time.time()))


@functools.lru_cache(maxsize=1)
def _formatted_date(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)
