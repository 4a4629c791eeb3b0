"""Exceptions the indexer raises on purpose, all rooted at IndexerError.

Names say what happened (`RpcUnavailable`, `BlockNotFound`) in the manner of websockets'
`ConnectionClosed`, hence the N818 exemptions.
"""

from __future__ import annotations

from shared.errors import KektechError

__all__ = [
    "AnotherChain",
    "BlockNotFound",
    "ChainIdMismatch",
    "DatabaseUnavailable",
    "IndexerError",
    "RpcError",
    "RpcRangeTimedOut",
    "RpcRangeTooLarge",
    "RpcResponseError",
    "RpcUnavailable",
    "WrongChainError",
]


class IndexerError(KektechError):
    """Root of every indexer error."""


class RpcError(IndexerError):
    """A JSON-RPC call gave no complete, usable answer."""


class RpcUnavailable(RpcError):  # noqa: N818
    """Every attempt of a call failed transiently and the retry budget is spent."""

    method: str
    attempts: int
    last_error: str

    def __init__(self, method: str, attempts: int, last_error: str) -> None:
        self.method = method
        self.attempts = attempts
        # A description, not the exception itself: transport errors may quote the URL and its key.
        self.last_error = last_error
        super().__init__(method, attempts, last_error)

    def __str__(self) -> str:
        tries = "1 attempt" if self.attempts == 1 else f"{self.attempts} attempts"
        return f"{self.method} failed after {tries}; last: {self.last_error}"


class RpcResponseError(RpcError):
    """The node refused a call for good, or answered with something malformed."""

    code: int | None
    message: str
    method: str

    def __init__(self, code: int | None, message: str, method: str) -> None:
        # code is the JSON-RPC error code, None when the answer itself was malformed.
        self.code = code
        self.message = message
        self.method = method
        super().__init__(code, message, method)

    def __str__(self) -> str:
        where = f"error {self.code}" if self.code is not None else "bad response"
        return f"{self.method}: {where}: {self.message}"


class RpcRangeTooLarge(RpcError):  # noqa: N818
    """The node refused an eth_getLogs range as too large: blocks, results or bytes."""

    reason: str

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    def __str__(self) -> str:
        return f"eth_getLogs range too large: {self.reason}"


class RpcRangeTimedOut(RpcRangeTooLarge):
    """An eth_getLogs range got no answer in time: too heavy, or its endpoint hangs."""


class BlockNotFound(RpcError):  # noqa: N818
    """The node does not have the block (yet): it answered null."""

    number: int

    def __init__(self, number: int) -> None:
        self.number = number
        super().__init__(number)

    def __str__(self) -> str:
        return f"block {self.number} not found"


class WrongChainError(RpcError):
    """An endpoint serves another chain than the indexed one: left out (rpc_failover).
    `expected` and `actual` are what tells the chains apart (its id, or its block 0)."""

    expected: object
    actual: object
    endpoint: str  # a redacted endpoint label (index and host), never the URL


