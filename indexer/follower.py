"""Follow the chain from the cursor to the head, one committed batch per block range.

Deep ranges (more than REORG_WINDOW blocks behind the target, the head less CONFIRMATIONS) are
taken as final and pipelined, the next fetched while one commits; tip ranges (inside the
window) are checked block by block, so a reorg is noticed before anything of the new branch is
stored. RangeBatches makes a range into a batch either way (indexer/range_batches.py);
StoredChain finds where a reorg leaves the stored chain; Startup opens the cursor (startup.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from indexer import queries
from indexer.batch import Batch
from indexer.batch_commit import save_batch
from indexer.catalog import ContractKind
from indexer.cursor import IndexerState, load_state, recent_headers
from indexer.database import Database
from indexer.errors import BlockNotFound, ReorgDuringFetch
from indexer.lease import Lease
from indexer.metrics import Metrics
from indexer.outbox import OutboxRow
from indexer.range_batches import RangeBatches
from indexer.reorg import StoredChain
from indexer.rollback import rollback
from indexer.rpc import LogRangeSizer, RpcClient
from indexer.rpc_results import BlockHeader
from indexer.sources import Sources, began_at, mark_backfilled, record_sources
from indexer.startup import Startup
from shared.memory import release_free_memory

log = structlog.get_logger()

# Called after each commit that queued publications, with the queued rows when the store
# kept them (Publisher.wake), else with none.
OnCommit = Callable[[Sequence[OutboxRow]], None]

# Most blocks fetched per tip batch (headers are fetched one by one in a JSON-RPC batch).
TIP_MAX_BLOCKS = 64
# (head, cursor) pairs remembered as looked at (Follower._replaced): behind a load balancer
# "latest" may come from backends a block or two apart, in turn.
CHECKED_HEADS = 8
# Not caught up (/ready 503) once the head was last read longer ago than this many poll
# intervals plus two RPC timeouts (a read may take one, and a retry): with every read failing
# (a node down or hanging, the RPC retries take about a minute to give up) or the loop held
# up, the head and lag said are that old.
HEAD_STALE_POLLS = 3


@dataclass(frozen=True, slots=True)
class FollowConfig:
    """Tuning of the follower (from IndexerSettings)."""

    chain_id: int
    start_block: int
    confirmations: int
    reorg_window: int
    poll_interval: float
    lease_ttl: float
    rpc_timeout: float = 10.0
    max_addresses: int = 1000
    # Events per batch to aim for, deep or tip: large enough to amortize a commit, small
    # enough to keep the process's memory flat (two batches are in memory while pipelining).
    batch_events: int = 2000

    def target(self, head: int) -> int:
        """The block to index up to with the chain at `head`: CONFIRMATIONS behind it."""
        return head - self.confirmations


@dataclass(frozen=True, slots=True)
class Backfilled:
    """What a backfill stored: events of the range asked for, markets found there that were
    not followed, and the events of every market announced there from the range's end to the
    cursor."""

    events: int
    markets: int  # found, not followed before
    announced: int  # followed markets created in the range, those found included
    later_events: int
    cursor: int


class Follower:
    """Indexes [cursor+1, head - confirmations] and keeps going; see the module docstring."""

    def __init__(
        self,
        *,
        rpc: RpcClient,
        db: Database,
        lease: Lease,
        sources: Sources,
        config: FollowConfig,
        sizer: LogRangeSizer,
        metrics: Metrics,
        on_commit: OnCommit = lambda rows: None,
    ) -> None:
        self._rpc = rpc
        self._db = db
        self._lease = lease
        self._sources = sources
        self._config = config
        self._metrics = metrics
        self._on_commit = on_commit
        self._chain = StoredChain(rpc, reorg_window=config.reorg_window)
        self._static = sources.static_kinds()
        self._ranges = RangeBatches(
            rpc,
            sizer,
            self._chain,
            static=self._static,
            max_addresses=config.max_addresses,
            batch_events=config.batch_events,
            reorg_window=config.reorg_window,
            metrics=metrics,
        )
        self._startup = Startup(rpc, db, lease, self._chain, config=config)
        self._state: IndexerState | None = None
        self._bulk_done = False  # a catch-up ran since the follower was last idle
        self.head = -1
        # Whether prepare() (or settle()) found the cursor canonical or rolled back onto a
        # block that is; False while a reorg at start-up is still to be looked at again.
        self.settled = False
        self._head_read_at = 0.0  # loop time of the last look at the head
        # (head hash, cursor hash) pairs whose head's branch was found to hold the cursor's
        # block (_replaced), oldest first: not asked again.
        self._checked: dict[tuple[str, str], None] = {}

    @property
    def cursor(self) -> int:
        assert self._state is not None
        return self._state.block_number

    @property
    def began(self) -> int:
        """The block the database began at (sources.began_at): nothing below it is indexed."""
        assert self._chain.began is not None
        return self._chain.began

    @property
    def prepared(self) -> bool:
        """Whether the cursor is loaded (not while start-up waits for START_BLOCK)."""
        return self._state is not None

    @property
    def caught_up(self) -> bool:
        """Whether the cursor is at the target of a head read recently (HEAD_STALE_POLLS)."""
        config = self._config
        stale_after = HEAD_STALE_POLLS * config.poll_interval + 2 * config.rpc_timeout
        return (
            self._state is not None
            and self.head >= 0
            and time.monotonic() - self._metrics.head_read_at <= stale_after
            and self.cursor >= self._config.target(self.head)
        )

    # -- start-up ----------------------------------------------------------------------------

    async def prepare(self, *, rewind_to: int | None = None) -> None:
        """Check the chain, create or load the cursor, and handle a reorg that happened offline.

        `rewind_to` (a reindex, which rolls back to that block next): a reorg too deep to roll
        back by itself is no reason to stop when the reindex goes below it, to a block known
        to be on both branches (ReorgTooDeep.since); it is when the reindex would keep blocks
        of the replaced branch.
        """
        state, created = await self._startup.open_cursor(on_head=self._note_head)
        self._state = state
        await record_sources(
            self._db,
            self._static,
            cursor=state.block_number,
            start_block=self._config.start_block,
            created=created,
        )
        self._chain.began = await began_at(self._db, start_block=self._config.start_block)
        self._ranges.children = await self._followed_children()
        self._metrics.cursor.set(state.block_number)
        log.info("resuming", cursor=state.block_number, markets=len(self._ranges.children))
        self.settled = await self._settle(rewind_to=rewind_to)

    async def settle(self, *, attempts: int, pause: float, rewind_to: int | None = None) -> bool:
        """Look at the cursor again, up to `attempts` times `pause` apart, until it is settled.

        For the one-shot commands that write: `run` looks again at its first step, but a
        backfill storing while the cursor is unsettled would put the node's (new) branch
        beside the replaced one still stored.
        """
        for _ in range(attempts):
            if self.settled:
                break
            await asyncio.sleep(pause)
            self.settled = await self._settle(rewind_to=rewind_to)
        return self.settled

    async def _settle(self, *, rewind_to: int | None) -> bool:
        assert self._state is not None
        return await self._startup.settle(
            self._state, rewind_to=rewind_to, handle_reorg=self._handle_reorg
        )

    def _note_head(self, number: int) -> None:
        """The head just read: exported (metrics, /ready, `status`), with the lag to it."""
        self.head = number
        self._metrics.head.set(number)
        self._metrics.head_read_at = time.monotonic()
        if self._state is not None:
            self._metrics.lag.set(max(0, self._config.target(number) - self.cursor))

    async def current_target(self) -> int:
        """The block the follower would index up to now."""
        self._note_head(await self._rpc.block_number())
        return self._config.target(self.head)

    async def rewind(self, number: int) -> int:
        """Roll back to block `number` as a reorg would (for `reindex`); returns events removed.

        Below where the database began, the database begins at the block after it since
        (indexer/rollback.py), as the reindex indexes it from there.
        """
        assert self._state is not None
        if number >= self._state.block_number:
            return 0
        ancestor = await self._chain.header(number)
        removed = await rollback(self._db, self._lease, self._config.lease_ttl, ancestor)
        await self._reload_state()
        self._on_commit(())
        return removed

    async def _reload_state(self) -> None:
        state = await load_state(self._db)
        assert state is not None
        self._state = state
        # Moved down by a rollback below it (a reindex): the reorg handling goes by it.
        self._chain.began = await began_at(self._db, start_block=self._config.start_block)
        self._ranges.children = await self._followed_children()
        self._metrics.cursor.set(state.block_number)

    async def _followed_children(self) -> dict[str, str]:
        """The known market clones of the configured factories (a factory dropped from the
        configuration takes its markets with it)."""
        children = await queries.children(self._db)
        return {
            market: factory
            for market, factory in children.items()
            if self._static.get(factory) is ContractKind.FACTORY
        }

    # -- main loop ---------------------------------------------------------------------------

    async def follow(self, *, until: int | None = None) -> None:
        """Index forever (or until block `until` is stored). Safe to cancel at any await."""
        loop = asyncio.get_running_loop()
        while True:
            started = self._head_read_at = loop.time()
            head = await self._rpc.get_head()
            self._note_head(head.number)
            target = self._config.target(self.head)
            if until is not None:
                target = min(target, until)
            if self.cursor < target:
                await self.step(target, head)
                continue
            try:
                if await self._replaced(head):
                    await self._handle_reorg()
                    continue
            except (ReorgDuringFetch, BlockNotFound) as exc:
                await self._fetch_again(exc)
                continue
            self._metrics.lag.set(max(0, self._config.target(self.head) - self.cursor))
            if self._bulk_done:
                # Caught up after a catch-up: what its ranges held is garbage now, but the C
                # allocator keeps the pages and RSS would stay at the high-water mark.
                self._bulk_done = False
                release_free_memory()  # ~4 ms for 40 MiB, once per catch-up
            if until is not None and self.cursor >= until:
                return
            await asyncio.sleep(max(0.0, self._config.poll_interval - (loop.time() - started)))

    async def _replaced(self, head: BlockHeader) -> bool:
        """True when another block took the cursor's height without the chain growing past
        the cursor's target: the head is at the cursor's height and another block; or, with
        CONFIRMATIONS, the branch of the head (as long as the old one, or shorter) holds
        another block there. Otherwise only the next block indexed would show it, by its
        parent, and a chain that stops never gives one.

        The head's branch is read down to the cursor, linked header by header, once per new
        head (and cursor): a backend on the old branch cannot answer for it, and a look that
        failed is made again at the next poll. Not for a head further above the cursor than
        CONFIRMATIONS: the target was held below it (a reindex's `until`), and the next
        range, by its parent, shows a reorg there.

        A head below the cursor is not taken as a reorg: a lagging endpoint behind a load
        balancer reports that too; a real shorter branch shows at the next block by its parent.
        """
        assert self._state is not None
        cursor, cursor_hash = self._state.block_number, self._state.block_hash
        if head.number <= cursor:
            return head.number == cursor and head.hash != cursor_hash
        checked = (head.hash, cursor_hash)
        if head.number - cursor > self._config.confirmations or checked in self._checked:
            return False
        if await self._chain.replaced_under(head, cursor, cursor_hash):
            return True
        self._checked[checked] = None
        if len(self._checked) > CHECKED_HEADS:
            del self._checked[next(iter(self._checked))]
        return False

    async def step(self, target: int, head: BlockHeader | None = None) -> None:
        """Index towards `target`: pipelined deep ranges, or one tip range (or a reorg).

        `head`: the newest header, just fetched; a tip range ending there reuses it.
        """
        first = self.cursor + 1
        # Counted from the head less CONFIRMATIONS, as the search for a reorg's ancestor
        # counts from the cursor: the last REORG_WINDOW blocks indexed go through tip ranges,
        # which store every header. From the head, a catch-up left CONFIRMATIONS of them in a
        # deep range without headers, and a reorg inside the window looked too deep. (A
        # reindex's `until` lowers `target` only, as it always did.)
        deep_end = min(target, self._config.target(self.head) - self._config.reorg_window)
        try:
            if first <= deep_end:
                # Deep ranges are not checked block by block, so first the link to what is
                # stored: the cursor's block may have been replaced since the last poll, by
                # a reorg the chain has since outgrown by more than the window.
                assert self._state is not None
                if await self._chain.replaced(self._state.block_number, self._state.block_hash):
                    await self._handle_reorg()
                    return
                await self._catch_up(deep_end)
                self._bulk_done = True
            else:
                last = min(first + TIP_MAX_BLOCKS - 1, self._ranges.batch_end(first, target))
                await self._index_tip(first, last, head)
        except (ReorgDuringFetch, BlockNotFound) as exc:
            await self._fetch_again(exc)

    async def _fetch_again(self, exc: ReorgDuringFetch | BlockNotFound) -> None:
        """The chain moved under us between two calls, or the node that answered is behind the
        one that gave the head (a load balancer), or a tip block's bloom names logs the node
        has not given yet (LogsNotIndexed): the next step sees either settled."""
        log.info("range changed or incomplete, fetching again", reason=str(exc))
        self._metrics.fetch_retries.inc()
        await asyncio.sleep(min(self._config.poll_interval, 0.5))

    async def backfill(self, first: int, last: int) -> Backfilled:
        """Fetch an already indexed range again and store what is missing; the cursor stays.

        Markets announced in the range get their events after `last` too, up to the cursor:
        following the chain went on without those that were not followed (a factory added to
        the configuration later, or an announcement missing), and what is already stored of
        the others is skipped.

        Not below where the database began: the reorg handling trusts the block before it as
        an ancestor, and would keep events stored below it when a reorg replaced them.
        """
        assert self._state is not None
        cursor = self._state.block_number
        if last > cursor:
            raise ValueError(f"block {last} is above the cursor {cursor}")
        if first < self.began:
            raise ValueError(f"block {first} is below block {self.began}, where the database began")
        known = set(self._ranges.children)
        stored = await self._backfill_ranges(first, last)
        found = self._ranges.children.keys() - known
        # Every market announced in the range, not only those this run found: a backfill
        # stopped after committing a found market but before its later events is not told
        # by the markets table which markets were complete, and run again it finds none.
        announced = [
            market
            for market in await queries.markets_created_between(self._db, first, last)
            if market in self._ranges.children
        ]
        later = 0
        if announced and last < cursor:
            later = await self._backfill_ranges(last + 1, cursor, addresses=announced)
        await mark_backfilled(self._db, first, last)
        return Backfilled(
            events=stored,
            markets=len(found),
            announced=len(announced),
            later_events=later,
            cursor=cursor,
        )

    async def _backfill_ranges(
        self, first: int, last: int, *, addresses: Sequence[str] | None = None
    ) -> int:
        """Store what is missing of [first, last], of `addresses` only if given; returns the
        events stored. Range by range like catch-up: memory stays bounded and every commit
        renews the lease."""
        stored = 0
        start = first
        while start <= last:
            end = self._ranges.batch_end(start, last)
            # What is stored is left out before the headers are fetched: a repair of a long
            # range then costs the node about the logs alone.
            known = await queries.stored_positions(self._db, start, end)
            batch = await self._ranges.deep(start, end, addresses=addresses, stored=known)
            stored += await self._save(batch)
            start = end + 1
        return stored

    async def _catch_up(self, deep_end: int) -> None:
        """Index final ranges up to `deep_end`, fetching the next range while one commits.

        Fetching and decoding are this process's work and committing is mostly Postgres's, so
        overlapping them keeps both busy. Ranges are sized to about `batch_events` events,
        which bounds memory whatever the density of the chain.
        """
        assert self._state is not None
        first = self.cursor + 1
        batch: Batch | None = await self._ranges.deep(
            first, self._ranges.batch_end(first, deep_end), extends=self._state.block_hash
        )
        while batch is not None:
            assert batch.cursor is not None
            following = batch.cursor.number + 1
            if following > deep_end:
                await self._save(batch)
                return
            # return_exceptions: a failed fetch must not cancel a commit in flight, and the
            # commit's own failure is the one to report first.
            saved, upcoming, looked = await asyncio.gather(
                self._save(batch),
                self._ranges.deep(
                    following,
                    self._ranges.batch_end(following, deep_end),
                    extends=batch.cursor.hash,
                ),
                self._look_at_head(),
                return_exceptions=True,
            )
            for outcome in (saved, upcoming, looked):
                if isinstance(outcome, BaseException):
                    raise outcome
            assert isinstance(upcoming, Batch)
            batch = upcoming

    async def _look_at_head(self) -> None:
        """During a catch-up, read the head again once a poll interval has passed, beside the
        batches' work: the head and lag reported (metrics, /ready, `status`) would otherwise
        stay where the catch-up began, and a catch-up longer than the alert's 15 minutes would
        look like a provider stuck on an old head (KektechIndexerHeadStalled)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._head_read_at < self._config.poll_interval:
            return
        self._head_read_at = loop.time()
        self._note_head(await self._rpc.block_number())

    async def _index_tip(self, first: int, last: int, head: BlockHeader | None) -> None:
        assert self._state is not None
        batch = await self._ranges.tip(first, last, head, extends=self._state.block_hash)
        if batch is None:  # the range does not extend the cursor
            await self._handle_reorg()
            return
        await self._save(batch)

    async def _save(self, batch: Batch) -> int:
        """Commit a batch; returns how many of its events were new."""
        with self._metrics.batch_seconds.time():
            saved = await save_batch(self._db, self._lease, self._config.lease_ttl, batch)
        fresh = saved.fresh
        if fresh:
            self._on_commit(saved.outbox or ())
        if batch.cursor is None:
            return len(fresh)
        assert self._state is not None
        self._state = IndexerState(
            chain_id=self._state.chain_id,
            block_number=batch.cursor.number,
            block_hash=batch.cursor.hash,
            last_seq=self._state.last_seq,
        )
        self._metrics.record_batch(
            last=batch.cursor.number, fresh=fresh, target=self._config.target(self.head)
        )
        # A unit of work worth a line when it stored something; empty blocks stay quiet.
        (log.info if fresh else log.debug)(
            "batch indexed", last=batch.cursor.number, events=len(fresh)
        )
        return len(fresh)

    # -- reorgs ------------------------------------------------------------------------------

    async def _handle_reorg(self) -> None:
        """Roll back to the newest stored block that is still canonical, or halt if too deep
        (ReorgTooDeep; ReorgDuringFetch when nothing was replaced after all: StoredChain)."""
        assert self._state is not None
        # Every header pruning keeps: those below the window only name the block to reindex
        # from when the reorg is too deep.
        stored = await recent_headers(self._db, 2 * self._config.reorg_window + 1)
        cursor = self._state.block_number
        ancestor = await self._chain.ancestor(cursor, self._state.block_hash, stored)
        depth = cursor - ancestor.number
        removed = await rollback(self._db, self._lease, self._config.lease_ttl, ancestor)
        await self._reload_state()
        self._metrics.reorgs.inc()
        self._metrics.reorg_depth.observe(depth)
        log.warning("reorg rolled back", depth=depth, ancestor=ancestor.number, removed=removed)
        self._on_commit(())
