"""`verify`: re-read a range from the chain and compare it with the database, log by log.

The range is compared a window of blocks at a time, each window's stored events read in
pages and merged with the chain's logs in (block, log index) order, so memory stays bounded
however long the range and however many events the database holds (or wrongly holds) there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

from indexer.batch import StoredEvent
from indexer.catalog import MARKET_CREATED
from indexer.decoding import UndecodableLog, decode_args
from indexer.rpc import LogRangeSizer, RpcClient, fetch_logs
from indexer.rpc_results import RawLog
from indexer.store import Store

# Fields of a stored log compared with the chain's, besides its decoded arguments.
COMPARED_FIELDS = (
    "address",
    "topics",
    "data",
    "block_hash",
    "transaction_hash",
    "transaction_index",
)


@dataclass(frozen=True, slots=True)
class Difference:
    block: int
    log_index: int
    what: str


@dataclass(slots=True)
class Report:
    """What a verify found: counts, and the first differences in chain order."""

    keep: int
    chain_logs: int = 0
    stored_events: int = 0
    # Stored events of contracts the configuration no longer follows (a factory dropped,
    # with its markets): not compared, as the chain is not read for them.
    not_compared: int = 0
    differences: int = 0
    first: list[Difference] = field(default_factory=list)

    def add(self, difference: Difference) -> None:
        self.differences += 1
        if len(self.first) < self.keep:
            self.first.append(difference)


def _compare_log(raw: RawLog, event: StoredEvent) -> Iterator[Difference]:
    key = (raw.block_number, raw.log_index)
    mine = event.log
    for name in COMPARED_FIELDS:
        if getattr(mine, name) != getattr(raw, name):
            yield Difference(*key, f"{name} differs")
    if event.decoded is not None:
        try:
            same = decode_args(event.decoded.spec, raw.topics, raw.data) == event.decoded.args
        except UndecodableLog:
            same = False
        if not same:
            yield Difference(*key, "decoded arguments differ")


async def compare(
    chain: Sequence[RawLog], stored: AsyncIterator[list[StoredEvent]]
) -> AsyncIterator[Difference]:
    """Merge the chain's logs (sorted) with the stored events (pages, sorted) by position."""
    position = 0
    async for page in stored:
        for event in page:
            key = (event.log.block_number, event.log.log_index)
            while position < len(chain) and _key(chain[position]) < key:
                yield _missing(chain[position])
                position += 1
            if position < len(chain) and _key(chain[position]) == key:
                for difference in _compare_log(chain[position], event):
                    yield difference
                position += 1
            else:
                yield Difference(*key, "in the database but not on the chain")
    for raw in chain[position:]:
        yield _missing(raw)


def _key(raw: RawLog) -> tuple[int, int]:
    return raw.block_number, raw.log_index


def _missing(raw: RawLog) -> Difference:
    return Difference(raw.block_number, raw.log_index, f"missing from the database ({raw.address})")


async def verify_range(
    store: Store,
    rpc: RpcClient,
    sizer: LogRangeSizer,
    *,
    first: int,
    last: int,
    factories: Sequence[str],
    watched: Sequence[str],
    start_block: int,
    max_addresses: int,
    window_events: int,
    keep: int,
) -> Report:
    """Compare [first, last] with the chain, in windows sized to about `window_events` logs."""
    # Children come from the chain, not from the database being checked.
    announcements = []
    if factories and last >= start_block:
        announcements = await fetch_logs(
            rpc,
            sizer,
            from_block=start_block,
            to_block=last,
            addresses=list(factories),
            topics=[MARKET_CREATED.topic0],
        )
    children = {"0x" + lg.topics[1][-40:] for lg in announcements if len(lg.topics) > 1}
    addresses = [*watched, *sorted(children)]
    report = Report(keep=keep)
    window = min(sizer.maximum, max(1, window_events))
    start = first
    while start <= last:
        end = min(start + window - 1, last)
        chain: list[RawLog] = []
        for i in range(0, len(addresses), max_addresses):
            chain += await fetch_logs(
                rpc,
                sizer,
                from_block=start,
                to_block=end,
                addresses=addresses[i : i + max_addresses],
            )
        chain.sort(key=_key)
        report.chain_logs += len(chain)
        pages = _followed(store.stored_events(start, end), set(addresses), report)
        async for difference in compare(chain, pages):
            report.add(difference)
        # Aim the next window at about `window_events` logs, from this one's density.
        if len(chain) > 2 * window_events:
            window = max(1, window // 2)
        elif len(chain) < window_events // 2:
            window = min(sizer.maximum, window * 2)
        start = end + 1
    return report


async def _followed(
    pages: AsyncIterator[list[StoredEvent]], followed: set[str], report: Report
) -> AsyncIterator[list[StoredEvent]]:
    """The stored events of the contracts compared; the others are counted, not compared."""
    async for page in pages:
        kept = [event for event in page if event.log.address in followed]
        report.stored_events += len(kept)
        report.not_compared += len(page) - len(kept)
        yield kept
