"""The client protocol on the wire: parsing what browsers send, encoding what they receive.

Pure functions over bytes and plain values (docs/broadcaster.md is the reference for frontend
developers). Server messages are compact JSON encoded with orjson; events reuse the envelope
bytes from the stream untouched, so an event is encoded once however many clients get it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import orjson

from broadcaster.errors import ClientError
from shared.channels import validate_channel
from shared.errors import ChannelError

__all__ = [
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_SERVICE_RESTART",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_STREAM_GAP",
    "CLOSE_UNSUPPORTED_DATA",
    "ClientMessage",
    "Ping",
    "Subscribe",
    "Unsubscribe",
    "connected",
    "error",
    "event",
    "parse_client_message",
    "pong",
    "subscribed",
    "text_frame",
    "unsubscribed",
]

# Close codes this service chooses (the connection also closes with 1009 for oversized
# messages, 1007 for invalid UTF-8, 1002 for protocol errors, 1011 when a ping goes unanswered).
CLOSE_UNSUPPORTED_DATA = 1003  # a binary frame: the protocol is JSON text only
CLOSE_POLICY_VIOLATION = 1008  # repeated invalid messages, flooding, too many connections
CLOSE_SERVICE_RESTART = 1012  # graceful stop: reconnect and resume with "since"
# Private-use codes (4000-4999, RFC 6455 section 7.4.2):
CLOSE_SLOW_CONSUMER = 4008  # the client did not read fast enough: reconnect, resume with since
CLOSE_STREAM_GAP = 4009  # the server itself missed events: reconnect, resume (recovered=false)

# Larger since values cannot be a seq the indexer assigned (Postgres bigint).
MAX_SEQ = 2**63 - 1
_FIN_TEXT = 0x81
_SMALL = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LARGE = struct.Struct("!BBQ")


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Subscribe to a channel or pattern; with `since`, replay what came after that seq."""

    channel: str
    since: int | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop receiving a channel or pattern."""

    channel: str


@dataclass(frozen=True, slots=True)
class Ping:
    """Application-level ping; answered with a pong."""


ClientMessage = Subscribe | Unsubscribe | Ping


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse one text message from a client, or raise ClientError saying what is wrong."""
    obj = _loads(text)
    if not isinstance(obj, dict):
        raise ClientError("invalid_message", "message must be a JSON object")
    kind = obj.get("type")
    if kind == "ping":
        return Ping()
    if kind == "subscribe":
        return Subscribe(_channel(obj), _since(obj.get("since")))
    if kind == "unsubscribe":
        return Unsubscribe(_channel(obj))
    if not isinstance(kind, str):
        raise ClientError("invalid_message", 'message needs a "type" string')
    raise ClientError("unknown_type", "unknown type; expected subscribe, unsubscribe or ping")


def _loads(text: str | bytes) -> object:
    """The JSON value of a message. orjson refuses some JSON that RFC 8259 allows, and that
    JSON.stringify writes: a lone surrogate escape (half an emoji, "\\ud83d") and integers
    past 64 bits. Python's json reads those (only for such rare messages, at its slower pace),
    NaN and Infinity excepted, which are not JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, too many digits
        raise ClientError("invalid_json", "message is not valid JSON") from None


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


def _channel(obj: dict[str, object]) -> str:
    """The channel in normal form. Not interned: interned strings are never freed on CPython
    3.12.0-3.12.5 (gh-113993), so every distinct name clients sent would stay in memory;
    the connections subscribed to one channel share routing's string instead (Hub.route)."""
    try:
        return validate_channel(obj.get("channel"))
    except ChannelError as exc:
        raise ClientError("invalid_channel", str(exc)) from None


def _since(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise ClientError(
            "invalid_since", "since must be a non-negative integer: the seq of the last event"
        )
    return value


def connected(client_id: str, now_ms: int, seq: int | None) -> bytes:
    """The greeting; `seq` is the newest event seq the server knows (resume point)."""
    body = {"type": "connected", "clientId": client_id, "timestamp": now_ms, "seq": seq}
    return orjson.dumps(body)


def subscribed(
    channel: str, now_ms: int, *, seq: int | None, recovered: bool | None, replayed: int | None
) -> bytes:
    """The subscribe ack; `recovered` and `replayed` only answer a subscribe with since."""
    body: dict[str, object] = {"type": "subscribed", "channel": channel, "timestamp": now_ms}
    body["seq"] = seq
    if recovered is not None:
        body["recovered"] = recovered
        body["replayed"] = replayed
    return orjson.dumps(body)


def unsubscribed(channel: str, now_ms: int) -> bytes:
    return orjson.dumps({"type": "unsubscribed", "channel": channel, "timestamp": now_ms})


def pong(now_ms: int) -> bytes:
    return orjson.dumps({"type": "pong", "timestamp": now_ms})


def error(problem: ClientError, now_ms: int) -> bytes:
    body: dict[str, object] = {"type": "error", "code": problem.code, "message": problem.message}
    if problem.channel is not None:
        body["channel"] = problem.channel
    body["timestamp"] = now_ms
    return orjson.dumps(body)


def event(channel: str, seq: int, envelope: bytes, now_ms: int) -> bytes:
    """An event message around envelope JSON that was validated already (not re-encoded)."""
    return b"".join(
        (
            b'{"type":"event","channel":',
            orjson.dumps(channel),
            b',"seq":',
            str(seq).encode(),
            b',"data":',
            envelope,
            b',"timestamp":',
            str(now_ms).encode(),
            b"}",
        )
    )


def text_frame(payload: bytes) -> bytes:
    """One unmasked, uncompressed, final WebSocket text frame (RFC 6455 section 5.2).

    A server never masks, and the server negotiates no compression, so these bytes are the
    same for every client: an event is framed once and written to each socket as is.
    """
    length = len(payload)
    if length < 126:
        header = _SMALL.pack(_FIN_TEXT, length)
    elif length < 65536:
        header = _MEDIUM.pack(_FIN_TEXT, 126, length)
    else:
        header = _LARGE.pack(_FIN_TEXT, 127, length)
    return header + payload