class ChainIdMismatch(WrongChainError):  # noqa: N818
    """An endpoint serves another chain than the configured one."""

    expected: int
    actual: int
    endpoint: str

    def __init__(self, expected: int, actual: int, endpoint: str = "") -> None:
        self.expected = expected
        self.actual = actual
        # A redacted endpoint label (index and host), never the URL.
        self.endpoint = endpoint
        super().__init__(expected, actual, endpoint)

    def __str__(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"chain id {self.actual}{where}, expected {self.expected}"


class AnotherChain(WrongChainError):  # noqa: N818
    """An endpoint's block 0 (`actual`) is not that of the chain the database was indexed
    from (`expected`, recorded there)."""

    chain_id: int
    expected: str
    actual: str

    def __init__(self, chain_id: int, expected: str, actual: str, endpoint: str = "") -> None:
        self.chain_id = chain_id
        self.expected = expected
        self.actual = actual
        self.endpoint = endpoint
        super().__init__(chain_id, expected, actual, endpoint)

    def __str__(self) -> str:
        where = f" ({self.endpoint})" if self.endpoint else ""
        return (
            f"the node{where} serves another chain than the database was indexed from: its"
            f" block 0 is {self.actual}, the database's chain's is {self.expected}, both with"
            f" chain id {self.chain_id} (a testnet or fork that kept it, or a node set up again"
            " from scratch); nothing was changed. Point RPC_PROVIDER_URL at the chain the"
            " database holds, or give this chain a database of its own"
        )


class LeaseLost(IndexerError):  # noqa: N818
    """Another instance took the write lease over; this one must stop writing."""

    owner: str

    def __init__(self, owner: str) -> None:
        self.owner = owner
        super().__init__(owner)

    def __str__(self) -> str:
        return (
            f"write lease lost by {self.owner}: another indexer took it over"
            " (it went unrenewed for LEASE_TTL)"
        )


class ReorgTooDeep(IndexerError):  # noqa: N818
    """No stored block within the reorg window is still canonical: refuse to delete data.

    `ancestor`: the newest stored block still on the chain, found among the older headers
    kept (2 x REORG_WINDOW below the newest), None if none is; `since` follows from it: the
    block a `reindex` can start from knowing that nothing below it was replaced. `began`:
    the block the database began at (sources.began_at), below which nothing is stored.
    """

    cursor: int
    window: int
    ancestor: int | None
    began: int

    def __init__(self, cursor: int, window: int, ancestor: int | None, began: int) -> None:
        self.cursor = cursor
        self.window = window
        self.ancestor = ancestor
        self.began = began
        super().__init__(cursor, window, ancestor, began)

    @property
    def since(self) -> int:
        """The first block to index again: the one after `ancestor`, or where the database
        began (not START_BLOCK, which may have been changed since)."""
        return self.began if self.ancestor is None else self.ancestor + 1

    def __str__(self) -> str:
        if self.ancestor is None:
            found = (
                "no stored block is still on the chain, so the fork cannot be placed above"
                f" block {self.began}, where the database began"
            )
        else:
            found = f"block {self.ancestor} is the newest stored block still on the chain"
        return (
            f"reorg deeper than REORG_WINDOW={self.window} blocks below block {self.cursor}: "
            f"{found}; stopping without deleting anything. Check the RPC endpoint (a node on "
            "another branch looks the same), then run "
            f"`cd /opt/kektech && .venv/bin/python -m indexer reindex --from {self.since}`: it "
            f"rolls back every block from {self.since} on, queueing removal notices for their "
            "events, and indexes the chain again from there"
        )


class ReorgDuringFetch(IndexerError):  # noqa: N818
    """The chain changed between two calls of one range; the range is fetched again."""


class LogsNotIndexed(ReorgDuringFetch):
    """A tip block's header came with no tracked log although its bloom names a tracked
    contract and a KEKTECH event: the node's log index may lag its headers (it serves a
    block before its logs), so the range is fetched again, as when the chain moved."""


class StoreError(IndexerError):
    """The database refused or lost an operation the indexer could not complete."""


class CursorMoved(StoreError):  # noqa: N818
    """The stored cursor is not the block a batch follows on from: the database lost commits
    it had acknowledged (a failover to a replica behind, a restore), and writing the batch
    would leave the blocks between unindexed for good."""

    def __init__(self, stored: int, stored_hash: str, follows: str) -> None:
        self.stored, self.stored_hash, self.follows = stored, stored_hash, follows
        super().__init__(stored, stored_hash, follows)

    def __str__(self) -> str:
        return (
            f"the database's cursor is block {self.stored} ({self.stored_hash}), not the block"
            f" {self.follows} this indexer stored last: the database lost commits it had"
            " acknowledged (a failover, a restore); restarted, the indexer resumes from the"
            " database's cursor (PM2 restarts it)"
        )


class DatabaseUnavailable(StoreError):  # noqa: N818
    """The database cannot be reached, or refuses connections for now (starting up, full)."""
