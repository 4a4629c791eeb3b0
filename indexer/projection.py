"""The `markets` projection as a pure fold over decoded events.

The same fold serves the forward path (apply a batch to the rows it touches) and the reorg
path (rebuild an affected market from the events that remain), so both always agree. Early
markets (template v1) emit no MarketStateChanged, so the state also follows the lifecycle
events that accompany each transition. A cancellation is not one: cancelMarket() emits
MarketResolved(CANCELLED) alone, in whatever state the market is, and leaves that state. The
outcome is the market's own too (OUTCOME_ARGUMENT), not what the resolution manager announces.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from indexer.catalog import OUTCOME_NAMES, STATE_NAMES, ContractKind

# Lifecycle events and the state they imply, by (emitter kind, event name).
STATE_BY_EVENT: dict[tuple[ContractKind, str], str] = {
    (ContractKind.MARKET, "MarketApproved"): "APPROVED",
    (ContractKind.MARKET, "MarketActivated"): "ACTIVE",
    (ContractKind.MARKET, "ResolutionProposed"): "RESOLVING",
    (ContractKind.MARKET, "MarketDisputed"): "DISPUTED",
    (ContractKind.MARKET, "MarketFinalized"): "FINALIZED",
}
# resolveMarket() moves the market to RESOLVING with MarketResolved(OUTCOME1/2); cancelMarket()
# emits MarketResolved(CANCELLED) and moves it nowhere.
MARKET_RESOLVED = (ContractKind.MARKET, "MarketResolved")
CANCELLED = str(OUTCOME_NAMES.index("CANCELLED"))
# Events that set the market's outcome, and the argument holding it: the market's own only.
# The resolution manager's (its MarketResolved, ResolutionFinalized, MarketAutoFinalized,
# AdminResolution, an upheld DisputeResolved) are another contract's announcements: what the
# market holds is its outcome, and an announcement need not reach it (a dispute upheld that the
# market never hears of), so taking them made the row disagree with the chain.
OUTCOME_ARGUMENT: dict[tuple[ContractKind, str], str] = {
    (ContractKind.MARKET, "MarketResolved"): "result",
    (ContractKind.MARKET, "MarketFinalized"): "finalOutcome",
}


@dataclass(frozen=True, slots=True)
class ProjectedEvent:
    """What the fold needs from one stored event."""

    kind: ContractKind
    name: str
    contract: str
    market: str
    args: dict[str, str | bool | None]
    block_number: int
    transaction_hash: str
    block_time: datetime


@dataclass(slots=True)
class MarketRow:
    """One row of the `markets` table (mutable: the fold updates it in place, which costs a
    fifth of building a new row per event)."""

    address: str
    factory: str
    creator: str
    question: str
    category: str
    resolution_time: int
    creator_bond: int
    state: str
    outcome: str
    rejected: bool
    deactivated: bool
    bets_outcome1: int
    bets_outcome2: int
    volume_outcome1: int
    volume_outcome2: int
    created_block: int
    created_tx: str
    created_at: datetime
    updated_block: int


def _outcome_name(value: str | bool | None) -> str:
    index = int(str(value))
    return OUTCOME_NAMES[index] if 0 <= index < len(OUTCOME_NAMES) else "UNKNOWN"


def _created(event: ProjectedEvent) -> MarketRow:
    a = event.args
    return MarketRow(
        address=event.market,
        factory=event.contract,
        creator=str(a["creator"]),
        question=str(a["question"]),
        category=str(a["category"]),
        resolution_time=int(str(a["resolutionTime"])),
        creator_bond=int(str(a["creatorBond"])),
        state="PROPOSED",
        outcome="UNRESOLVED",
        rejected=False,
        deactivated=False,
        bets_outcome1=0,
        bets_outcome2=0,
        volume_outcome1=0,
        volume_outcome2=0,
        created_block=event.block_number,
        created_tx=event.transaction_hash,
        created_at=event.block_time,
        updated_block=event.block_number,
    )


def apply_event(row: MarketRow | None, event: ProjectedEvent) -> MarketRow | None:
    """Return the market row after `event` (None while the market is not yet announced).

    Updates `row` in place; the row returned is a new one only for a market's first
    MarketCreated.
    """
    key = (event.kind, event.name)
    if key == (ContractKind.FACTORY, "MarketCreated"):
        # The first announcement makes the row, as it decides where the market is followed
        # from (range_logs): another one (a factory announcing an address again) would
        # otherwise reset its bets and state.
        return _created(event) if row is None else row
    if row is None:
        # Only the child's own creation logs precede its announcement in the same transaction;
        # they carry nothing the row would not start with.
        return None
    row.updated_block = event.block_number
    args = event.args
    if key == (ContractKind.MARKET, "MarketStateChanged"):
        index = int(str(args["newState"]))
        row.state = STATE_NAMES[index] if index < len(STATE_NAMES) else "UNKNOWN"
    elif key in STATE_BY_EVENT:
        row.state = STATE_BY_EVENT[key]
    elif key == MARKET_RESOLVED and args["result"] != CANCELLED:
        row.state = "RESOLVING"
    if key in OUTCOME_ARGUMENT:
        row.outcome = _outcome_name(args[OUTCOME_ARGUMENT[key]])
    elif event.name == "MarketRejected":
        row.rejected = True
    elif key == (ContractKind.FACTORY, "MarketDeactivated"):
        row.deactivated = True
    elif key == (ContractKind.MARKET, "BetPlaced"):
        amount = int(str(args["amount"]))
        if args["outcome"] == "1":
            row.bets_outcome1 += 1
            row.volume_outcome1 += amount
        elif args["outcome"] == "2":
            row.bets_outcome2 += 1
            row.volume_outcome2 += amount
    return row


def apply_events(
    rows: dict[str, MarketRow | None], events: Iterable[ProjectedEvent]
) -> list[MarketRow]:
    """Fold `events` into `rows` (market address -> row, None if not stored); return the rows
    that changed, by address. `rows` must hold every market the events concern."""
    changed: set[str] = set()
    for event in events:
        after = apply_event(rows[event.market], event)
        if after is not None:
            rows[event.market] = after
            changed.add(event.market)
    return [row for address in sorted(changed) if (row := rows[address]) is not None]
