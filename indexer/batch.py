"""A unit of indexing work: the tracked logs of a block range, ready to commit at once."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from indexer.catalog import ContractKind, EventSpec, catalog
from indexer.decoding import Decoded, decode_args
from indexer.projection import ProjectedEvent
from indexer.rpc_results import BlockHeader, RawLog
from shared.channels import MARKET_PREFIX, channels_for
from shared.envelope import event_id

ISO_SECONDS = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A tracked log with what the indexer knows about it (decoded is None when unknown)."""

    log: RawLog
    kind: ContractKind
    decoded: Decoded | None
    block_time: datetime

    @property
    def market(self) -> str | None:
        return self.decoded.market if self.decoded is not None else None

    @property
    def position(self) -> tuple[int, int]:
        """(block number, log index): where the chain has it, the events table's key."""
        return self.log.block_number, self.log.log_index

    @property
    def channel_list(self) -> str:
        """The channels space-separated, as the outbox stores them."""
        decoded = self.decoded
        assert decoded is not None
        spec = decoded.spec
        channels = _EVENT_CHANNELS.get(spec.key) or _event_channels(spec)
        market = decoded.market
        if market is None:
            return channels
        # market_channel(market) but for its check, which cost more than all the rest: the
        # market is an address already, a tracked contract's or an address argument decoded
        # (the envelope's marketAddress relies on that too).
        return f"{channels} {MARKET_PREFIX}{market.lower()}"

    def wire(self, *, chain_id: int, seq: int, removed: bool = False) -> tuple[str, bytes]:
        """The event's id and its envelope as JSON (docs/protocol.md, shared.envelope).

        Serialized directly rather than through the pydantic model: this runs for every event
        and validation would cost more than the rest of the indexing (measured). The tests
        validate what this produces with `EventEnvelope.from_json_bytes`.
        """
        decoded = self.decoded
        assert decoded is not None
        raw = self.log
        name = decoded.spec.name
        ident = event_id(chain_id, raw.transaction_hash, raw.log_index)
        envelope = {
            "type": name,
            "eventType": name,
            "id": ident,
            "seq": seq,
            "chainId": chain_id,
            "contract": raw.address,
            # A StrEnum: orjson writes its value, which `.value` would look up (measured).
            "contractKind": self.kind,
            "marketAddress": decoded.market,
            "blockNumber": raw.block_number,
            "blockHash": raw.block_hash,
            "transactionHash": raw.transaction_hash,
            "logIndex": raw.log_index,
            "timestamp": _iso(self.block_time),
            "args": decoded.args,
            "data": decoded.args,
            "removed": removed,
        }
        # Copied: orjson's result keeps its whole output buffer (8 KiB) alive, which for a
        # batch of queued payloads was a fifth of the process's memory (measured).
        return ident, bytes(memoryview(orjson.dumps(envelope)))

    def projected(self) -> ProjectedEvent | None:
        """The event as the markets projection sees it, if it concerns a market."""
        if self.decoded is None or self.decoded.market is None:
            return None
        return ProjectedEvent(
            kind=self.kind,
            name=self.decoded.spec.name,
            contract=self.log.address,
            market=self.decoded.market,
            args=self.decoded.args,
            block_number=self.log.block_number,
            transaction_hash=self.log.transaction_hash,
            block_time=self.block_time,
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> StoredEvent:
        """Rebuild an event from its `events` row (for rollbacks and rebuilds)."""
        topics = tuple(t for t in (record[f"topic{i}"] for i in range(4)) if t is not None)
        raw = RawLog(
            address=record["contract"],
            topics=topics,
            data=record["data"],
            block_number=record["block_number"],
            block_hash=record["block_hash"],
            transaction_hash=record["transaction_hash"],
            transaction_index=record["transaction_index"],
            log_index=record["log_index"],
            removed=False,
        )
        kind = ContractKind(record["contract_kind"])
        decoded = None
        if record["event_name"] is not None:
            spec = catalog()[(kind, topics[0])]
            decoded = Decoded(spec=spec, args=record["args"], market=record["market_address"])
        return cls(log=raw, kind=kind, decoded=decoded, block_time=record["block_time"])


@functools.lru_cache(maxsize=256)
def _iso(moment: datetime) -> str:
    # Cached: every event of a block has the same time, and strftime is not cheap.
    return moment.strftime(ISO_SECONDS)


# The channels of an event but its market's, space-separated, by EventSpec.key (which names
# the kind too): one entry per catalogue event, so no bound is needed. The market's channel
# is appended per event rather than cached: keyed by market, a cache evicted on nearly every
# event of a catch-up over more markets than it held (per event, about 3.5 against 0.4 us at
# 20,000 markets, for 0.25 against 0.3 us at 10: measured). A dict, not an lru_cache: looking
# a string up costs a fifth of a cached call with the name and the kind.
_EVENT_CHANNELS: dict[str, str] = {}


def _event_channels(spec: EventSpec) -> str:
    # The spec's kind is the event's: decoding looks the spec up by it (decode_log, from_record).
    channels = _EVENT_CHANNELS[spec.key] = " ".join(channels_for(spec.name, spec.kind.value, None))
    return channels


def block_time(timestamp: int) -> datetime:
    """A block's Unix timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(timestamp, tz=UTC)


def verify_args(event: StoredEvent) -> None:
    """Re-decode a stored event from its raw log (used by `verify`); raises on a mismatch."""
    if event.decoded is None:
        return
    again = decode_args(event.decoded.spec, event.log.topics, event.log.data)
    if again != event.decoded.args:
        raise ValueError(
            f"stored args differ from the log at {event.log.block_number}:{event.log.log_index}"
        )


@dataclass(frozen=True, slots=True)
class Batch:
    """Everything one transaction commits: events, new headers and the new cursor.

    `cursor` is None for a backfill of an already indexed range: the cursor stays put.
    Otherwise `extends` is the hash of the block the batch follows on from, which the stored
    cursor must still be when it commits.
    """

    events: Sequence[StoredEvent]
    headers: Sequence[BlockHeader]
    cursor: BlockHeader | None
    prune_headers_below: int
    extends: str | None
