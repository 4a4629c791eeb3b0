"""The wire format: client messages parsed strictly, server messages and frames encoded once."""

from __future__ import annotations

import contextlib
import secrets
import sys

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import TEXT, Frame
from websockets.streams import StreamReader

from broadcaster import messages
from broadcaster.errors import ClientError

MARKET = "0x31d2bc49a6fd4a066f5f8ac61acd0e6c9105dd84"


def test_parse_valid_messages() -> None:
    """subscribe, unsubscribe (with normalized channel) and ping parse to their types."""
    assert messages.parse_client_message('{"type":"ping"}') == messages.Ping()
    assert messages.parse_client_message(
        '{"type":"subscribe","channel":"market:0x31D2BC49A6FD4A066F5F8AC61ACD0E6C9105DD84"}'
    ) == messages.Subscribe("market:" + MARKET)
    assert messages.parse_client_message(
        b'{"type":"subscribe","channel":"events:*","since":42}'
    ) == messages.Subscribe("events:*", 42)
    assert messages.parse_client_message(
        '{"type":"unsubscribe","channel":"events:bet_placed","extra":1}'
    ) == messages.Unsubscribe("events:bet_placed")


def test_channel_names_are_not_interned() -> None:
    """A parsed channel name is a string of its own, not one put among the interpreter's
    interned strings: those are never freed on CPython 3.12.0-3.12.5, so every distinct name
    a client sent would stay in memory for good. (The connections subscribed to one channel
    share routing's string instead: test_routing, test_delivery.)"""
    address = secrets.token_hex(20)
    parsed = messages.parse_client_message(
        orjson.dumps({"type": "subscribe", "channel": f"market:0x{address.upper()}"})
    )
    assert isinstance(parsed, messages.Subscribe)
    probe = "".join(["market:0x", address])  # equal to the name, another object
    assert parsed.channel == probe
    assert sys.intern(probe) is not parsed.channel


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{", "invalid_json"),
        ("", "invalid_json"),
        ("[1]", "invalid_message"),
        ('"ping"', "invalid_message"),
        ("{}", "invalid_message"),
        ('{"type":5}', "invalid_message"),
        ('{"type":"hello"}', "unknown_type"),
        ('{"type":"subscribe"}', "invalid_channel"),
        ('{"type":"subscribe","channel":"foo:bar"}', "invalid_channel"),
        ('{"type":"subscribe","channel":"events:' + "a" * 130 + '"}', "invalid_channel"),
        ('{"type":"subscribe","channel":"events:*","since":-1}', "invalid_since"),
        ('{"type":"subscribe","channel":"events:*","since":"3"}', "invalid_since"),
        ('{"type":"subscribe","channel":"events:*","since":true}', "invalid_since"),
        ('{"type":"subscribe","channel":"events:*","since":1.5}', "invalid_since"),
        ('{"type":"unsubscribe","channel":7}', "invalid_channel"),
    ],
)
def test_parse_errors(text: str, code: str) -> None:
    """Every malformed message is a ClientError with a stable code."""
    with pytest.raises(ClientError) as caught:
        messages.parse_client_message(text)
    assert caught.value.code == code


def test_json_that_orjson_alone_refuses_is_still_json() -> None:
    """RFC 8259 allows any \\uXXXX escape: JSON.stringify writes half an emoji as a lone
    surrogate, and a 20-digit number is a number. Unknown fields carrying them are ignored;
    a channel holding one is an invalid channel, not invalid JSON."""
    ping = '{"type":"ping","note":"\\ud83d"}'
    assert messages.parse_client_message(ping) == messages.Ping()
    subscribe = (
        '{"type":"subscribe","channel":"events:*","tag":"a\\udc00","n":123456789012345678901}'
    )
    assert messages.parse_client_message(subscribe) == messages.Subscribe("events:*")
    for text, code in [
        ('{"type":"subscribe","channel":"events:\\udc00"}', "invalid_channel"),
        (
            '{"type":"subscribe","channel":"events:*","since":123456789012345678901}',
            "invalid_since",
        ),
        ('{"type":"ping","x":NaN}', "invalid_json"),  # not JSON, whatever Python's json takes
        ('{"type":"ping","x":Infinity}', "invalid_json"),
    ]:
        with pytest.raises(ClientError) as caught:
            messages.parse_client_message(text)
        assert caught.value.code == code, text


def test_error_messages_never_quote_the_input() -> None:
    """What a client sent never appears in the error text (it may be hostile, it is logged)."""
    secret = "events:<script>"
    with pytest.raises(ClientError) as caught:
        messages.parse_client_message(orjson.dumps({"type": "subscribe", "channel": secret}))
    assert "script" not in caught.value.message


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_parsing_arbitrary_input_only_raises_client_error(data: str | bytes) -> None:
    """Any input parses or raises ClientError, nothing else."""
    with contextlib.suppress(ClientError):
        messages.parse_client_message(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    kind=st.sampled_from(["subscribe", "unsubscribe", "ping", "pong", ""]),
    channel=json_values | st.sampled_from(["events:*", "market:0x", "*", "market:" + MARKET]),
    since=json_values,
)
def test_parsing_arbitrary_json_only_raises_client_error(
    kind: str, channel: object, since: object
) -> None:
    """Any JSON object parses or raises ClientError, nothing else."""
    with contextlib.suppress(ClientError, orjson.JSONEncodeError):
        messages.parse_client_message(
            orjson.dumps({"type": kind, "channel": channel, "since": since})
        )


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_text_frame_is_what_websockets_parses(size: int) -> None:
    """Our pre-built frames parse as one final text frame carrying the payload."""
    payload = b"x" * size
    reader = StreamReader()
    reader.feed_data(messages.text_frame(payload))
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
        raise AssertionError("frame incomplete")
    except StopIteration as done:
        frame = done.value
    assert frame.opcode == TEXT
    assert frame.fin
    assert frame.data == payload


def test_event_message_wraps_envelope_bytes() -> None:
    """An event message is valid JSON with the envelope under data and the seq on top."""
    envelope = b'{"type":"BetPlaced","seq":7}'
    decoded = orjson.loads(messages.event("events:bet_placed", 7, envelope, 1234))
    assert decoded == {
        "type": "event",
        "channel": "events:bet_placed",
        "seq": 7,
        "data": {"type": "BetPlaced", "seq": 7},
        "timestamp": 1234,
    }


def test_acks_and_errors() -> None:
    """Acks carry channel and timestamp; resume acks say recovered; errors carry a code."""
    assert orjson.loads(
        messages.subscribed("events:*", 5, seq=9, recovered=None, replayed=None)
    ) == {"type": "subscribed", "channel": "events:*", "timestamp": 5, "seq": 9}
    assert orjson.loads(messages.subscribed("events:*", 5, seq=9, recovered=False, replayed=3)) == {
        "type": "subscribed",
        "channel": "events:*",
        "timestamp": 5,
        "seq": 9,
        "recovered": False,
        "replayed": 3,
    }
    assert orjson.loads(messages.error(ClientError("x", "why", channel="c"), 1)) == {
        "type": "error",
        "code": "x",
        "message": "why",
        "channel": "c",
        "timestamp": 1,
    }
