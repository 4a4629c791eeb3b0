"""The fetch-only floor: the logs and headers the indexer needs, fetched with its own RPC layer.

Nothing is decoded, stored or published. It is measured with the indexer's own settings
(range sizer, address chunking, timeout, batching), built from the same environment the
indexer gets, but not in the indexer's requests: the markets are found before the timed
passes, and a pass fetches each address chunk over the whole chain in ranges as long as the
sizer allows, where the indexer asks range by range of about BATCH_EVENTS events (plus a
request for the markets created in each) and the last REORG_WINDOW blocks block by block by
hash. See bench/README.md, step 2.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from indexer.catalog import MARKET_CREATED
from indexer.decoding import announced_market
from indexer.rpc import RawLog, RpcClient, fetch_logs
from indexer.service import log_range_sizer, rpc_client
from shared.indexer_settings import IndexerSettings


@dataclass(frozen=True, slots=True)
class Floor:
    """Fetch-only timings for the whole indexed range."""

    seconds: tuple[float, ...]  # one per repetition
    logs: int
    blocks_with_logs: int
    addresses: int
    markets: int

    @property
    def best(self) -> float:
        return min(self.seconds)


def tracked_static(settings: IndexerSettings) -> list[str]:
    """Factories, resolution manager and reward distributor (what the indexer starts with)."""
    static = list(settings.market_factory_address)
    static += [a for a in (settings.resolution_manager_address,) if a]
    static += [a for a in (settings.reward_distributor_address,) if a]
    return static


async def market_addresses(rpc: RpcClient, settings: IndexerSettings, head: int) -> list[str]:
    """Every market clone announced by the factories' MarketCreated logs up to `head`."""
    created = await fetch_logs(
        rpc,
        log_range_sizer(settings),  # a fresh one per pass, as a started indexer has
        from_block=settings.start_block,
        to_block=head,
        addresses=list(settings.market_factory_address),
        topics=[MARKET_CREATED.topic0],
    )
    announced = (announced_market(lg.topics, lg.data) for lg in created)
    return list(dict.fromkeys(a for a in announced if a is not None))


async def _fetch_all(
    rpc: RpcClient, settings: IndexerSettings, head: int, addresses: Sequence[str]
) -> tuple[list[RawLog], int]:
    """One pass: every tracked log plus the headers of the blocks that have logs."""
    sizer = log_range_sizer(settings)
    step = settings.logs_max_addresses
    logs: list[RawLog] = []
    for start in range(0, len(addresses), step):
        logs += await fetch_logs(
            rpc,
            sizer,
            from_block=settings.start_block,
            to_block=head,
            addresses=addresses[start : start + step],
        )
    with_logs = {lg.block_number for lg in logs}
    # The indexer also needs the header of the range end: it becomes the cursor.
    await rpc.get_block_headers(sorted(with_logs | {head}))
    return logs, len(with_logs)


async def measure_floor(settings: IndexerSettings, *, head: int, repeats: int) -> Floor:
    """Time `repeats` full fetch passes over [START_BLOCK, head]; the addresses are found first."""
    async with rpc_client(settings) as rpc:
        markets = await market_addresses(rpc, settings, head)
        addresses = [*tracked_static(settings), *markets]
        timings: list[float] = []
        count = blocks = 0
        for _ in range(repeats):
            started = time.perf_counter()
            logs, blocks = await _fetch_all(rpc, settings, head, addresses)
            timings.append(time.perf_counter() - started)
            count = len(logs)
            del logs
    return Floor(
        seconds=tuple(timings),
        logs=count,
        blocks_with_logs=blocks,
        addresses=len(addresses),
        markets=len(markets),
    )
