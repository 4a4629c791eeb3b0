"""The driver's model of the markets: their states, bets and bonds, bucketed by state."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import IntEnum


class State(IntEnum):
    """MarketState as the contracts encode it, plus the driver-only REJECTED."""

    PROPOSED = 0
    APPROVED = 1
    ACTIVE = 2
    RESOLVING = 3
    DISPUTED = 4
    FINALIZED = 5
    REJECTED = 99


@dataclass
class Market:
    """What the driver knows about one market."""

    address: str
    factory: str
    creator: str
    state: State = State.PROPOSED
    outcome: int = 0
    # A cancelled market keeps the state it was cancelled in (as on the chain) and takes only
    # claims from then on.
    cancelled: bool = False
    stakes: dict[tuple[str, int], int] = field(default_factory=dict)
    bets: dict[int, int] = field(default_factory=lambda: {1: 0, 2: 0})  # count per outcome
    claimed: set[str] = field(default_factory=set)
    dispute_bond: int = 0
    bond_refunded: bool = False


@dataclass
class DriverStats:
    """Totals of what the driver produced."""

    blocks: int = 0
    transactions: int = 0
    events: int = 0
    markets: int = 0


@dataclass(frozen=True)
class Tx:
    sender: str
    to: str
    data: str
    value: int = 0


class Bucket:
    """Markets in one state: O(1) add, remove and seeded random choice."""

    def __init__(self) -> None:
        self._items: list[Market] = []
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, market: Market) -> None:
        self._index[market.address] = len(self._items)
        self._items.append(market)

    def remove(self, market: Market) -> None:
        position = self._index.pop(market.address)
        last = self._items.pop()
        if last is not market:
            self._items[position] = last
            self._index[last.address] = position

    def choice(self, rng: random.Random) -> Market:
        return self._items[rng.randrange(len(self._items))]


class MarketBook:
    """Every market the driver knows, by address and in one bucket per state."""

    def __init__(self) -> None:
        self.markets: dict[str, Market] = {}
        self.buckets = {state: Bucket() for state in State}
        self.cancelled = Bucket()

    def move(self, m: Market, state: State) -> None:
        self.buckets[m.state].remove(m)
        m.state = state
        self.buckets[state].add(m)
