"""Tip blocks whose logs the node may not have indexed yet, told by their headers' blooms.

A node (or a load balancer's backend) may serve a block's header before its log index holds
the block's logs, and answer eth_getLogs for it, even by block hash, with [] meanwhile
(go-ethereum#26098 on Infura, lotus#13749): the header asked along proves the block, not its
logs. Taken as "no events", the block would be stored empty and its events lost for good.

So a tip block the node gave no tracked log of, whose bloom names a KEKTECH event (topic0)
and a tracked contract, is doubtful: its range is fetched again (LogsNotIndexed), for up to
BLOOM_GRACE seconds from when the block was first found so. Past that the bloom is taken for a
false positive and the block is stored without logs, with a warning and a count. Both
conditions, and only for a block with no log returned: with thousands of markets tracked, an
address alone would match most busy blocks' blooms.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterable, Sequence

import structlog

from indexer.bloom import bloom_number, may_contain
from indexer.catalog import catalog
from indexer.errors import LogsNotIndexed
from indexer.metrics import Metrics
from indexer.rpc_results import BlockHeader, RawLog

log = structlog.get_logger()

# Seconds a doubtful block holds its range back before its bloom is taken for a false
# positive: log indexes seen lagging caught up within a second; retries go every 0.5 s at most.
BLOOM_GRACE = 2.0


@functools.cache
def event_topics() -> frozenset[str]:
    """The topic0 of every KEKTECH event, of any contract kind."""
    return frozenset(topic0 for _, topic0 in catalog())


def names_tracked(bloom: bytes, address_groups: Iterable[Iterable[str]]) -> bool:
    """Whether a bloom allows a KEKTECH event from an address of one of `address_groups`."""
    number = bloom_number(bloom)
    # Topics first: a few dozen, where the addresses may be thousands.
    return any(may_contain(number, t) for t in event_topics()) and any(
        may_contain(number, a) for a in itertools.chain.from_iterable(address_groups)
    )


class TipBlooms:
    """Holds back tip ranges with a doubtful block, each block up to `grace` seconds."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        grace: float = BLOOM_GRACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._grace = grace
        self._clock = clock
        # Block hash -> (number, when first found doubtful). Forgotten once the cursor passes
        # the number: at most the blocks (and replaced blocks) of the ranges above the cursor.
        self._doubted: dict[str, tuple[int, float]] = {}

    def check(
        self,
        headers: Sequence[BlockHeader],
        logs: Sequence[RawLog],
        address_groups: Sequence[Iterable[str]],
    ) -> None:
        """Let a range's headers and logs through, or raise LogsNotIndexed while one of its
        blocks is doubtful and within its grace. `address_groups`: every contract tracked in
        the range, the markets it created included, in groups read only for a block without
        logs (no set of thousands of markets built for each range at the tip)."""
        self._forget(below=headers[0].number)
        returned = {lg.block_hash for lg in logs}
        doubtful = [
            h
            for h in headers
            if h.hash not in returned
            and h.logs_bloom is not None
            and names_tracked(h.logs_bloom, address_groups)
        ]
        now = self._clock()
        for h in doubtful:
            self._doubted.setdefault(h.hash, (h.number, now))
        waited = {h.hash: now - self._doubted[h.hash][1] for h in doubtful}
        pending = [h.number for h in doubtful if waited[h.hash] < self._grace]
        if pending:
            raise LogsNotIndexed(
                f"block {pending[0]}'s bloom names a tracked contract and event, but the node"
                f" gave no logs of it (its log index may lag; {len(pending)} such block(s))"
            )
        for header in doubtful:
            log.warning(
                "block stored without logs although its bloom names a tracked contract and"
                " event: taken for a bloom false positive",
                block=header.number,
                hash=header.hash,
                waited=round(waited[header.hash], 2),
            )
            self._metrics.bloom_accepted.inc()
        self._forget(below=headers[-1].number + 1)

    def _forget(self, *, below: int) -> None:
        """Drop the blocks below `below`: stored (or replaced) by now."""
        if self._doubted:
            self._doubted = {k: v for k, v in self._doubted.items() if v[0] >= below}
