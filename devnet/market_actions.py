"""The KEKTECH transactions the driver sends, each applying its effect to the market model."""

from __future__ import annotations

import random
from typing import Any

from eth_utils.crypto import keccak

from devnet.chain import Deployment, DevChain
from devnet.market_model import Market, MarketBook, State, Tx

WEI = 10**18
CANCELLED = 3  # the Outcome a cancellation sets
CATEGORIES = ("crypto", "sports", "politics", "tech", "culture")
SUBJECTS = ("BTC", "ETH", "BasedAI", "the Kek DAO", "a meme coin", "the home team", "GPT-7")
VERBS = ("reach a new high", "be listed", "ship", "win", "flip", "trend", "beat estimates")


class MarketActions:
    """Builds each transaction and updates the model as if it was mined."""

    def __init__(
        self, chain: DevChain, deployment: Deployment, *, book: MarketBook, rng: random.Random
    ) -> None:
        self.deployment = deployment
        self.rng = rng
        self.admin = chain.accounts[0]
        self.users = chain.accounts[1:]
        self._book = book
        self._factory = chain.contract("FlexibleMarketFactoryUnified")
        self._market = chain.contract("PredictionMarket")
        self._rm = chain.contract("ResolutionManager")
        self._rd = chain.contract("RewardDistributor")
        self._question_no = 0

    def _call(self, contract: Any, fn: str, *args: Any) -> str:
        return str(contract.encode_abi(fn, args=list(args)))

    def create_market(self, factory: str | None = None) -> Tx:
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
        return Tx(
            sender=rng.choice(self.users),
            to=factory or rng.choice(self.deployment.factories),
            data=data,
            value=rng.randint(1, 100) * WEI // 1000,
        )

    def approve(self, m: Market) -> Tx:
        self._book.move(m, State.APPROVED)
        data = self._call(self._factory, "approveMarket", m.address, self.rng.random() < 0.2)
        return Tx(self.admin, m.factory, data)

    def reject(self, m: Market) -> Tx:
        self._book.move(m, State.REJECTED)
        data = self._call(self._factory, "rejectMarket", m.address, "duplicate or unclear")
        return Tx(self.admin, m.factory, data)

    def activate(self, m: Market) -> Tx:
        self._book.move(m, State.ACTIVE)
        return Tx(self.admin, m.factory, self._call(self._factory, "activateMarket", m.address))

    def bet(self, m: Market, bettor: str | None = None, outcome: int | None = None) -> Tx:
        bettor = bettor or self.rng.choice(self.users)
        outcome = outcome or self.rng.choice((1, 2))
        amount = self.rng.randint(1, 1000) * WEI // 10_000
        key = (bettor, outcome)
        m.stakes[key] = m.stakes.get(key, 0) + amount
        m.bets[outcome] += 1
        return Tx(bettor, m.address, self._call(self._market, "placeBet", outcome), amount)

    def propose(self, m: Market, outcome: int | None = None) -> Tx:
        self._book.move(m, State.RESOLVING)
        outcome = outcome or self.rng.choice((1, 2))
        data = self._call(self._rm, "proposeResolution", m.address, outcome)
        return Tx(self.rng.choice(self.users), self.deployment.resolution_manager, data)

    def resolve(self, m: Market, outcome: int | None = None) -> Tx:
        self._book.move(m, State.RESOLVING)
        m.outcome = outcome or self.rng.choice((1, 2))
        data = self._call(self._rm, "resolveMarket", m.address, m.outcome)
        return Tx(self.admin, self.deployment.resolution_manager, data)

    def dispute(self, m: Market) -> Tx:
        self._book.move(m, State.DISPUTED)
        bond = self.rng.choice((0, WEI // 100, WEI // 10))
        m.dispute_bond += bond
        data = self._call(self._rm, "disputeResolution", m.address, "the source says otherwise")
        return Tx(self.rng.choice(self.users), self.deployment.resolution_manager, data, bond)

    def investigate(self, m: Market) -> Tx:
        data = self._call(self._rm, "investigateDispute", m.address, "checked two sources")
        return Tx(self.admin, self.deployment.resolution_manager, data)

    def resolve_dispute(
        self, m: Market, upheld: bool | None = None, new_outcome: int | None = None
    ) -> Tx:
        # Upheld or not, the resolution manager only announces it: the market is unchanged
        # (its outcome changes when it is finalized).
        if upheld is None:
            upheld = self.rng.random() < 0.5
        new_outcome = new_outcome or self.rng.choice((1, 2))
        data = self._call(self._rm, "resolveDispute", m.address, upheld, new_outcome)
        return Tx(self.admin, self.deployment.resolution_manager, data)

    def finalize(self, m: Market, outcome: int | None = None) -> Tx:
        self._book.move(m, State.FINALIZED)
        m.outcome = outcome or m.outcome or self.rng.choice((1, 2, 3))
        data = self._call(self._rm, "finalizeResolution", m.address, m.outcome)
        return Tx(self.admin, self.deployment.resolution_manager, data)

    def auto_finalize(self, m: Market) -> Tx:
        self._book.move(m, State.FINALIZED)
        m.outcome = m.outcome or self.rng.choice((1, 2))
        data = self._call(self._rm, "autoFinalize", m.address, m.outcome)
        return Tx(self.admin, self.deployment.resolution_manager, data)

    def signals(self, m: Market) -> Tx:
        agree, disagree = self.rng.randint(0, 20), self.rng.randint(0, 20)
        data = self._call(self._rm, "submitDisputeSignals", m.address, agree, disagree)
        return Tx(self.admin, self.deployment.resolution_manager, data)

    def admin_resolve(self, m: Market) -> Tx:
        """Finalize an ACTIVE, RESOLVING or DISPUTED market as CANCELLED by admin decision."""
        self._book.move(m, State.FINALIZED)
        m.outcome = CANCELLED
        data = self._call(self._rm, "adminResolve", m.address, CANCELLED, "ambiguous question")
        return Tx(self.admin, self.deployment.resolution_manager, data)

    def return_bond(self, m: Market) -> Tx:
        # Sending to the factory always fails (it has no receive function), which is how the
        # reference contracts come to emit DisputeBondTransferFailed.
        data = self._call(self._rm, "returnDisputeBond", m.address, m.factory)
        return Tx(self.admin, self.deployment.resolution_manager, data)

    def cancel(self, m: Market) -> Tx:
        self._book.buckets[m.state].remove(m)
        self._book.cancelled.add(m)
        m.cancelled = True
        m.outcome = CANCELLED
        data = self._call(self._rm, "cancelMarket", m.address)
        return Tx(self.admin, self.deployment.resolution_manager, data)

    def claim(self, m: Market) -> Tx | None:
        for (bettor, outcome), _amount in sorted(m.stakes.items()):
            winner = m.outcome == CANCELLED or outcome == m.outcome
            if winner and bettor not in m.claimed:
                m.claimed.add(bettor)
                return Tx(bettor, m.address, self._call(self._market, "claimWinnings"))
        return None

    def reward(self, m: Market) -> Tx:
        amount = self.rng.randint(1, 10**6) * 10**9
        data = self._call(self._rd, "claimReward", m.address, max(m.outcome, 1), amount)
        return Tx(self.rng.choice(self.users), self.deployment.reward_distributor, data)

    def collect_fees(self, m: Market) -> Tx:
        total = self.rng.randint(1, 10**6) * 10**12
        data = self._call(self._rd, "collectFees", m.address, total)
        return Tx(self.admin, self.deployment.reward_distributor, data)

    def creator_fees(self, m: Market) -> Tx:
        data = self._call(self._rd, "claimCreatorFees", m.address)
        return Tx(m.creator, self.deployment.reward_distributor, data)

    def treasury(self) -> Tx:
        data = self._call(
            self._rd, "withdrawTreasury", self.admin, self.rng.randint(1, 10**6) * 10**9
        )
        return Tx(self.admin, self.deployment.reward_distributor, data)

    def staker_rewards(self) -> Tx:
        staker = self.rng.choice(self.users)
        amount = self.rng.randint(1, 10**6) * 10**9
        data = self._call(self._rd, "distributeStakerRewards", staker, amount)
        return Tx(self.admin, self.deployment.reward_distributor, data)

    def fee_distribution(self) -> Tx:
        bps = [self.rng.randint(0, 1500) for _ in range(4)]
        data = self._call(self._rd, "setFeeDistribution", *bps)
        return Tx(self.admin, self.deployment.reward_distributor, data)

    def deactivate(self, m: Market) -> Tx:
        data = self._call(self._factory, "deactivateMarket", m.address, "stale market")
        return Tx(self.admin, m.factory, data)

    def refund_bond(self, m: Market) -> Tx:
        m.bond_refunded = True
        data = self._call(self._factory, "refundCreatorBond", m.address, "market closed")
        return Tx(self.admin, m.factory, data)

    def pause(self, factory: str, paused: bool) -> Tx:
        return Tx(self.admin, factory, self._call(self._factory, "setPaused", paused))

    def dispute_with_bond(self, m: Market) -> Tx:
        self._book.move(m, State.DISPUTED)
        m.dispute_bond += WEI // 100
        data = self._call(self._rm, "disputeResolution", m.address, "the source says otherwise")
        return Tx(self.users[2], self.deployment.resolution_manager, data, WEI // 100)

    def signals_flagged(self, m: Market) -> Tx:
        data = self._call(self._rm, "submitDisputeSignals", m.address, 3, 7)
        return Tx(self.admin, self.deployment.resolution_manager, data)

    def cancel_unresolved(self, m: Market) -> Tx | None:
        # A market resolved (not only proposed) has an outcome, and cancelMarket() refuses it.
        return None if m.outcome else self.cancel(m)

    def return_bond_if_any(self, m: Market) -> Tx | None:
        return self.return_bond(m) if m.dispute_bond else None

    def deactivate_once(self, m: Market) -> Tx | None:
        if m.bond_refunded:
            return None
        return self.refund_bond(m) if self.rng.random() < 0.5 else self.deactivate(m)
