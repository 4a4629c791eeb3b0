"""Which stored blocks the chain still has: where a reorg leaves the indexed chain.

The follower stores the headers of the last 2 * REORG_WINDOW blocks it indexed. When the chain
replaced some of them, the rollback goes to the newest one still canonical (the common
ancestor), searched within the window only: a reorg deeper than that stops the indexer
instead of deleting data (ReorgTooDeep), with the block a reindex can start from. The bottom
of the stored chain is where the database began (sources.began_at), not START_BLOCK, which
an operator may have changed since.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from indexer.errors import ReorgDuringFetch, ReorgTooDeep
from indexer.rpc import RpcClient
from indexer.rpc_results import BlockHeader

ZERO_HASH = "0x" + "00" * 32


def check_linked(headers: Sequence[BlockHeader]) -> None:
    """ReorgDuringFetch unless each header (in block order) is the parent of the next: read
    by number, they may come from different branches (the chain moved between the reads, or
    backends behind a load balancer disagree)."""
    for parent, child in itertools.pairwise(headers):
        if child.parent_hash != parent.hash:
            raise ReorgDuringFetch(f"block {child.number} does not extend {parent.number}")


class StoredChain:
    """Checks stored headers against what the node has now."""

    def __init__(self, rpc: RpcClient, *, reorg_window: int) -> None:
        self._rpc = rpc
        self._window = reorg_window
        # The block the database began at: set by the follower once it has read the database.
        self.began: int | None = None

    async def header(self, number: int) -> BlockHeader:
        """The header of block `number`, or the virtual parent of block 0 for -1."""
        if number < 0:
            return BlockHeader(number=-1, hash=ZERO_HASH, parent_hash=ZERO_HASH, timestamp=0)
        return await self._rpc.get_block_header(number)

    async def canonical(self, header: BlockHeader) -> bool:
        """Whether the node's block at that height is still this one (it checks its ancestors).

        Raises BlockNotFound when the node has no block there. Every caller has seen the chain
        reach past that height, so that is a node behind another (a load balancer), not a
        shorter chain: taking it as "replaced" would retract canonical blocks.
        """
        return not await self.replaced(header.number, header.hash)

    async def replaced(self, number: int, block_hash: str) -> bool:
        """Whether the node's block at height `number` is another one than `block_hash` (a
        stored header's, or the cursor's); never for the virtual parent of block 0.

        Raises BlockNotFound when the node has no block there.
        """
        if number < 0:
            return False
        current = await self._rpc.get_block_header(number)
        return current.hash != block_hash

    async def replaced_under(self, head: BlockHeader, number: int, block_hash: str) -> bool:
        """Whether the block at height `number` on the branch of `head` (above it) is another
        one than `block_hash`. The headers from `number` up to the head are read in one
        batch and must link to it, so a backend still on another branch cannot answer for
        it; ReorgDuringFetch when they do not (asked again at the next poll).

        Raises BlockNotFound when the node has no block there.
        """
        below = await self._rpc.get_block_headers(range(number, head.number))
        check_linked([*below, head])
        return below[0].hash != block_hash

    async def ancestor(
        self, cursor: int, cursor_hash: str, stored: Sequence[BlockHeader]
    ) -> BlockHeader:
        """The block to roll back to from the cursor: the newest of the `stored` headers (every
        header kept, newest first) within the window that is still canonical.

        ReorgTooDeep when none is. ReorgDuringFetch when that block is the cursor itself,
        unchanged: the answers that showed it replaced (the head, the next block's parent) came
        from a backend on another branch than the one answering now, as behind a load
        balancer. There is nothing to roll back, and the caller asks again after a pause.
        """
        began = self.began
        assert began is not None, "a reorg looked at before the database was read"
        recent = [h for h in stored if cursor - h.number <= self._window]
        ancestor = await self._newest_kept(recent, began=began)
        if ancestor is None:
            # The headers below the window only name the block to reindex from.
            older = [h for h in stored if cursor - h.number > self._window]
            raise ReorgTooDeep(
                cursor=cursor,
                window=self._window,
                ancestor=await self._newest_canonical(older),
                began=began,
            )
        if (ancestor.number, ancestor.hash) == (cursor, cursor_hash):
            raise ReorgDuringFetch(f"block {cursor} looked replaced, yet the node still has it")
        return ancestor

    async def _newest_kept(
        self, stored: Sequence[BlockHeader], *, began: int
    ) -> BlockHeader | None:
        """The newest of these stored headers (newest first) that is still canonical.

        The block before where the database began (its first cursor; the virtual parent of
        block 0 when it began at 0) is always an ancestor, as the node has it now: nothing
        below it is stored, so a reorg that replaced it too retracts only what is above it.
        Not the block before START_BLOCK: raised since, it would take as common ancestor a
        block whose replaced predecessors still hold stored events.
        """
        for header in stored:
            if header.number < 0 or header.number == began - 1:
                return await self.header(header.number)
            if await self.canonical(header):  # not if the new branch is shorter than it
                return header
        return None

    async def _newest_canonical(self, stored: Sequence[BlockHeader]) -> int | None:
        """The newest of these stored headers (newest first) still on the chain, asked in one
        batch: only for the message of a reorg too deep, which these headers may place."""
        numbers = [h.number for h in stored if h.number >= 0]
        current = {h.number: h.hash for h in await self._rpc.get_block_headers(numbers)}
        for header in stored:
            if header.number < 0 or current[header.number] == header.hash:
                return header.number
        return None
