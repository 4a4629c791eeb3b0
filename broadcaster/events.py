"""Events as the broadcaster holds them: validated stream entries, framed once per channel.

A stream entry crosses a process boundary, so parse_entry() checks it completely (docs/
protocol.md): entry ID `<seq>-0`, a `seq` field equal to it, an `event` field that is a valid
envelope carrying the same seq, and concrete channel names. History keeps the newest events,
consecutive by seq, so that most resumes never read Redis.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice, takewhile

from broadcaster import messages
from broadcaster.errors import InvalidEntry
from shared.channels import channels_for, is_pattern, validate_channel
from shared.envelope import EventEnvelope, WireEnvelope
from shared.errors import ChannelError, EnvelopeError

__all__ = ["Event", "History", "entry_seq", "parse_entry"]


@dataclass(slots=True, eq=False)
class Event:
    """One event to relay: its seq, channels, envelope bytes, and its frames once built."""

    seq: int
    channels: tuple[str, ...]
    envelope: bytes
    block_time: float
    frames: dict[str, bytes] = field(default_factory=dict)
    relayed_ms: int = 0  # when first framed: every frame's timestamp, whatever its channel

    def frame(self, channel: str, now_ms: int) -> bytes:
        """The WebSocket frame of this event on one channel, encoded on first use only."""
        framed = self.frames.get(channel)
        if framed is None:
            if not self.relayed_ms:
                self.relayed_ms = now_ms
            payload = messages.event(channel, self.seq, self.envelope, self.relayed_ms)
            framed = self.frames[channel] = messages.text_frame(payload)
        return framed

    @property
    def size(self) -> int:
        """Approximate bytes this event adds to a client's send queue."""
        return len(self.envelope) + 128


def entry_seq(entry_id: bytes | str) -> int:
    """The seq of a stream entry ID `<seq>-0`; raise InvalidEntry for any other shape."""
    text = entry_id.decode("ascii", "replace") if isinstance(entry_id, bytes) else entry_id
    head, sep, tail = text.partition("-")
    if not sep or tail != "0" or not head.isdigit() or int(head) < 1:
        raise InvalidEntry(text[:40], "entry ID is not <seq>-0")
    return int(head)


def parse_entry(entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> Event:
    """Validate one stream entry and return it as an Event, or raise InvalidEntry."""
    seq = entry_seq(entry_id)
    where = str(seq)
    raw_seq = fields.get(b"seq")
    if raw_seq is None or raw_seq.strip() != str(seq).encode():
        raise InvalidEntry(where, "seq field does not match the entry ID")
    raw = fields.get(b"event")
    if raw is None:
        raise InvalidEntry(where, "no event field")
    try:
        envelope = WireEnvelope.from_json_bytes(raw)
    except EnvelopeError as exc:
        raise InvalidEntry(where, str(exc)) from None
    if envelope.seq is not None and envelope.seq != seq:
        raise InvalidEntry(where, "envelope seq does not match the entry ID")
    channels = _channels(where, fields.get(b"channels"), envelope)
    block_time = datetime.fromisoformat(envelope.timestamp).timestamp()
    return Event(seq=seq, channels=channels, envelope=bytes(raw), block_time=block_time)


def _channels(where: str, raw: bytes | None, envelope: EventEnvelope) -> tuple[str, ...]:
    """The envelope's channels (docs/protocol.md); the entry's field, when present, must name
    the same: relayed as given, another market's channel got the event."""
    derived = _derived_channels(envelope.type, envelope.contract_kind, envelope.market_address)
    if raw is None or not raw.strip():
        return derived
    try:
        given = _valid_channels(bytes(raw))
    except ChannelError as exc:
        raise InvalidEntry(where, str(exc)) from None
    if given != derived and set(given) != set(derived):
        raise InvalidEntry(
            where, f"channels field {' '.join(given)!r} is not the envelope's {' '.join(derived)!r}"
        )
    return derived


_derived_channels = functools.lru_cache(maxsize=65_536)(channels_for)


# Cached: events of a market repeat the same few field values, so validating each distinct one
# once saves most of the work per event (a refused field raises and is not cached).
@functools.lru_cache(maxsize=65_536)
def _valid_channels(raw: bytes) -> tuple[str, ...]:
    names: list[str] = []
    for name in raw.decode("ascii", "replace").split():
        try:
            channel = validate_channel(name)
        except ChannelError as exc:
            raise ChannelError(f"bad channel: {exc}") from None
        if is_pattern(channel):
            raise ChannelError("a channel name must not be a pattern")
        names.append(channel)
    return tuple(dict.fromkeys(names))


class History:
    """The newest stream entries, consecutive by seq, for answering resumes from memory.

    Invalid entries are kept as None so that the run stays consecutive; they are never replayed.
    """

    def __init__(self, size: int) -> None:
        self._entries: deque[tuple[int, Event | None]] = deque(maxlen=max(size, 1))
        self._enabled = size > 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, seq: int, event: Event | None) -> None:
        """Add the next entry; after a gap (trimmed entries) start over."""
        if not self._enabled:
            return
        if self._entries and seq != self._entries[-1][0] + 1:
            self._entries.clear()
        self._entries.append((seq, event))

    def covers(self, after: int, upto: int) -> bool:
        """Whether every seq in (after, upto] is here."""
        if upto <= after:
            return True
        if not self._entries:
            return False
        return self._entries[0][0] <= after + 1 and self._entries[-1][0] >= upto

    def between(self, after: int, upto: int) -> list[tuple[int, Event | None]]:
        """The entries with after < seq <= upto, in order (call covers() first)."""
        if not self._entries or upto <= after:
            return []
        start = max(0, after + 1 - self._entries[0][0])
        return list(takewhile(lambda entry: entry[0] <= upto, islice(self._entries, start, None)))
