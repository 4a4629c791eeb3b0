"""Stream entries are validated before relaying; history answers resumes from memory."""

from __future__ import annotations

import orjson
import pytest

from broadcaster.errors import InvalidEntry
from broadcaster.events import History, entry_seq, parse_entry
from shared.channels import channels_for
from tests.broadcaster.support import MARKET, envelope


def fields(number: int, **changes: bytes) -> dict[bytes, bytes]:
    seq = number
    env = envelope(seq)
    channels = " ".join(channels_for(env.type, env.contract_kind, env.market_address))
    base = {
        b"seq": str(seq).encode(),
        b"channels": channels.encode(),
        b"event": env.to_json_bytes(),
    }
    base.update({key.encode(): value for key, value in changes.items()})
    return base


def test_valid_entry() -> None:
    """A well-formed entry becomes an Event with its channels and untouched envelope bytes."""
    entry = fields(3)
    event = parse_entry(b"3-0", entry)
    assert event.seq == 3
    assert event.channels == ("events:bet_placed", "market:" + MARKET)
    assert event.envelope == entry[b"event"]
    frame = event.frame("events:bet_placed", 99)
    assert event.frame("events:bet_placed", 100) is frame  # encoded once


def test_an_event_keeps_the_time_it_was_first_relayed_on_every_channel() -> None:
    """Its frame on a channel built later (a replay from memory on another channel) still
    says when the event was first relayed, as documented."""
    event = parse_entry(b"3-0", fields(3))
    first = event.frame("events:bet_placed", 1_000)
    later = event.frame("market:" + MARKET, 2_500)
    stamps = [orjson.loads(f[f.index(b"{") :])["timestamp"] for f in (first, later)]
    assert stamps == [1_000, 1_000]


def test_channels_field_is_optional() -> None:
    """Without a channels field the channels are derived from the envelope."""
    entry = fields(3)
    del entry[b"channels"]
    assert parse_entry(b"3-0", entry).channels == ("events:bet_placed", "market:" + MARKET)


def _with(seq: int, **changes: object) -> bytes:
    """The envelope of seq with some wire fields replaced."""
    return orjson.dumps({**orjson.loads(envelope(seq).to_json_bytes()), **changes})


def test_a_question_naming_nan_or_infinity_is_valid() -> None:
    """Only the bare JSON tokens are refused, not the words inside a string."""
    question = {"question": "NaN or Infinity?", "category": "x"}
    event = parse_entry(b"3-0", fields(3, event=_with(3, args=question, data=question)))
    assert orjson.loads(event.envelope)["data"] == question


@pytest.mark.parametrize(
    ("entry_id", "entry"),
    [
        (b"3-1", fields(3)),
        (b"x-0", fields(3)),
        (b"0-0", fields(0 + 1)),
        (b"3-0", fields(3, seq=b"4")),
        (b"3-0", {b"seq": b"3", b"channels": b"events:bet_placed"}),
        (b"3-0", fields(3, event=b"{not json")),
        (b"3-0", fields(3, event=orjson.dumps({"type": "BetPlaced"}))),
        (b"4-0", {**fields(3), b"seq": b"4"}),
        (b"3-0", fields(3, channels=b"events:*")),
        (b"3-0", fields(3, channels=b"nonsense")),
        (b"3-0", fields(3, event=_with(3, timestamp="2024-02-30T00:00:00Z"))),
        (b"3-0", fields(3, event=_with(3, timestamp="0000-01-01T00:00:00Z"))),
        (b"3-0", fields(3, event=_with(3, timestamp="2024-01-01T24:00:00Z"))),
        (b"3-0", fields(3, event=envelope(3).to_json_bytes()[:-1] + b',"extra":NaN}')),
        (b"3-0", fields(3, event=envelope(3).to_json_bytes()[:-1] + b',"x":-Infinity}')),
        # Channels, data and marketAddress other than the envelope's own: relayed, they
        # reached the subscribers of another market's channel, or other content than args.
        (b"3-0", fields(3, channels=b"events:market_created")),
        (b"3-0", fields(3, channels=b"events:bet_placed")),
        (b"3-0", fields(3, channels=b"events:bet_placed market:0x" + b"12" * 20)),
        (b"3-0", fields(3, event=_with(3, data={"amount": "1"}))),
        (b"3-0", fields(3, event=_with(3, marketAddress=None))),
        (b"3-0", fields(3, event=_with(3, marketAddress="0x" + "12" * 20))),
        (b"3-0", fields(3, event=_with(3, marketAddress="0x" + "12" * 20), channels=b"")),
    ],
)
def test_invalid_entries(entry_id: bytes, entry: dict[bytes, bytes]) -> None:
    """Bad IDs, mismatched seqs, invalid envelopes (impossible dates, JSON that browsers
    cannot parse: NaN, Infinity, a market or data other than the event's), bad channels and
    channels other than the envelope's are refused."""
    with pytest.raises(InvalidEntry):
        parse_entry(entry_id, entry)


def _reshaped(change: str) -> bytes:
    """The envelope of fields(3) in a shape EventEnvelope accepts but browsers cannot read."""
    wire = orjson.loads(envelope(3).to_json_bytes())
    if change == "snake_case":
        wire["market_address"] = wire.pop("marketAddress")
    elif change == "unix_time":
        wire["timestamp"] = 1762430400
    elif change == "offset_time":
        wire["timestamp"] = "2025-11-06T13:00:00+01:00"
    else:
        del wire[change]
    return orjson.dumps(wire)


@pytest.mark.parametrize(
    "change", ["snake_case", "unix_time", "offset_time", "data", "eventType", "id"]
)
def test_envelopes_are_relayed_only_in_the_wire_form(change: str) -> None:
    """The envelope's bytes go to browsers as they are, so only the documented form passes:
    another field name, a timestamp to normalize or a field to fill in is refused."""
    with pytest.raises(InvalidEntry):
        parse_entry(b"3-0", fields(3, event=_reshaped(change)))


def test_channels_are_validated_once_per_distinct_field() -> None:
    """A channels field seen before gives the same channels; a bad one is refused each time."""
    first = parse_entry(b"3-0", fields(3, channels=b"events:bet_placed market:" + MARKET.encode()))
    again = parse_entry(b"4-0", fields(4, channels=b"events:bet_placed market:" + MARKET.encode()))
    assert again.channels == first.channels == ("events:bet_placed", "market:" + MARKET)
    for seq in (5, 6):
        with pytest.raises(InvalidEntry):
            parse_entry(f"{seq}-0".encode(), fields(seq, channels=b"events:bet_placed market:x"))


def test_entry_seq() -> None:
    """Entry IDs are <seq>-0."""
    assert entry_seq(b"12-0") == 12
    with pytest.raises(InvalidEntry):
        entry_seq("12")


def test_history_keeps_a_consecutive_run() -> None:
    """History covers a consecutive range and starts over after a gap."""
    history = History(3)
    for seq in (1, 2, 3, 4):
        history.append(seq, None)
    assert history.covers(1, 4)
    assert not history.covers(0, 4)
    assert [seq for seq, _ in history.between(2, 4)] == [3, 4]
    assert history.covers(4, 4)
    history.append(6, None)
    assert len(history) == 1
    assert not history.covers(4, 6)
    assert history.covers(5, 6)
    assert not History(0).covers(0, 1)
