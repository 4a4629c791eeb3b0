"""JSON-RPC: the chain id and head of one provider URL, through the indexer's own client."""

from __future__ import annotations

from dataclasses import dataclass

from indexer.errors import IndexerError
from indexer.rpc import RpcClient
from indexer.rpc_transport import Endpoint
from ops.errors import ProbeError

__all__ = ["ChainInfo", "endpoint_label", "probe_rpc"]


@dataclass(frozen=True, slots=True)
class ChainInfo:
    """What one RPC URL answered."""

    chain_id: int
    head: int


def endpoint_label(index: int, url: str) -> str:
    """The URL as logs show it: "#0 host:port", never its path or query, nor a host name label
    that looks like an API key."""
    return Endpoint.from_url(index, url).label


async def probe_rpc(url: str, *, index: int, within: float) -> ChainInfo:
    """Ask one URL, the index-th of RPC_PROVIDER_URL, for eth_chainId and eth_blockNumber,
    once each (no retries, no failover)."""
    try:
        async with RpcClient([url], timeout=within, max_retries=0, first_index=index) as client:
            return ChainInfo(await client.chain_id(), await client.block_number())
    except IndexerError as exc:
        # The client's messages are redacted already: they name the endpoint by its label.
        raise ProbeError(str(exc)) from None
