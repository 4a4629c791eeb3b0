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
from typing import Any

from eth_utils.crypto import keccak

from devnet.chain import Deployment, DevChain
from devnet.market_actions import MarketActions
from devnet.market_model import Bucket, DriverStats, Market, MarketBook, State, Tx

MARKET_CREATED_TOPIC = (
    "0x"
    + keccak(text="MarketCreated(address,address,string,uint256,uint256,bytes32,uint256)").hex()
)


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
        self._book = MarketBook()
        self.markets = self._book.markets
        self.stats = DriverStats()
        self.actions = MarketActions(chain, deployment, book=self._book, rng=self.rng)

    # -- sending ---------------------------------------------------------------------------

    async def _mine(self, txs: list[Tx]) -> None:
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
        self._book.buckets[State.PROPOSED].add(market)
        self.stats.markets += 1

    # -- scripted coverage -----------------------------------------------------------------

    async def cover_all_events(self) -> None:
        """Mine a short script that makes every contract emit every event at least once."""
        act = self.actions
        v1, v2 = self.deployment.factories
        before = set(self.markets)
        await self._mine(
            [act.create_market(v2), act.create_market(v1)]
            + [act.create_market(v2) for _ in range(2)]
            + [act.create_market(v1)]
        )
        current, legacy, third, fourth, fifth = (
            self.markets[a] for a in sorted(set(self.markets) - before, key=self._creation_order)
        )
        await self._mine(
            [
                act.approve(current),
                act.approve(legacy),
                act.approve(third),
                act.reject(fourth),
                act.approve(fifth),
                act.fee_distribution(),
            ]
        )
        await self._mine(
            [
                act.activate(current),
                act.activate(legacy),
                act.activate(third),
                act.activate(fifth),
            ]
        )
        u1, u2 = act.users[0], act.users[1]
        await self._mine(
            [
                act.bet(current, u1, 1),
                act.bet(current, u2, 2),
                act.bet(legacy, u1, 2),
                act.bet(third, u2, 1),
                act.bet(fifth, u1, 1),
                act.bet(fifth, u2, 2),
                act.collect_fees(current),
            ]
        )
        # Cancelled markets keep their state: a legacy one while ACTIVE, with bets to refund,
        # and a rejected one.
        await self._mine(
            [
                act.propose(current, 1),
                act.resolve(third, 2),
                act.resolve(legacy, 2),
                act.cancel(fifth),
                act.cancel(fourth),
            ]
        )
        current.outcome = 1
        await self._mine(
            [
                act.dispute_with_bond(current),
                act.signals_flagged(third),
                act.auto_finalize(third),
            ]
        )
        await self._mine(
            [
                act.investigate(current),
                act.resolve_dispute(current),
                act.return_bond(current),
                act.finalize(current, 1),
                act.admin_resolve(legacy),  # finalizes it, as CANCELLED
            ]
        )
        claims = [act.claim(current), act.claim(legacy), act.claim(fifth)]
        await self._mine(
            [tx for tx in claims if tx is not None]
            + [
                act.reward(current),
                act.creator_fees(current),
                act.treasury(),
                act.staker_rewards(),
                act.deactivate(fourth),
                act.refund_bond(fourth),
            ]
        )
        # Pausing blocks market creation, so pause and unpause alone in their own block.
        await self._mine([act.pause(v2, True), act.pause(v2, False)])

    def _creation_order(self, address: str) -> int:
        return list(self.markets).index(address)

    # -- random activity ---------------------------------------------------------------------

    def _plan_one(self) -> Tx | None:
        """Pick one action the model allows, weighted towards the common ones."""
        rng = self.rng
        options: list[tuple[float, Callable[[], Tx | None]]] = [(6.0, self.actions.create_market)]
        for state, weight, actions in self._state_actions():
            bucket = self._book.buckets[state]
            if bucket:
                options += [
                    (weight, functools.partial(self._on_random, a, bucket)) for a in actions
                ]
        if self._book.cancelled:  # in no state's bucket: they take nothing but refund claims
            options.append(
                (1.0, functools.partial(self._on_random, self.actions.claim, self._book.cancelled))
            )
        options += [
            (0.3, self.actions.treasury),
            (0.3, self.actions.staker_rewards),
            (0.1, self.actions.fee_distribution),
        ]
        total = sum(w for w, _ in options)
        pick = rng.random() * total
        for weight, action in options:
            pick -= weight
            if pick <= 0:
                return action()
        return options[-1][1]()

    def _on_random(self, action: Callable[[Market], Tx | None], bucket: Bucket) -> Tx | None:
        return action(bucket.choice(self.rng))

    def _state_actions(self) -> list[tuple[State, float, list[Callable[[Market], Tx | None]]]]:
        act = self.actions
        actions: list[tuple[State, float, list[Callable[[Market], Tx | None]]]] = [
            (State.PROPOSED, 3.0, [act.approve, act.approve, act.reject]),
            (State.APPROVED, 3.0, [act.activate]),
            (State.ACTIVE, 10.0, [act.bet, act.bet, act.bet, act.bet]),
            (State.ACTIVE, 1.0, [act.propose, act.resolve, act.collect_fees]),
            (
                State.RESOLVING,
                1.0,
                [act.resolve, act.dispute, act.finalize, act.auto_finalize, act.signals],
            ),
            (State.DISPUTED, 1.0, [act.investigate, act.resolve_dispute, act.finalize]),
            # adminResolve finalizes the market, which only these states allow.
            (State.RESOLVING, 0.3, [act.admin_resolve]),
            (State.DISPUTED, 0.3, [act.admin_resolve]),
            (State.FINALIZED, 1.5, [act.claim, act.claim, act.reward, act.creator_fees]),
            (State.FINALIZED, 0.2, [act.return_bond_if_any]),
            (State.REJECTED, 0.5, [act.deactivate_once]),
        ]
        return actions + [
            (state, 0.3, [act.cancel_unresolved]) for state in State if state is not State.FINALIZED
        ]

    async def step(self) -> None:
        """Plan and mine one block of random activity."""
        txs: list[Tx] = []
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
        await self._mine([self.actions.create_market(factory)])
        (address,) = set(self.markets) - before
        market = self.markets[address]
        await self._mine([self.actions.approve(market)])
        await self._mine([self.actions.activate(market)])
        return market

    async def uphold_a_dispute(self, market: Market, *, resolved: int, upheld: int) -> None:
        """Mine one block in which `market`, active still, is resolved as `resolved`, disputed,
        and the dispute upheld with `upheld`: an outcome only the resolution manager states."""
        act = self.actions
        await self._mine(
            [
                act.resolve(market, resolved),
                act.dispute(market),
                act.resolve_dispute(market, upheld=True, new_outcome=upheld),
            ]
        )

    async def bet(self, market: Market) -> None:
        """Mine one block holding a bet on `market`, active still (no run() since it was)."""
        await self._mine([self.actions.bet(market)])

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
