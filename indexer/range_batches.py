"""Block ranges made into batches: fetched, linked to what precedes them, and decoded.

Two ways to fetch a range:
- deep ranges (more than REORG_WINDOW blocks behind the target, the head less CONFIRMATIONS)
  are taken as final: logs in adaptive chunks, headers only for blocks that have logs (their
  time) and for the range end (the cursor);
- tip ranges (inside the window) fetch every header and check the parent-hash chain from the
  cursor, so a reorg is noticed before anything of the new branch is stored; a block the node
  gave no logs of while its bloom names them is fetched again for a while (tip_blooms.py).

A range's logs come from RangeLogs (the markets created inside it included), its events from
RangeDecoder. Ranges are sized to about BATCH_EVENTS events from the density seen so far.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence

from indexer.batch import Batch
from indexer.catalog import ContractKind
from indexer.errors import ReorgDuringFetch, RpcUnavailable
from indexer.metrics import Metrics
from indexer.range_events import RangeDecoder
from indexer.range_logs import GatheredRange, RangeLogs
from indexer.reorg import StoredChain, check_linked
from indexer.rpc import LogRangeSizer, RpcClient
from indexer.rpc_results import BlockHeader
from indexer.tip_blooms import TipBlooms

# Assumed events per block before the first range is seen: starts small on a dense chain.
INITIAL_DENSITY = 40.0


class RangeBatches:
    """Makes block ranges into batches; knows the market clones followed (`children`)."""

    def __init__(
        self,
        rpc: RpcClient,
        sizer: LogRangeSizer,
        chain: StoredChain,
        *,
        static: Mapping[str, ContractKind],
        max_addresses: int,
        batch_events: int,
        reorg_window: int,
        metrics: Metrics,
    ) -> None:
        self._rpc = rpc
        self._sizer = sizer
        self._chain = chain
        self._static = static
        self._batch_events = batch_events
        self._reorg_window = reorg_window
        self._logs = RangeLogs(rpc, sizer, static=static, max_addresses=max_addresses)
        self._decoder = RangeDecoder(metrics)
        self._blooms = TipBlooms(metrics)
        # Market clone -> its factory: the follower sets it from the database, each batch adds
        # the clones created in its range.
        self.children: dict[str, str] = {}
        self._density = INITIAL_DENSITY

    def _note_density(self, logs: int, first: int, last: int) -> None:
        """Smooth the events per block seen so far: it sizes the next range."""
        self._density = (self._density + max(logs, 1) / (last - first + 1)) / 2

    def batch_end(self, first: int, deep_end: int) -> int:
        blocks = max(1, min(self._sizer.maximum, int(self._batch_events / self._density)))
        return min(deep_end, first + blocks - 1)

    async def deep(
        self,
        first: int,
        last: int,
        *,
        extends: str | None = None,
        addresses: Sequence[str] | None = None,
        stored: Container[tuple[int, int]] = (),
    ) -> Batch:
        """A range below the reorg window. `extends`: the hash of the block before `first`
        (the stored cursor, or the range before) when the range moves the cursor; its first
        block must link to it, as the one check that a replaced cursor was not missed (a
        backend still on the old branch may have answered the check of the cursor itself).
        `addresses` (a backfill of markets only): the contracts to fetch, instead of all.
        `stored` (a backfill): the (block, log index) of logs already stored, left out before
        their blocks' headers are fetched (the markets they announce are still found).

        The range's end is read before its logs and again after them: the same block both
        times, the logs are of its branch. A reorg that came between the logs' calls (the
        static contracts', the markets') would leave a block with no log on the old branch
        and one on the new one stored as empty, and the headers read after it would not
        show it: only the blocks with logs have theirs checked."""
        end = await self._rpc.get_block_header(last)
        gathered = await self._logs.gather(first, last, followed=self.children, addresses=addresses)
        if stored:
            gathered.logs = [
                lg for lg in gathered.logs if (lg.block_number, lg.log_index) not in stored
            ]
        blocks = sorted({lg.block_number for lg in gathered.logs} | {first, last})
        headers = {h.number: h for h in await self._rpc.get_block_headers(blocks)}
        if headers[last].hash != end.hash:
            raise ReorgDuringFetch(f"block {last} was replaced while the range was read")
        self._note_density(len(gathered.logs), first, last)
        if extends is None:  # a backfill: the cursor stays
            return self._batch(gathered, headers, stored_headers=[], cursor=None)
        if headers[first].parent_hash != extends:
            raise ReorgDuringFetch(f"block {first} does not extend block {first - 1} as stored")
        return self._batch(
            gathered, headers, stored_headers=[headers[last]], cursor=headers[last], extends=extends
        )

    async def tip(
        self, first: int, last: int, head: BlockHeader | None, *, extends: str
    ) -> Batch | None:
        """A range inside the reorg window, every header fetched and linked; None when its first
        block does not extend `extends` (the stored cursor's hash): a reorg to handle.

        `head`: the newest header, just fetched; a range ending there reuses it."""
        # Following the chain, the range is usually just the head: no second request for it.
        # The links checked below hold whichever request returned a header.
        if head is not None and head.number == last:
            fetched = [*await self._rpc.get_block_headers(range(first, last)), head]
        else:
            fetched = await self._rpc.get_block_headers(range(first, last + 1))
        if fetched[0].parent_hash != extends:
            return None
        check_linked(fetched)
        # By block hash at the tip: a backend behind the head must not answer "no logs".
        try:
            gathered = await self._logs.gather(first, last, followed=self.children, tip=fetched)
        except RpcUnavailable as exc:
            # "unknown block" (or no header) to the end of the retries: lagging backends catch
            # up within them, but a block replaced since its header was read is gone for good.
            if await self._chain.canonical(fetched[-1]):
                raise
            raise ReorgDuringFetch(f"block {last} was replaced before its logs were read") from exc
        # The header proves the block, not its logs: a node may index them a little later.
        self._blooms.check(fetched, gathered.logs, (self._static, self.children, gathered.children))
        self._note_density(len(gathered.logs), first, last)
        headers = {h.number: h for h in fetched}
        return self._batch(
            gathered, headers, stored_headers=fetched, cursor=fetched[-1], extends=extends
        )

    def _kind(self, address: str, gathered: GatheredRange) -> ContractKind:
        """The kind of a log's emitter: each log of a range comes from a contract it tracks."""
        kind = self._static.get(address)
        if kind is not None:
            return kind
        if address in self.children or address in gathered.children:
            return ContractKind.MARKET
        raise KeyError(f"log from {address}, a contract not tracked")

    def _batch(
        self,
        gathered: GatheredRange,
        headers: dict[int, BlockHeader],
        *,
        stored_headers: Sequence[BlockHeader],
        cursor: BlockHeader | None,
        extends: str | None = None,
    ) -> Batch:
        """Decode a gathered range into a batch; its children are followed from now on."""
        # Only the emitters of its logs: not a map of every market followed for each range.
        kinds = {lg.address: self._kind(lg.address, gathered) for lg in gathered.logs}
        events = self._decoder.events(gathered.logs, kinds, headers)
        # Known before the commit so that the next range (prepared meanwhile) asks for their
        # logs; if the commit fails the service stops and reloads them from the database.
        self.children.update(gathered.children)
        return Batch(
            events=events,
            headers=stored_headers,
            cursor=cursor,
            prune_headers_below=max(headers) - 2 * self._reorg_window,
            extends=extends,
        )
