"""The `markets` fold over the event sequences the deployed PredictionMarket emits."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from indexer.catalog import STATE_NAMES, ContractKind
from indexer.projection import MarketRow, ProjectedEvent, apply_events

MARKET = "0x" + "ab" * 20
FACTORY = "0x" + "fa" * 20
CREATOR = "0x" + "c0" * 20
ADMIN = "0x" + "ad" * 20
TX = "0x" + "00" * 32
AT = datetime(2025, 11, 6, tzinfo=UTC)

Events = tuple[ProjectedEvent, ...]


def market_event(name: str, **args: str) -> ProjectedEvent:
    return ProjectedEvent(ContractKind.MARKET, name, MARKET, MARKET, dict(args), 2, TX, AT)


def state_changed(state: str) -> ProjectedEvent:
    return market_event("MarketStateChanged", newState=str(STATE_NAMES.index(state)), timestamp="1")


CREATED = ProjectedEvent(
    ContractKind.FACTORY,
    "MarketCreated",
    FACTORY,
    MARKET,
    {
        "creator": CREATOR,
        "question": "Will it rain?",
        "category": "0x" + "00" * 32,
        "resolutionTime": "1",
        "creatorBond": "0",
    },
    1,
    TX,
    AT,
)
# Each function's logs, in the deployed contract's order.
APPROVE = (market_event("MarketApproved", timestamp="1"), state_changed("APPROVED"))
ACTIVATE = (market_event("MarketActivated", timestamp="1"), state_changed("ACTIVE"))
BET = (market_event("BetPlaced", bettor=CREATOR, outcome="1", amount="5", shares="5"),)
PROPOSE = (
    market_event("ResolutionProposed", outcome="1", proposer=ADMIN),
    state_changed("RESOLVING"),
)
DISPUTE = (market_event("MarketDisputed", disputer=CREATOR, reason="no"), state_changed("DISPUTED"))
REJECT = (market_event("MarketRejected", reason="spam"), state_changed("FINALIZED"))
CANCEL = (market_event("MarketResolved", result="3", resolver=ADMIN, timestamp="2"),)
RESOLVE = (
    market_event("MarketResolved", result="1", resolver=ADMIN, timestamp="2"),
    market_event("ResolutionProposed", outcome="1", proposer=ADMIN),
    state_changed("RESOLVING"),
)


def current(events: Events) -> Events:
    return events


def legacy(events: Events) -> Events:
    """The same logs from a template-v1 market, which emits no MarketStateChanged."""
    return tuple(e for e in events if e.name != "MarketStateChanged")


def fold(events: Events, template: Callable[[Events], Events] = current) -> MarketRow:
    """The market's row after its creation (in the factory's transaction) and `events`."""
    rows: dict[str, MarketRow | None] = {MARKET: None}
    apply_events(rows, template((state_changed("PROPOSED"), CREATED, *events)))
    row = rows[MARKET]
    assert row is not None
    return row


def test_a_cancelled_active_market_stays_active() -> None:
    """cancelMarket() after bets emits MarketResolved(CANCELLED) alone: the market keeps its
    state (ACTIVE, as the chain says), its outcome is CANCELLED and its bets are kept."""
    row = fold(APPROVE + ACTIVATE + BET + CANCEL)
    assert (row.state, row.outcome) == ("ACTIVE", "CANCELLED")
    assert (row.bets_outcome1, row.volume_outcome1) == (1, 5)


def test_a_rejected_market_cancelled_for_refunds_stays_finalized() -> None:
    """reject() moves the market to FINALIZED; cancelling it afterwards leaves it there."""
    row = fold(REJECT + CANCEL)
    assert (row.state, row.outcome, row.rejected) == ("FINALIZED", "CANCELLED", True)


@pytest.mark.parametrize("template", [current, legacy])
@pytest.mark.parametrize(
    ("lifecycle", "state"),
    [
        ((), "PROPOSED"),
        (APPROVE, "APPROVED"),
        (APPROVE + ACTIVATE, "ACTIVE"),
        (APPROVE + ACTIVATE + PROPOSE, "RESOLVING"),
        (APPROVE + ACTIVATE + PROPOSE + DISPUTE, "DISPUTED"),
    ],
    ids=["proposed", "approved", "active", "resolving", "disputed"],
)
def test_a_cancellation_changes_no_state(
    template: Callable[[Events], Events], lifecycle: Events, state: str
) -> None:
    """A market cancelled in any state it can be cancelled in keeps that state, whether or
    not its template emits MarketStateChanged."""
    row = fold(lifecycle + CANCEL, template)
    assert (row.state, row.outcome) == (state, "CANCELLED")


@pytest.mark.parametrize(
    ("resolution", "template"),
    [(RESOLVE, current), (RESOLVE, legacy), (RESOLVE[:1], legacy)],
    ids=["current", "legacy", "legacy-resolved-alone"],
)
def test_resolving_still_moves_the_market_to_resolving(
    resolution: Events, template: Callable[[Events], Events]
) -> None:
    """resolveMarket()'s MarketResolved(OUTCOME1) moves the market to RESOLVING, also without
    MarketStateChanged (template v1) and alone (as the test contracts' v1 markets emit it)."""
    row = fold(APPROVE + ACTIVATE + resolution, template)
    assert (row.state, row.outcome) == ("RESOLVING", "OUTCOME1")


RM = "0x" + "e0" * 20


def manager_event(name: str, **args: str | bool) -> ProjectedEvent:
    """An event of the resolution manager about MARKET."""
    return ProjectedEvent(ContractKind.RESOLUTION_MANAGER, name, RM, MARKET, dict(args), 3, TX, AT)


# The resolution manager's events that name an outcome: another contract's word on the
# market's. A dispute upheld never reaches the market; the others follow the market's own
# event in the same transaction (AdminResolution too, since adminResolve finalizes the market;
# before, the test contract emitted it alone).
ANNOUNCEMENTS = (
    manager_event("AdminResolution", outcome="3", reason="ambiguous question"),
    manager_event("DisputeResolved", upheld=True, newOutcome="2", timestamp="3"),
    manager_event("MarketResolved", outcome="2", resolver=ADMIN, timestamp="3"),
    manager_event("ResolutionFinalized", finalOutcome="2", timestamp="3"),
    manager_event("MarketAutoFinalized", outcome="2"),
)
FINALIZE = (
    market_event("MarketFinalized", finalOutcome="2", timestamp="3"),
    state_changed("FINALIZED"),
)


@pytest.mark.parametrize("announcement", ANNOUNCEMENTS, ids=lambda e: e.name)
def test_the_resolution_managers_word_alone_changes_no_outcome(
    announcement: ProjectedEvent,
) -> None:
    """An outcome the resolution manager announces while the market's own events say nothing
    of it leaves the row's outcome (and state) as the market holds them."""
    row = fold(APPROVE + ACTIVATE + RESOLVE + DISPUTE + (announcement,))
    assert (row.state, row.outcome) == ("DISPUTED", "OUTCOME1")


def test_the_markets_own_finalization_sets_the_outcome() -> None:
    """The market's MarketFinalized sets the outcome it names, with or without the resolution
    manager's announcements before it."""
    row = fold(APPROVE + ACTIVATE + RESOLVE + DISPUTE + ANNOUNCEMENTS + FINALIZE)
    assert (row.state, row.outcome) == ("FINALIZED", "OUTCOME2")


def test_a_second_announcement_of_a_market_changes_nothing() -> None:
    """A market announced again (by the other factory, or the same one) keeps the row of its
    first announcement, bets and state included: the indexer follows it from the first, and
    the deployed factories never announce one address twice, so the second is not news."""
    again = ProjectedEvent(
        ContractKind.FACTORY,
        "MarketCreated",
        "0x" + "fb" * 20,
        MARKET,
        {**CREATED.args, "question": "Will it snow?", "creatorBond": "7"},
        3,
        "0x" + "11" * 32,
        AT,
    )
    row = fold(APPROVE + ACTIVATE + BET + (again,))
    assert (row.factory, row.question, row.creator_bond) == (FACTORY, "Will it rain?", 0)
    assert (row.state, row.bets_outcome1, row.volume_outcome1) == ("ACTIVE", 1, 5)
    assert (row.created_block, row.created_tx) == (1, TX)
