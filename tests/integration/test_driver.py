"""The chain driver produces the same activity for the same seed."""

from __future__ import annotations

from typing import Any

from devnet.anvil_node import Anvil
from devnet.chain import DevChain, deploy
from devnet.driver import ActivityDriver


async def activity(seed: int) -> list[dict[str, Any]]:
    """Run the driver on a fresh chain and return every log it produced."""
    with Anvil() as anvil:
        async with DevChain(anvil.rpc_url) as chain:
            deployment = await deploy(chain)
            driver = ActivityDriver(chain, deployment, seed=seed, txs_per_block=5)
            await driver.cover_all_events()
            await driver.run(blocks=30)
            head = await chain.block_number()
            logs = await chain.request("eth_getLogs", [{"fromBlock": "0x0", "toBlock": hex(head)}])
            return list(logs)


async def test_same_seed_same_chain() -> None:
    """Two fresh chains driven with one seed end with identical logs, block hashes included."""
    first, second = await activity(seed=42), await activity(seed=42)
    assert len(first) > 200
    assert first == second


async def test_different_seed_different_activity() -> None:
    """Another seed produces different transactions."""
    first, other = await activity(seed=42), await activity(seed=43)
    assert [log["data"] for log in first] != [log["data"] for log in other]


async def test_run_stops_at_the_requested_volume(dev_chain: DevChain, anvil: Anvil) -> None:
    """`run(events=N)` mines until at least N logs were produced and reports them truthfully."""
    deployment = await deploy(dev_chain)
    driver = ActivityDriver(dev_chain, deployment, seed=5, txs_per_block=10)
    stats = await driver.run(events=500)
    head = await dev_chain.block_number()
    first = hex(deployment.block + 2)  # after the two deployment blocks
    logs = await dev_chain.request("eth_getLogs", [{"fromBlock": first, "toBlock": hex(head)}])
    assert stats.events >= 500
    assert stats.events == len(logs)
    assert stats.blocks == head - deployment.block - 1
