"""A block range's tracked logs, those of the market clones created inside it included.

Clones are discovered from the factories' `MarketCreated` within the range itself; their logs
from the creation block on are fetched before the range is handed back, so a child's events
in its creation block or transaction (which precede the announcement) are never missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from indexer.catalog import ContractKind
from indexer.decoding import announced_market
from indexer.rpc import LogRangeSizer, RpcClient, fetch_logs
from indexer.rpc_results import BlockHeader, RawLog


@dataclass
class GatheredRange:
    """The logs of one range, in chain order, and the markets it created (clone: factory)."""

    logs: list[RawLog] = field(default_factory=list)
    children: dict[str, str] = field(default_factory=dict)


async def fetch_chunked(
    rpc: RpcClient,
    sizer: LogRangeSizer,
    first: int,
    last: int,
    addresses: Sequence[str],
    *,
    max_addresses: int,
) -> list[RawLog]:
    """The logs of [first, last] from these addresses, at most max_addresses per filter
    (each chunk in ranges as long as the sizer allows), chunk after chunk."""
    logs: list[RawLog] = []
    for i in range(0, len(addresses), max_addresses):
        logs += await fetch_logs(
            rpc, sizer, from_block=first, to_block=last, addresses=addresses[i : i + max_addresses]
        )
    return logs


class RangeLogs:
    """Fetches ranges' logs for the static contracts and the markets followed."""

    def __init__(
        self,
        rpc: RpcClient,
        sizer: LogRangeSizer,
        *,
        static: Mapping[str, ContractKind],
        max_addresses: int,
    ) -> None:
        self._rpc = rpc
        self._sizer = sizer
        self._static = static
        self._max_addresses = max_addresses

    async def gather(
        self,
        first: int,
        last: int,
        *,
        followed: Collection[str],
        tip: Sequence[BlockHeader] | None = None,
        addresses: Sequence[str] | None = None,
    ) -> GatheredRange:
        """Every tracked log of the range, children created inside it included.

        `followed`: the markets already followed.
        `tip`: the range's headers, to ask for logs by block hash rather than by range.
        `addresses`: only these markets' logs (markets announce no children).
        """
        gathered = GatheredRange()
        if addresses is not None:
            gathered.logs = await self._fetch(first, last, addresses)
        else:
            addresses = [*self._static, *followed]
            gathered.logs = await self._fetch(first, last, addresses, tip=tip)
            pending = self._announced(gathered.logs, followed, gathered.children)
            while pending:
                # A child's logs start in its creation block, before the factory's announcement.
                since = min(pending.values())
                more = await self._fetch(since, last, list(pending), tip=tip)
                gathered.logs += [lg for lg in more if lg.block_number >= pending[lg.address]]
                pending = {}  # factories are static: children never create children
        # Chain order, whatever the chunks of LOGS_MAX_ADDRESSES the logs came in: seqs follow it.
        gathered.logs.sort(key=lambda lg: (lg.block_number, lg.log_index))
        return gathered

    async def _fetch(
        self,
        first: int,
        last: int,
        addresses: Sequence[str],
        *,
        tip: Sequence[BlockHeader] | None = None,
    ) -> list[RawLog]:
        step = self._max_addresses
        if tip is not None:
            chunks = [addresses[i : i + step] for i in range(0, len(addresses), step)]
            # A few blocks by hash: the chunks' requests go out together, as latency counts here.
            blocks = [h for h in tip if first <= h.number <= last]
            # return_exceptions: none is left running, and a failure keeps its own type.
            answers = await asyncio.gather(
                *(self._rpc.get_logs_at(blocks, addresses=chunk) for chunk in chunks),
                return_exceptions=True,
            )
            tip_logs: list[RawLog] = []
            for answer in answers:
                if isinstance(answer, BaseException):
                    raise answer
                tip_logs += answer
            return tip_logs
        return await fetch_chunked(
            self._rpc, self._sizer, first, last, addresses, max_addresses=step
        )

    def _announced(
        self, logs: Sequence[RawLog], followed: Collection[str], found: dict[str, str]
    ) -> dict[str, int]:
        """Add the markets announced in `logs` and not followed yet to `found`; return them
        with their creation block."""
        created: dict[str, int] = {}
        for raw in logs:
            if self._static.get(raw.address) is not ContractKind.FACTORY:
                continue
            child = announced_market(raw.topics, raw.data)
            if child is not None and child not in followed and child not in found:
                found[child] = raw.address
                created[child] = raw.block_number
        return created
