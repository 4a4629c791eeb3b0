"""Deterministic, seedable KEKTECH activity on the dev chain.

The driver keeps a model of every market (state, bets, bonds, claims) and plans each block
from that model with a seeded RNG, so the same seed on a fresh chain produces the same
transactions, the same blocks and the same logs. Blocks are mined explicitly (anvil runs with
`--no-mining --order fifo`), which makes transaction order inside a block the send order and
lets the model apply each action's effect as soon as it is planned.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from eth_utils.crypto import keccak

from devnet.chain import Deployment, DevChain

WEI = 10**18
CANCELLED = 3  # the Outcome a cancellation sets
MARKET_CREATED_TOPIC = (
    "0x"
    + keccak(text="MarketCreated(address,address,string,uint256,uint256,bytes32,uint256)").hex()
)
CATEGORIES = ("crypto", "sports", "politics", "tech", "culture")
SUBJECTS = ("BTC", "ETH", "BasedAI", "the Kek DAO", "a meme coin", "the home team", "GPT-7")
VERBS = ("reach a new high", "be listed", "ship", "win", "flip", "trend", "beat estimates")


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
    # An outcome the resolution manager announced on its own (AdminResolution, an upheld
    # DisputeResolved) since the market last set `outcome`: the market does not apply it, the
    # markets projection does (docs/protocol.md).
    announced_outcome: int | None = None
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
class _Tx:
    sender: str
    to: str
    data: str
    value: int = 0


class _Bucket:
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


class ActivityDriver:
    """Plans, sends and mines KEKTECH transactions on a dev chain."""

    def __init__(
        self,
        chain: DevChain,
        deployment: Deployment,
        *,
        seed: int,
        txs_per_block: int = 8,
    ) -> None:
        if txs_per_block < 1:
            raise ValueError("txs_per_block must be >= 1")
        self.chain = chain
        self.deployment = deployment
        self.rng = random.Random(seed)
        self.txs_per_block = txs_per_block
        self.markets: dict[str, Market] = {}
        self.stats = DriverStats()
        self._admin = chain.accounts[0]
        self._users = chain.accounts[1:]
        self._factory = chain.contract("FlexibleMarketFactoryUnified")
        self._market = chain.contract("PredictionMarket")
        self._rm = chain.contract("ResolutionManager")
        self._rd = chain.contract("RewardDistributor")
        self._question_no = 0
        self._buckets = {state: _Bucket() for state in State}
        self._cancelled = _Bucket()

    # -- sending ---------------------------------------------------------------------------

    async def _mine(self, txs: list[_Tx]) -> None:
        for tx in txs:
            await self.chain.send(sender=tx.sender, to=tx.to, data=tx.data, value=tx.value)
        block = await self.chain.mine()
        self.stats.blocks += 1
        self.stats.transactions += len(txs)
        for receipt in block["receipts"]:
            self.stats.events += len(receipt["logs"])
            for log in receipt["logs"]:
                self._register_market(log)

    def _register_market(self, log: dict[str, Any]) -> None:
        topics = log["topics"]
        emitter = log["address"].lower()
        if emitter not in self.deployment.factories or topics[0] != MARKET_CREATED_TOPIC:
            return
        address = "0x" + topics[1][-40:]
        creator = "0x" + topics[2][-40:]
        market = Market(address=address, factory=emitter, creator=creator)
        self.markets[address] = market
        self._buckets[State.PROPOSED].add(market)
        self.stats.markets += 1

    def _move(self, m: Market, state: State) -> None:
        self._buckets[m.state].remove(m)
        m.state = state
        self._buckets[state].add(m)

    def _call(self, contract: Any, fn: str, *args: Any) -> str:
        return str(contract.encode_abi(fn, args=list(args)))

    # -- actions: each returns a transaction and updates the model as if it was mined ---------

    def _create_market(self, factory: str | None = None) -> _Tx:
        self._question_no += 1
        rng = self.rng
        question = (
            f"Will {rng.choice(SUBJECTS)} {rng.choice(VERBS)} by day {rng.randint(1, 365)}?"
            f" #{self._question_no}"
        )
        category = keccak(text=rng.choice(CATEGORIES))
        resolution_time = self.deployment.block + rng.randint(10_000, 10_000_000)
        data = self._call(
            self._factory,
            "createMarket",
            question,
            resolution_time,
            category,
            rng.randint(0, 50),
            resolution_time - 1,
        )
        return _Tx(
            sender=rng.choice(self._users),
            to=factory or rng.choice(self.deployment.factories),
            data=data,
            value=rng.randint(1, 100) * WEI // 1000,
        )

    def _approve(self, m: Market) -> _Tx:
        self._move(m, State.APPROVED)
        data = self._call(self._factory, "approveMarket", m.address, self.rng.random() < 0.2)
        return _Tx(self._admin, m.factory, data)

    def _reject(self, m: Market) -> _Tx:
        self._move(m, State.REJECTED)
        data = self._call(self._factory, "rejectMarket", m.address, "duplicate or unclear")
        return _Tx(self._admin, m.factory, data)

    def _activate(self, m: Market) -> _Tx:
        self._move(m, State.ACTIVE)
        return _Tx(self._admin, m.factory, self._call(self._factory, "activateMarket", m.address))

    def _bet(self, m: Market, bettor: str | None = None, outcome: int | None = None) -> _Tx:
        bettor = bettor or self.rng.choice(self._users)
        outcome = outcome or self.rng.choice((1, 2))
        amount = self.rng.randint(1, 1000) * WEI // 10_000
        key = (bettor, outcome)
        m.stakes[key] = m.stakes.get(key, 0) + amount
        m.bets[outcome] += 1
        return _Tx(bettor, m.address, self._call(self._market, "placeBet", outcome), amount)

    def _propose(self, m: Market, outcome: int | None = None) -> _Tx:
        self._move(m, State.RESOLVING)
        outcome = outcome or self.rng.choice((1, 2))
        data = self._call(self._rm, "proposeResolution", m.address, outcome)
        return _Tx(self.rng.choice(self._users), self.deployment.resolution_manager, data)

    def _resolve(self, m: Market, outcome: int | None = None) -> _Tx:
        self._move(m, State.RESOLVING)
        m.outcome = outcome or self.rng.choice((1, 2))
        m.announced_outcome = None
        data = self._call(self._rm, "resolveMarket", m.address, m.outcome)
        return _Tx(self._admin, self.deployment.resolution_manager, data)

    def _dispute(self, m: Market) -> _Tx:
        self._move(m, State.DISPUTED)
        bond = self.rng.choice((0, WEI // 100, WEI // 10))
        m.dispute_bond += bond
        data = self._call(self._rm, "disputeResolution", m.address, "the source says otherwise")
        return _Tx(self.rng.choice(self._users), self.deployment.resolution_manager, data, bond)

    def _investigate(self, m: Market) -> _Tx:
        data = self._call(self._rm, "investigateDispute", m.address, "checked two sources")
        return _Tx(self._admin, self.deployment.resolution_manager, data)

    def _resolve_dispute(self, m: Market) -> _Tx:
        upheld = self.rng.random() < 0.5
        new_outcome = self.rng.choice((1, 2))
        if upheld:
            m.announced_outcome = new_outcome
        data = self._call(self._rm, "resolveDispute", m.address, upheld, new_outcome)
        return _Tx(self._admin, self.deployment.resolution_manager, data)

    def _finalize(self, m: Market, outcome: int | None = None) -> _Tx:
        self._move(m, State.FINALIZED)
        m.outcome = outcome or m.outcome or self.rng.choice((1, 2, 3))
        m.announced_outcome = None
        data = self._call(self._rm, "finalizeResolution", m.address, m.outcome)
        return _Tx(self._admin, self.deployment.resolution_manager, data)

    def _auto_finalize(self, m: Market) -> _Tx:
        self._move(m, State.FINALIZED)
        m.outcome = m.outcome or self.rng.choice((1, 2))
        m.announced_outcome = None
        data = self._call(self._rm, "autoFinalize", m.address, m.outcome)
        return _Tx(self._admin, self.deployment.resolution_manager, data)

    def _signals(self, m: Market) -> _Tx:
        agree, disagree = self.rng.randint(0, 20), self.rng.randint(0, 20)
        data = self._call(self._rm, "submitDisputeSignals", m.address, agree, disagree)
        return _Tx(self._admin, self.deployment.resolution_manager, data)

    def _admin_resolve(self, m: Market) -> _Tx:
        m.announced_outcome = CANCELLED
        data = self._call(self._rm, "adminResolve", m.address, CANCELLED, "ambiguous question")
        return _Tx(self._admin, self.deployment.resolution_manager, data)

    def _return_bond(self, m: Market) -> _Tx:
        # Sending to the factory always fails (it has no receive function), which is how the
        # reference contracts come to emit DisputeBondTransferFailed.
        data = self._call(self._rm, "returnDisputeBond", m.address, m.factory)
        return _Tx(self._admin, self.deployment.resolution_manager, data)

    def _cancel(self, m: Market) -> _Tx:
        self._buckets[m.state].remove(m)
        self._cancelled.add(m)
        m.cancelled = True
        m.outcome = CANCELLED
        m.announced_outcome = None
        data = self._call(self._rm, "cancelMarket", m.address)
        return _Tx(self._admin, self.deployment.resolution_manager, data)

    def _claim(self, m: Market) -> _Tx | None:
        for (bettor, outcome), _amount in sorted(m.stakes.items()):
            winner = m.outcome == CANCELLED or outcome == m.outcome
            if winner and bettor not in m.claimed:
                m.claimed.add(bettor)
                return _Tx(bettor, m.address, self._call(self._market, "claimWinnings"))
        return None

    def _reward(self, m: Market) -> _Tx:
        amount = self.rng.randint(1, 10**6) * 10**9
        data = self._call(self._rd, "claimReward", m.address, max(m.outcome, 1), amount)
        return _Tx(self.rng.choice(self._users), self.deployment.reward_distributor, data)

    def _collect_fees(self, m: Market) -> _Tx:
        total = self.rng.randint(1, 10**6) * 10**12
        data = self._call(self._rd, "collectFees", m.address, total)
        return _Tx(self._admin, self.deployment.reward_distributor, data)

    def _creator_fees(self, m: Market) -> _Tx:
        data = self._call(self._rd, "claimCreatorFees", m.address)
        return _Tx(m.creator, self.deployment.reward_distributor, data)

    def _treasury(self) -> _Tx:
        data = self._call(
            self._rd, "withdrawTreasury", self._admin, self.rng.randint(1, 10**6) * 10**9
        )
        return _Tx(self._admin, self.deployment.reward_distributor, data)

    def _staker_rewards(self) -> _Tx:
        staker = self.rng.choice(self._users)
        amount = self.rng.randint(1, 10**6) * 10**9
        data = self._call(self._rd, "distributeStakerRewards", staker, amount)
        return _Tx(self._admin, self.deployment.reward_distributor, data)

    def _fee_distribution(self) -> _Tx:
        bps = [self.rng.randint(0, 1500) for _ in range(4)]
        data = self._call(self._rd, "setFeeDistribution", *bps)
        return _Tx(self._admin, self.deployment.reward_distributor, data)

    def _deactivate(self, m: Market) -> _Tx:
        data = self._call(self._factory, "deactivateMarket", m.address, "stale market")
        return _Tx(self._admin, m.factory, data)

    def _refund_bond(self, m: Market) -> _Tx:
        m.bond_refunded = True
        data = self._call(self._factory, "refundCreatorBond", m.address, "market closed")
        return _Tx(self._admin, m.factory, data)

    def _pause(self, factory: str, paused: bool) -> _Tx:
        return _Tx(self._admin, factory, self._call(self._factory, "setPaused", paused))

    # -- scripted coverage -----------------------------------------------------------------

    async def cover_all_events(self) -> None:
        """Mine a short script that makes every contract emit every event at least once."""
        v1, v2 = self.deployment.factories
        before = set(self.markets)
        await self._mine(
            [self._create_market(v2), self._create_market(v1)]
            + [self._create_market(v2) for _ in range(2)]
            + [self._create_market(v1)]
        )
        current, legacy, third, fourth, fifth = (
            self.markets[a] for a in sorted(set(self.markets) - before, key=self._creation_order)
        )
        await self._mine(
            [
                self._approve(current),
                self._approve(legacy),
                self._approve(third),
                self._reject(fourth),
                self._approve(fifth),
                self._fee_distribution(),
            ]
        )
        await self._mine(
            [
                self._activate(current),
                self._activate(legacy),
                self._activate(third),
                self._activate(fifth),
            ]
        )
        u1, u2 = self._users[0], self._users[1]
        await self._mine(
            [
                self._bet(current, u1, 1),
                self._bet(current, u2, 2),
                self._bet(legacy, u1, 2),
                self._bet(third, u2, 1),
                self._bet(fifth, u1, 1),
                self._bet(fifth, u2, 2),
                self._collect_fees(current),
            ]
        )
        # Cancelled markets keep their state: a legacy one while ACTIVE, with bets to refund,
        # and a rejected one.
        await self._mine(
            [
                self._propose(current, 1),
                self._resolve(third, 2),
                self._resolve(legacy, 2),
                self._cancel(fifth),
                self._cancel(fourth),
            ]
        )
        current.outcome = 1
        await self._mine(
            [
                self._dispute_with_bond(current),
                self._signals_flagged(third),
                self._auto_finalize(third),
            ]
        )
        await self._mine(
            [
                self._investigate(current),
                self._resolve_dispute(current),
                self._return_bond(current),
                self._finalize(current, 1),
                self._admin_resolve(legacy),
                self._finalize(legacy, 3),
            ]
        )
        claims = [self._claim(current), self._claim(legacy), self._claim(fifth)]
        await self._mine(
            [tx for tx in claims if tx is not None]
            + [
                self._reward(current),
                self._creator_fees(current),
                self._treasury(),
                self._staker_rewards(),
                self._deactivate(fourth),
                self._refund_bond(fourth),
            ]
        )
        # Pausing blocks market creation, so pause and unpause alone in their own block.
        await self._mine([self._pause(v2, True), self._pause(v2, False)])

    def _creation_order(self, address: str) -> int:
        return list(self.markets).index(address)

    def _dispute_with_bond(self, m: Market) -> _Tx:
        self._move(m, State.DISPUTED)
        m.dispute_bond += WEI // 100
        data = self._call(self._rm, "disputeResolution", m.address, "the source says otherwise")
        return _Tx(self._users[2], self.deployment.resolution_manager, data, WEI // 100)

    def _signals_flagged(self, m: Market) -> _Tx:
        data = self._call(self._rm, "submitDisputeSignals", m.address, 3, 7)
        return _Tx(self._admin, self.deployment.resolution_manager, data)

    # -- random activity ---------------------------------------------------------------------

    def _plan_one(self) -> _Tx | None:
        """Pick one action the model allows, weighted towards the common ones."""
        rng = self.rng
        options: list[tuple[float, Callable[[], _Tx | None]]] = [(6.0, self._create_market)]
        for state, weight, actions in self._state_actions():
            bucket = self._buckets[state]
            if bucket:
                options += [
                    (weight, functools.partial(self._on_random, a, bucket)) for a in actions
                ]
        if self._cancelled:  # in no state's bucket: they take nothing but refund claims
            options.append((1.0, functools.partial(self._on_random, self._claim, self._cancelled)))
        options += [
            (0.3, self._treasury),
            (0.3, self._staker_rewards),
            (0.1, self._fee_distribution),
        ]
        total = sum(w for w, _ in options)
        pick = rng.random() * total
        for weight, action in options:
            pick -= weight
            if pick <= 0:
                return action()
        return options[-1][1]()

    def _on_random(self, action: Callable[[Market], _Tx | None], bucket: _Bucket) -> _Tx | None:
        return action(bucket.choice(self.rng))

    def _state_actions(self) -> list[tuple[State, float, list[Callable[[Market], _Tx | None]]]]:
        actions: list[tuple[State, float, list[Callable[[Market], _Tx | None]]]] = [
            (State.PROPOSED, 3.0, [self._approve, self._approve, self._reject]),
            (State.APPROVED, 3.0, [self._activate]),
            (State.ACTIVE, 10.0, [self._bet, self._bet, self._bet, self._bet]),
            (State.ACTIVE, 1.0, [self._propose, self._resolve, self._collect_fees]),
            (
                State.RESOLVING,
                1.0,
                [self._resolve, self._dispute, self._finalize, self._auto_finalize, self._signals],
            ),
            (State.DISPUTED, 1.0, [self._investigate, self._resolve_dispute, self._finalize]),
            (State.FINALIZED, 1.5, [self._claim, self._claim, self._reward, self._creator_fees]),
            (State.FINALIZED, 0.2, [self._admin_resolve, self._return_bond_if_any]),
            (State.REJECTED, 0.5, [self._deactivate_once]),
        ]
        return actions + [
            (state, 0.3, [self._cancel_unresolved])
            for state in State
            if state is not State.FINALIZED
        ]

    def _cancel_unresolved(self, m: Market) -> _Tx | None:
        # A market resolved (not only proposed) has an outcome, and cancelMarket() refuses it.
        return None if m.outcome else self._cancel(m)

    def _return_bond_if_any(self, m: Market) -> _Tx | None:
        return self._return_bond(m) if m.dispute_bond else None

    def _deactivate_once(self, m: Market) -> _Tx | None:
        if m.bond_refunded:
            return None
        return self._refund_bond(m) if self.rng.random() < 0.5 else self._deactivate(m)

    async def step(self) -> None:
        """Plan and mine one block of random activity."""
        txs: list[_Tx] = []
        while len(txs) < self.txs_per_block:
            tx = self._plan_one()
            if tx is not None:
                txs.append(tx)
        await self._mine(txs)

    async def active_market(self, factory: str) -> Market:
        """An active market of `factory`: one there is, or one created and activated now."""
        for market in self.markets.values():
            if market.state is State.ACTIVE and not market.cancelled and market.factory == factory:
                return market
        before = set(self.markets)
        await self._mine([self._create_market(factory)])
        (address,) = set(self.markets) - before
        market = self.markets[address]
        await self._mine([self._approve(market)])
        await self._mine([self._activate(market)])
        return market

    async def bet(self, market: Market) -> None:
        """Mine one block holding a bet on `market`, active still (no run() since it was)."""
        await self._mine([self._bet(market)])

    async def run(
        self,
        *,
        events: int | None = None,
        blocks: int | None = None,
        block_interval: float | None = None,
    ) -> DriverStats:
        """Mine random blocks until `events` logs or `blocks` blocks were produced.

        `block_interval` paces blocks in seconds (None: as fast as anvil allows). Safe to
        cancel between blocks; a cancelled block may be left queued but unmined.
        """
        if events is None and blocks is None:
            raise ValueError("give events= or blocks=")
        start_events, start_blocks = self.stats.events, self.stats.blocks
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            if events is not None and self.stats.events - start_events >= events:
                break
            if blocks is not None and self.stats.blocks - start_blocks >= blocks:
                break
            if block_interval is not None:
                next_at += block_interval
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            await self.step()
        return self.stats
