"""The events a fetched range stores: each tracked log decoded, or kept raw if unknown."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime

import structlog

from indexer.batch import StoredEvent, block_time
from indexer.catalog import ContractKind
from indexer.decoding import UndecodableLog, decode_log
from indexer.errors import ReorgDuringFetch
from indexer.metrics import Metrics
from indexer.rpc_results import BlockHeader, RawLog

log = structlog.get_logger()

# How many distinct unknown (address, topic0) pairs are remembered for "log once".
UNKNOWN_MEMORY = 1024


def stored_event(raw: RawLog, kind: ContractKind, time: datetime) -> tuple[StoredEvent, str | None]:
    """A log of a `kind` contract as the indexer stores it, and why it is kept raw (None
    when decoded). `verify` builds what it expects with this too."""
    try:
        decoded = decode_log(kind, raw.address, raw.topics, raw.data)
    except UndecodableLog as exc:
        return StoredEvent(log=raw, kind=kind, decoded=None, block_time=time), str(exc)
    problem = None if decoded is not None else "unknown event"
    return StoredEvent(log=raw, kind=kind, decoded=decoded, block_time=time), problem


def timed_events(
    logs: Sequence[RawLog],
    kinds: Mapping[str, ContractKind],
    headers: Mapping[int, BlockHeader],
) -> Iterator[tuple[StoredEvent, str | None]]:
    """Each log (from an address in `kinds`) as stored_event makes it, timed by its block's
    header; ReorgDuringFetch if a log is from another block than its header."""
    times: dict[int, datetime] = {}
    for raw in logs:
        header = headers[raw.block_number]
        if raw.block_hash != header.hash:
            raise ReorgDuringFetch(f"log of block {raw.block_number} is from another branch")
        if (time := times.get(header.number)) is None:
            time = times[header.number] = block_time(header.timestamp)
        yield stored_event(raw, kinds[raw.address], time)


class RangeDecoder:
    """Turns a range's logs into stored events; an unknown log is logged once per kind."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._unknown_logged: set[tuple[str, str]] = set()

    def events(
        self,
        logs: Sequence[RawLog],
        kinds: Mapping[str, ContractKind],
        headers: Mapping[int, BlockHeader],
    ) -> list[StoredEvent]:
        """The logs (each from an address in `kinds`) as events: timed_events, with each
        unknown one noted."""
        events = []
        for event, problem in timed_events(logs, kinds, headers):
            if problem is not None:
                self._note_unknown(event.log, event.kind, problem)
            events.append(event)
        return events

    def _note_unknown(self, raw: RawLog, kind: ContractKind, problem: str) -> None:
        self._metrics.unknown_logs.inc()
        key = (raw.address, raw.topics[0] if raw.topics else "")
        if key in self._unknown_logged or len(self._unknown_logged) >= UNKNOWN_MEMORY:
            return
        self._unknown_logged.add(key)
        log.warning(
            "unknown log stored raw",
            contract=raw.address,
            kind=kind.value,
            topic0=key[1],
            block=raw.block_number,
            problem=problem,
        )
