"""Where the follower starts: the chain checked, the cursor loaded or created, and a reorg that
happened while the indexer was down looked at (Follower.prepare and Follower.settle).

The follower keeps the cursor: Startup reads or creates it and hands it over, and a reorg found
here is rolled back by the follower's own reorg handling, which reloads it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from indexer.cursor import IndexerState, genesis_of, init_state, load_state
from indexer.database import Database
from indexer.errors import (
    BlockNotFound,
    ChainIdMismatch,
    ReorgDuringFetch,
    ReorgTooDeep,
)
from indexer.lease import Lease
from indexer.reorg import StoredChain
from indexer.rpc import RpcClient
from indexer.rpc_results import BlockHeader

if TYPE_CHECKING:
    # Only for annotations: indexer.follower imports this module.
    from indexer.follower import FollowConfig

log = structlog.get_logger()


class Startup:
    """Opens the follower's cursor and tells whether it is known canonical."""

    def __init__(
        self,
        rpc: RpcClient,
        db: Database,
        lease: Lease,
        chain: StoredChain,
        *,
        config: FollowConfig,
    ) -> None:
        self._rpc = rpc
        self._db = db
        self._lease = lease
        self._chain = chain
        self._config = config

    async def open_cursor(self, *, on_head: Callable[[int], None]) -> tuple[IndexerState, bool]:
        """Check the chain and load the cursor, or create it (then True) once the chain has
        START_BLOCK; `on_head` is told each head read while waiting for it."""
        chain_id = await self._rpc.chain_id()
        if chain_id != self._config.chain_id:
            raise ChainIdMismatch(expected=self._config.chain_id, actual=chain_id)
        state = await load_state(self._db)
        created = state is None
        if state is None:
            state = await init_state(
                self._db,
                self._lease,
                self._config.lease_ttl,
                chain_id=chain_id,
                cursor=await self._wait_for_start(on_head),
            )
            log.info("cursor created", block=state.block_number)
        elif state.chain_id != chain_id:
            # The database's chain is the one found there; the node's is CHAIN_ID's (above).
            raise ChainIdMismatch(expected=chain_id, actual=state.chain_id, endpoint="the database")
        # Before anything is compared or rolled back: another chain of the same id would look
        # like a reorg, and a database younger than REORG_WINDOW would be replaced whole. Every
        # endpoint is checked before its next answer (the settling's first call, for the one in
        # use) and when failed over to: one that differs is left out, and AnotherChain stops
        # the indexer when all do.
        recorded = await genesis_of(self._db, (await self._rpc.get_block_header(0)).hash)
        self._rpc.expect_genesis(recorded)
        return state, created

    async def settle(
        self,
        state: IndexerState,
        *,
        rewind_to: int | None,
        handle_reorg: Callable[[], Awaitable[None]],
    ) -> bool:
        """Handle a reorg that happened offline (by `handle_reorg`, the follower's); whether the
        cursor is now known canonical (checked, rolled back onto a block that is, or to be
        rolled back by the reindex)."""
        try:
            replaced = await self._chain.replaced(state.block_number, state.block_hash)
        except BlockNotFound:
            # A shorter chain now, or a node behind the others: either shows once the chain
            # reaches the cursor again (by the hash there, or by the next block's parent).
            log.warning(
                "the node has no block at the cursor yet; waiting for the chain to reach it",
                cursor=state.block_number,
            )
            return False
        if not replaced:
            return True
        try:
            await handle_reorg()
        except (ReorgDuringFetch, BlockNotFound) as exc:  # `run`'s first step looks again
            log.warning("the reorg at start-up is looked at again", reason=str(exc))
            return False
        except ReorgTooDeep as exc:
            if rewind_to is None or rewind_to >= exc.since:
                raise
            log.warning(
                "reorg deeper than REORG_WINDOW at start-up: rolled back by the reindex",
                cursor=exc.cursor,
                ancestor=exc.ancestor,
                rewind_to=rewind_to,
            )
        return True

    async def _wait_for_start(self, on_head: Callable[[int], None]) -> BlockHeader:
        """The block before START_BLOCK, once the chain has it CONFIRMATIONS deep, as any block
        indexed: a START_BLOCK beyond the head (a node still syncing, a deployment to come) is
        waited for, not a reason to exit."""
        before = self._config.start_block - 1
        announced = False
        while True:
            # Told while waiting too: a leader whose head gauge never moves looks like a stuck
            # provider (KektechIndexerHeadStalled), and /ready would say head -1.
            head = await self._rpc.block_number()
            on_head(head)
            try:
                if before < 0 or self._config.target(head) >= before:
                    return await self._chain.header(before)
            except BlockNotFound:
                pass  # a node behind the one that gave the head
            if not announced:
                log.warning(
                    "START_BLOCK is beyond the chain head (less CONFIRMATIONS): waiting for "
                    "the chain to reach START_BLOCK",
                    start_block=self._config.start_block,
                    confirmations=self._config.confirmations,
                )
                announced = True
            await asyncio.sleep(self._config.poll_interval)
