"""Tests of shared.envelope: the wire format shared by the indexer, Redis and browsers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from shared.envelope import EventEnvelope, WireEnvelope, event_id, normalize_timestamp
from shared.errors import EnvelopeError

TX = "0x" + "ab" * 32
BLOCK_HASH = "0x" + "cd" * 32
MARKET = "0x" + "12" * 20
WIRE_KEYS = [
    "type",
    "eventType",
    "id",
    "seq",
    "chainId",
    "contract",
    "contractKind",
    "marketAddress",
    "blockNumber",
    "blockHash",
    "transactionHash",
    "logIndex",
    "timestamp",
    "args",
    "data",
    "removed",
]


def wire(**changes: Any) -> dict[str, Any]:
    """Return a valid envelope as the JSON object the indexer sends, with changes applied."""
    args = {
        "marketAddress": MARKET,
        "question": "Will it rain?",
        "amount": "1000000000000000000000",
        "outcome": "1",
    }
    envelope = {
        "type": "MarketCreated",
        "eventType": "MarketCreated",
        "id": f"32323:{TX}:7",
        "seq": 42,
        "chainId": 32323,
        "contract": MARKET,
        "contractKind": "factory",
        "marketAddress": MARKET,
        "blockNumber": 2587591,
        "blockHash": BLOCK_HASH,
        "transactionHash": TX,
        "logIndex": 7,
        "timestamp": "2025-11-06T12:00:00Z",
        "args": args,
        "data": args,
        "removed": False,
    }
    envelope.update(changes)
    if "type" in changes and "eventType" not in changes:
        envelope["eventType"] = changes["type"]
    return envelope


def encode(envelope: dict[str, Any]) -> bytes:
    """Encode with the standard library, which (unlike orjson) accepts any integer and str()."""
    return json.dumps(envelope, default=str).encode()


def test_round_trip() -> None:
    """to_json_bytes and from_json_bytes are inverse."""
    envelope = EventEnvelope.model_validate(wire())
    assert EventEnvelope.from_json_bytes(envelope.to_json_bytes()) == envelope


def test_json_has_exactly_the_camel_case_keys() -> None:
    """The JSON object has exactly the documented camelCase keys, compactly encoded."""
    raw = EventEnvelope.model_validate(wire()).to_json_bytes()
    assert list(orjson.loads(raw)) == WIRE_KEYS
    assert b": " not in raw
    assert b", " not in raw.replace(b"Will it rain?", b"")
    assert orjson.loads(raw) == wire()


def test_built_from_python_names() -> None:
    """The indexer may build an envelope with snake_case names and omit derived fields."""
    envelope = EventEnvelope(
        type="BetPlaced",
        chain_id=32323,
        contract=MARKET,
        contract_kind="market",
        market_address=MARKET,
        block_number=1,
        block_hash=BLOCK_HASH,
        transaction_hash=TX,
        log_index=0,
        timestamp=normalize_timestamp(1762430400),
        args={"bettor": MARKET},
    )
    assert envelope.event_type == "BetPlaced"
    assert envelope.id == event_id(32323, TX, 0) == f"32323:{TX}:0"
    assert envelope.data == envelope.args
    assert envelope.seq is None
    assert envelope.removed is False


def test_event_type_always_equals_type() -> None:
    """eventType is filled from type when omitted, and a different eventType is rejected."""
    omitted = wire()
    del omitted["eventType"]
    assert EventEnvelope.model_validate(omitted).event_type == "MarketCreated"
    with pytest.raises(EnvelopeError, match="eventType must equal type"):
        EventEnvelope.from_json_bytes(orjson.dumps(wire(eventType="BetPlaced")))


def test_id_must_match_its_parts() -> None:
    """An id that is not chainId:transactionHash:logIndex is rejected."""
    with pytest.raises(EnvelopeError, match="id must be"):
        EventEnvelope.from_json_bytes(orjson.dumps(wire(id=f"32323:{TX}:8")))


def test_event_id_lowercases_the_hash() -> None:
    """event_id uses the lowercase transaction hash, as envelopes do."""
    assert event_id(1, TX.upper().replace("0X", "0x"), 3) == f"1:{TX}:3"


def test_as_removed_copies() -> None:
    """as_removed returns a removed copy and leaves the original alone."""
    envelope = EventEnvelope.model_validate(wire())
    removed = envelope.as_removed()
    assert removed.removed is True
    assert envelope.removed is False
    assert removed.model_copy(update={"removed": False}) == envelope


def test_envelope_is_frozen() -> None:
    """Envelope fields cannot be reassigned."""
    envelope = EventEnvelope.model_validate(wire())
    with pytest.raises(ValueError, match="frozen"):
        envelope.seq = 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-11-06T12:00:00Z", "2025-11-06T12:00:00Z"),
        ("2025-11-06T14:00:00+02:00", "2025-11-06T12:00:00Z"),
        ("2025-11-06T12:00:00.000Z", "2025-11-06T12:00:00Z"),
        (1762430400, "2025-11-06T12:00:00Z"),
        (0, "1970-01-01T00:00:00Z"),
        (datetime(2025, 11, 6, 12, tzinfo=UTC), "2025-11-06T12:00:00Z"),
        (datetime(2025, 11, 6, 7, tzinfo=timezone(timedelta(hours=-5))), "2025-11-06T12:00:00Z"),
    ],
)
def test_timestamp_is_normalized(value: object, expected: str) -> None:
    """Timestamps given as ISO text, Unix seconds or aware datetimes become ...Z strings."""
    assert EventEnvelope.model_validate(wire(timestamp=value)).timestamp == expected


@pytest.mark.parametrize(
    "value",
    [
        "2025-11-06T12:00:00",
        datetime(2025, 11, 6, 12),  # naive: no time zone
        "2025-11-06T12:00:00.5Z",
        "yesterday",
        "2025-13-01T00:00:00Z",
        1.5,
        True,
        10**20,
        None,
    ],
)
def test_bad_timestamps_are_rejected(value: object) -> None:
    """Timestamps without a zone, with fractions, out of range or of other types fail."""
    with pytest.raises(EnvelopeError, match="timestamp"):
        EventEnvelope.from_json_bytes(encode(wire(timestamp=value)))


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"type": "bet_placed"}, "type"),
        ({"type": ""}, "type"),
        ({"seq": 0}, "seq"),
        ({"chainId": "32323", "id": f"32323:{TX}:7"}, "chainId"),
        ({"contract": "0x" + "AB" * 20}, "contract"),
        ({"contract": "0x1234"}, "contract"),
        ({"contractKind": "token"}, "contractKind"),
        ({"marketAddress": "market"}, "marketAddress"),
        ({"blockNumber": -1}, "blockNumber"),
        ({"blockHash": "0x" + "cd" * 31}, "blockHash"),
        ({"logIndex": True}, "logIndex"),
        ({"args": {"amount": 10**21}}, "args"),
        ({"args": {"ratio": 0.5}}, "args"),
        ({"args": ["not", "a", "dict"]}, "args"),
        ({"data": {"nested": [{"n": 1}]}}, "data"),
        ({"removed": "false"}, "removed"),
    ],
)
def test_invalid_fields_are_rejected(changes: dict[str, Any], where: str) -> None:
    """Each malformed field fails with an EnvelopeError that names the field."""
    with pytest.raises(EnvelopeError, match=f"invalid event envelope: {where}"):
        EventEnvelope.from_json_bytes(encode(wire(**changes)))


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'"MarketCreated"', b"\xff\xfe"])
def test_non_objects_are_rejected(raw: bytes) -> None:
    """Bytes that are not a JSON object fail with EnvelopeError."""
    with pytest.raises(EnvelopeError, match="invalid event envelope"):
        EventEnvelope.from_json_bytes(raw)


def test_missing_fields_are_rejected() -> None:
    """A JSON object missing required fields fails, and the error counts the others."""
    with pytest.raises(EnvelopeError, match=r"and \d+ more"):
        EventEnvelope.from_json_bytes(b"{}")


def test_error_does_not_quote_the_input() -> None:
    """The EnvelopeError message names the field but does not repeat the bad value."""
    with pytest.raises(EnvelopeError) as caught:
        EventEnvelope.from_json_bytes(orjson.dumps(wire(contractKind="x" * 50)))
    assert "x" * 50 not in str(caught.value)


def test_unknown_keys_are_ignored() -> None:
    """Keys a newer indexer may add are dropped, so an older broadcaster keeps relaying."""
    envelope = EventEnvelope.from_json_bytes(orjson.dumps(wire(newField=1)))
    assert "newField" not in orjson.loads(envelope.to_json_bytes())


def test_data_must_equal_args() -> None:
    """`data` is `args` again (the deployed frontend reads `data`): another content would
    give browsers what the documented `args` do not say. With `transactionHash` added it is
    relayed as it is (a later indexer may add it for the frontend's de-duplication)."""
    args = wire()["args"]
    added = {**args, "transactionHash": TX}
    assert WireEnvelope.from_json_bytes(encode(wire(data=added))).data == added
    for data in (
        {"question": "Something else?"},
        {**added, "question": "Something else?"},
        {**args, "transactionHash": "0x" + "cd" * 32},  # not the envelope's
    ):
        with pytest.raises(EnvelopeError, match="data must equal args"):
            EventEnvelope.from_json_bytes(encode(wire(data=data)))


@pytest.mark.parametrize(
    ("changes", "valid"),
    [
        ({}, True),  # a factory's event: its marketAddress argument
        ({"marketAddress": "0x" + "34" * 20}, False),
        ({"marketAddress": None}, False),
        ({"contractKind": "market", "contract": MARKET}, True),  # a market's: the emitter
        ({"contractKind": "market", "contract": "0x" + "34" * 20}, False),
        ({"type": "FactoryPaused", "args": {}, "data": {}, "marketAddress": None}, True),
        ({"type": "FactoryPaused", "args": {}, "data": {}}, False),
    ],
)
def test_market_address_is_the_market_the_event_concerns(
    changes: dict[str, Any], valid: bool
) -> None:
    """The market channel follows marketAddress, so it must be the event's own market: the
    emitter for a market's events, else its marketAddress or market argument, else null."""
    raw = encode(wire(**changes))
    if valid:
        EventEnvelope.from_json_bytes(raw)
    else:
        with pytest.raises(EnvelopeError, match="marketAddress must be"):
            EventEnvelope.from_json_bytes(raw)


def test_args_allow_json_safe_nesting() -> None:
    """args may nest strings, booleans, nulls, lists and objects."""
    args = {"marketAddress": MARKET, "ids": ["1", "2"], "flags": {"ok": True, "note": None}}
    envelope = EventEnvelope.model_validate(wire(args=args, data=args))
    assert orjson.loads(envelope.to_json_bytes())["args"] == args
