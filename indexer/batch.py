"""A unit of indexing work: the tracked logs of a block range, ready to commit at once."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from indexer.catalog import ContractKind, catalog
from indexer.decoding import Decoded, decode_args
from indexer.projection import ProjectedEvent
from indexer.rpc_results import BlockHeader, RawLog
from shared.channels import channels_for
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
    def channel_list(self) -> str:
        """The channels space-separated, as the outbox stores them."""
        assert self.decoded is not None
        return _channel_list(self.decoded.spec.name, self.kind, self.decoded.market)

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


# Cached: a few dozen event names times the markets (a few thousand at most), asked for on
# every event published; cheaper than building the tuple and joining it each time (measured).
@functools.lru_cache(maxsize=8192)
def _channel_list(name: str, kind: ContractKind, market: str | None) -> str:
    return " ".join(channels_for(name, kind.value, market))


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
    """

    events: Sequence[StoredEvent]
    headers: Sequence[BlockHeader]
    cursor: BlockHeader | None
    prune_headers_below: int
