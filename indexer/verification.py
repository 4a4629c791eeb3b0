"""`verify`: re-read a range from the chain and compare the database with what the indexer's
own code makes of it.

- Events: each log of a followed contract is decoded as the indexer decodes it (the
  catalogue, by the emitter's kind: range_events.stored_event) and the row it would store
  is compared with the stored one, column by column but the publication seq (which must be
  set exactly on decoded events).
- The markets followed: `markets` is also the list of clones the indexer follows, so every
  clone a configured factory announced up to the range's end needs its row, with that
  factory and creation block, and a row nothing announced is a difference.
- The block headers stored for reorg detection, and the cursor's hash: each one in the range
  must be the node's block at its height (hash and parent hash).
- The projection: the row of each market whose events the range holds all of (created at or
  after its start, the range ending at the cursor) is compared with the fold of the chain's
  events (indexer/projection.py); the others are counted as not compared.

Only the contracts recorded as dropped from the configuration (table `sources`), and their
markets, are left out, counted. The range is compared a window of blocks at a time, each
window's stored rows read in pages and merged with the chain's logs in (block, log index)
order, so memory stays bounded by the window and the number of markets, however long the
range and however many events the database holds (or wrongly holds) there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from indexer.batch import StoredEvent
from indexer.catalog import MARKET_CREATED, ContractKind
from indexer.database import Database
from indexer.decoding import announced_market
from indexer.errors import ReorgDuringFetch
from indexer.projection import MarketRow, apply_events
from indexer.queries import event_rows, header_rows, market_registry, markets
from indexer.range_events import timed_events
from indexer.range_logs import fetch_chunked
from indexer.rpc import LogRangeSizer, RpcClient, fetch_logs
from indexer.rpc_results import RawLog
from indexer.sources import dropped_sources, sources
from indexer.statements import EVENT_COLUMNS, event_values

# The columns of an event row compared with the chain's (its position is the merge key; its
# seq is the indexer's own numbering, only checked to be set on decoded events).
COMPARED_COLUMNS = tuple(c for c in EVENT_COLUMNS if c not in ("block_number", "log_index", "seq"))
# Columns that only mean something on a decoded event.
DECODED_COLUMNS = frozenset({"event_name", "market_address", "args"})
# Columns whose values are too long to print in a difference.
LONG_COLUMNS = frozenset({"data", "args", "question"})
# The market rows compared with their projection, besides those the registry check covers.
PROJECTED_COLUMNS = tuple(
    f.name for f in fields(MarketRow) if f.name not in ("address", "factory", "created_block")
)
# Market rows read per query when comparing projections.
MARKETS_PAGE = 500


@dataclass(frozen=True, slots=True)
class Difference:
    where: str  # "block B log L", "block B" or "market 0x..."
    what: str


def at_log(block: int, log_index: int, what: str) -> Difference:
    return Difference(f"block {block} log {log_index}", what)


@dataclass(frozen=True, slots=True)
class Announcement:
    """A clone announced on chain: by which factory, where."""

    factory: str
    block: int
    log_index: int


@dataclass(slots=True)
class Report:
    """What a verify found: counts, and the first differences (the markets followed, then
    the events in chain order, then the stored block headers and the cursor, then the
    projections)."""

    keep: int
    chain_logs: int = 0
    stored_events: int = 0
    markets_compared: int = 0  # rows compared with the projection of their events
    headers_compared: int = 0  # stored block headers compared with the node's
    # Of contracts recorded as dropped from the configuration, and their markets: not
    # compared, as the chain is not read for them.
    not_compared: int = 0
    markets_not_compared: int = 0
    # Rows of markets whose events the range does not hold all of, and why.
    projections_not_compared: int = 0
    projections_why: str = ""
    # Rows a running indexer updated with events above the cursor verify read: not compared.
    markets_moved_on: int = 0
    differences: int = 0
    first: list[Difference] = field(default_factory=list)

    def add(self, difference: Difference) -> None:
        self.differences += 1
        if len(self.first) < self.keep:
            self.first.append(difference)


def _shown(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _differing(column: str, stored: object, expected: object) -> str:
    if column in LONG_COLUMNS:
        return f"{column} differs"
    return f"{column} is {_shown(stored)}, expected {_shown(expected)}"


def _compare_event(expected: StoredEvent, row: Mapping[str, Any]) -> Iterator[Difference]:
    """The differences between the row the indexer would store for a log and the stored one."""
    raw = expected.log
    where = f"block {raw.block_number} log {raw.log_index}"
    values = dict(zip(EVENT_COLUMNS, event_values(expected, None), strict=True))
    name, stored_name = values["event_name"], row["event_name"]
    skipped: Container[str] = ()
    if name is not None and stored_name is None:
        yield Difference(where, f"stored raw, but the catalogue decodes it as {name}")
        skipped = DECODED_COLUMNS
    elif name is None and stored_name is not None:
        yield Difference(where, f"stored as {stored_name}, but the catalogue does not decode it")
        skipped = DECODED_COLUMNS
    for column in COMPARED_COLUMNS:
        if column not in skipped and row[column] != values[column]:
            yield Difference(where, _differing(column, row[column], values[column]))
    if stored_name is not None and row["seq"] is None:
        yield Difference(where, "stored decoded, but never published (seq is NULL)")
    elif stored_name is None and row["seq"] is not None:
        yield Difference(where, f"stored raw, but published (seq {row['seq']})")


async def compare(
    chain: Sequence[StoredEvent],
    stored: AsyncIterator[list[Mapping[str, Any]]],
    *,
    followed: Container[str],
) -> AsyncIterator[Difference]:
    """Merge the expected events (sorted) with the stored rows (pages, sorted) by position."""
    position = 0
    async for page in stored:
        for row in page:
            key = (row["block_number"], row["log_index"])
            while position < len(chain) and _key(chain[position]) < key:
                yield _missing(chain[position])
                position += 1
            if position < len(chain) and _key(chain[position]) == key:
                for difference in _compare_event(chain[position], row):
                    yield difference
                position += 1
            elif row["contract"] in followed:
                yield at_log(*key, "in the database but not on the chain")
            else:
                yield at_log(
                    *key,
                    f"in the database but not on the chain, from {row['contract']}: neither a"
                    " configured contract nor a market a configured factory announced",
                )
    for expected in chain[position:]:
        yield _missing(expected)


def _key(event: StoredEvent) -> tuple[int, int]:
    return event.log.block_number, event.log.log_index


def _missing(event: StoredEvent) -> Difference:
    raw = event.log
    return at_log(raw.block_number, raw.log_index, f"missing from the database ({raw.address})")


def compare_registry(
    announced: Mapping[str, Announcement],
    registry: Mapping[str, tuple[str, int]],
    *,
    dropped: Container[str],
    last: int,
    cursor: int,
    report: Report,
) -> None:
    """Compare `markets` (address: factory, created block) with the clones announced on
    chain up to `last`; rows of dropped factories are counted, not compared."""
    for clone, made in sorted(announced.items(), key=lambda item: item[1].block):
        row = registry.get(clone)
        where = f"market {clone}"
        if row is None:
            report.add(
                at_log(
                    made.block,
                    made.log_index,
                    f"market {clone} announced here has no row in markets: the indexer does"
                    " not follow it",
                )
            )
            continue
        factory, created = row
        if factory != made.factory:
            report.add(Difference(where, f"factory is {factory}, but {made.factory} announced it"))
        if created != made.block:
            report.add(
                Difference(
                    where, f"created_block is {created}, but it was announced in block {made.block}"
                )
            )
    for address, (factory, created) in sorted(registry.items()):
        if address in announced or created > cursor:
            # Above the cursor: committed since it was read (a running indexer), or stored
            # there by something else, which the check of the rows above the cursor says.
            continue
        if factory in dropped:
            report.markets_not_compared += 1
        elif created <= last or last >= cursor:  # above `last`: maybe announced since
            report.add(
                Difference(
                    f"market {address}",
                    f"in markets (factory {factory}, created_block {created})"
                    " but no configured factory announced it",
                )
            )


async def compare_projections(
    db: Database, projected: Mapping[str, MarketRow | None], *, cursor: int, report: Report
) -> None:
    """Compare the stored rows of these markets with the fold of their events on chain up to
    the cursor; a row a running indexer updated past it since is counted, not compared."""
    addresses = sorted(projected)
    for start in range(0, len(addresses), MARKETS_PAGE):
        group = addresses[start : start + MARKETS_PAGE]
        stored = await markets(db, group)
        for address in group:
            expected, row = projected[address], stored.get(address)
            # No row: compare_registry said so. No projection: an announcement the catalogue
            # does not decode, which the events comparison names.
            if expected is None or row is None:
                continue
            if row.updated_block > cursor:
                report.markets_moved_on += 1
                continue
            report.markets_compared += 1
            differing = [
                _differing(c, getattr(row, c), getattr(expected, c))
                for c in PROJECTED_COLUMNS
                if getattr(row, c) != getattr(expected, c)
            ]
            if differing:
                report.add(Difference(f"market {address}", "; ".join(differing)))


async def compare_headers(
    db: Database,
    rpc: RpcClient,
    *,
    first: int,
    last: int,
    cursor: int,
    cursor_hash: str,
    report: Report,
) -> None:
    """Compare the stored block headers of [first, last] and the cursor's hash (when the range
    reaches it) with the node's blocks at those heights.

    Those headers are what a reorg is detected by: one of a replaced branch, even an empty
    block that no event shows, would hide the next reorg or misplace its rollback. The table
    keeps about 2 x REORG_WINDOW of them; they are read a page at a time all the same.
    """
    first = max(first, 0)  # the virtual parent of block 0 is no block of the node's
    async for page in header_rows(db, first, last):
        current = {h.number: h for h in await rpc.get_block_headers([h.number for h in page])}
        for stored in page:
            node = current[stored.number]
            report.headers_compared += 1
            differing = [
                _differing(column, getattr(stored, column), getattr(node, column))
                for column in ("hash", "parent_hash")
                if getattr(stored, column) != getattr(node, column)
            ]
            if differing:
                report.add(
                    Difference(f"block {stored.number}", "stored header " + "; ".join(differing))
                )
    if first <= cursor <= last:
        node = await rpc.get_block_header(cursor)
        if node.hash != cursor_hash:
            report.add(
                Difference(
                    f"block {cursor}", f"the cursor's hash is {cursor_hash}, expected {node.hash}"
                )
            )


async def verify_range(
    db: Database,
    rpc: RpcClient,
    sizer: LogRangeSizer,
    *,
    first: int,
    last: int,
    cursor: int,
    cursor_hash: str,
    static: Mapping[str, ContractKind],
    began: int,
    max_addresses: int,
    window_events: int,
    keep: int,
) -> Report:
    """Compare [first, last] with the chain, in windows sized to about `window_events` logs.

    `began`: the block the database began at (sources.indexed_from), not START_BLOCK, which
    may have been changed since: the markets announced from there (or from `first`, if lower)
    on are followed.
    """
    report = Report(keep=keep)
    recorded = {*await sources(db), *await dropped_sources(db)}
    dropped = recorded - static.keys()  # recorded as followed, no longer configured
    # Children come from the chain, not from the database being checked.
    factories = [a for a, k in static.items() if k is ContractKind.FACTORY]
    announced = await _announcements(rpc, sizer, factories, since=min(began, first), last=last)
    registry = await market_registry(db)
    compare_registry(announced, registry, dropped=dropped, last=last, cursor=cursor, report=report)
    ignored = dropped | {
        a for a, (factory, _) in registry.items() if factory in dropped and a not in announced
    }
    kinds = {**static, **dict.fromkeys(sorted(announced), ContractKind.MARKET)}
    # A row holds its market's events up to the cursor, from its creation on.
    projected: dict[str, MarketRow | None] = {}
    if last < cursor:
        report.projections_why = (
            f"--to {last} is below the cursor {cursor}, and a row holds its market's events"
            " up to the cursor"
        )
    else:
        projected = {c: None for c, made in announced.items() if made.block >= first}
        report.projections_why = (
            f"created before block {first}; a verify from block {began}, where the database"
            " began, compares every row"
        )
    report.projections_not_compared = len(announced) - len(projected)
    addresses = list(kinds)
    window = min(sizer.maximum, max(1, window_events))
    start = first
    while start <= last:
        end = min(start + window - 1, last)
        chain = await fetch_chunked(rpc, sizer, start, end, addresses, max_addresses=max_addresses)
        chain.sort(key=lambda raw: (raw.block_number, raw.log_index))
        report.chain_logs += len(chain)
        expected = await _expected(rpc, chain, kinds)
        apply_events(
            projected,
            (p for e in expected if (p := e.projected()) is not None and p.market in projected),
        )
        pages = _compared(event_rows(db, start, end), ignored, report)
        async for difference in compare(expected, pages, followed=kinds):
            report.add(difference)
        # Aim the next window at about `window_events` logs, from this one's density.
        if len(chain) > 2 * window_events:
            window = max(1, window // 2)
        elif len(chain) < window_events // 2:
            window = min(sizer.maximum, window * 2)
        start = end + 1
    # From where the database began, the header below it too: the bottom of the stored
    # chain, which the reorg handling trusts as an ancestor.
    headers_from = began - 1 if first <= began else first
    await compare_headers(
        db,
        rpc,
        first=headers_from,
        last=last,
        cursor=cursor,
        cursor_hash=cursor_hash,
        report=report,
    )
    await compare_projections(db, projected, cursor=cursor, report=report)
    return report


async def _announcements(
    rpc: RpcClient, sizer: LogRangeSizer, factories: Sequence[str], *, since: int, last: int
) -> dict[str, Announcement]:
    """The clones the factories announced from block `since` to `last` (the first time each)."""
    if not factories or last < since:
        return {}
    logs = await fetch_logs(
        rpc,
        sizer,
        from_block=since,
        to_block=last,
        addresses=list(factories),
        topics=[MARKET_CREATED.topic0],
    )
    announced: dict[str, Announcement] = {}
    for raw in sorted(logs, key=lambda raw: (raw.block_number, raw.log_index)):
        clone = announced_market(raw.topics, raw.data)
        if clone is not None:
            made = Announcement(raw.address, raw.block_number, raw.log_index)
            announced.setdefault(clone, made)
    return announced


async def _expected(
    rpc: RpcClient, chain: Sequence[RawLog], kinds: Mapping[str, ContractKind]
) -> list[StoredEvent]:
    """The events the indexer would store for these logs, timed by their blocks' headers."""
    if not chain:
        return []
    numbers = sorted({raw.block_number for raw in chain})
    headers = {h.number: h for h in await rpc.get_block_headers(numbers)}
    try:
        return [event for event, _ in timed_events(chain, kinds, headers)]
    except ReorgDuringFetch as exc:
        raise ReorgDuringFetch(f"the chain changed during verify ({exc}); run it again") from exc


async def _compared(
    pages: AsyncIterator[list[Mapping[str, Any]]], ignored: Container[str], report: Report
) -> AsyncIterator[list[Mapping[str, Any]]]:
    """The stored rows compared: all but those of dropped contracts, which are counted."""
    async for page in pages:
        kept = [row for row in page if row["contract"] not in ignored]
        report.stored_events += len(kept)
        report.not_compared += len(page) - len(kept)
        yield kept
