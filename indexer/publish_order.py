"""The order events are published in: chain order, but a market's announcement first in its tx.

In a transaction that creates a market the chain puts the new market's own logs
(`MarketStateChanged(PROPOSED)`, `Initialized(1)`) and the factory's `MarketProposed` before the
factory's `MarketCreated`. The deployed frontend de-duplicates WebSocket events on their
transaction hash and keeps the first one, and `MarketCreated` is the one it needs (it shows
`data.question`): so each publication of a transaction's events puts its `MarketCreated` first
and keeps the rest in the order given. Seqs follow this order; the `events` table keeps the
chain's coordinates, and the markets projection folds in chain order.

Removal notices (given newest first) take the same rule, so a transaction's first notice is its
`MarketCreated` too. On the chain that is already the case, since it is the transaction's last
log, so the rule only matters for logs a contract would emit after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from indexer.batch import StoredEvent
from indexer.catalog import ContractKind

ANNOUNCEMENT = (ContractKind.FACTORY, "MarketCreated")


def announces_market(event: StoredEvent) -> bool:
    """True for a factory's MarketCreated."""
    decoded = event.decoded
    return decoded is not None and (event.kind, decoded.spec.name) == ANNOUNCEMENT


def _transaction(event: StoredEvent) -> tuple[int, str]:
    return event.log.block_number, event.log.transaction_hash


def in_publish_order(events: Iterable[StoredEvent]) -> Iterator[StoredEvent]:
    """`events` (a transaction's events next to each other, as in chain order or its reverse)
    with each transaction's MarketCreated moved before the rest of that transaction's events."""
    held: list[StoredEvent] = []  # the current transaction's events but its announcements
    current: tuple[int, str] | None = None
    for event in events:
        transaction = _transaction(event)
        if transaction != current:
            yield from held
            held = []
            current = transaction
        if announces_market(event):
            yield event
        else:
            held.append(event)
    yield from held


def complete_transactions(
    events: Sequence[StoredEvent],
) -> tuple[Sequence[StoredEvent], list[StoredEvent]]:
    """Split a page of events (ordered by chain position) into those of the transactions it
    holds whole, and those of its last transaction, which the next page may continue."""
    if not events:
        return events, []
    last = _transaction(events[-1])
    cut = len(events)
    while cut > 0 and _transaction(events[cut - 1]) == last:
        cut -= 1
    return events[:cut], list(events[cut:])
