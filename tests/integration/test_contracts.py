"""The KEKTECH test contracts emit exactly the deployed contracts' events."""

from __future__ import annotations

from typing import Any

import pytest
from eth_utils.crypto import keccak

from devnet.chain import ChainError, Deployment, DevChain
from devnet.driver import ActivityDriver
from tests.reference_events import REFERENCE_EVENTS, canonical, indexed_count

EIP1167_PREFIX = "0x363d3d373d3d3d363d73"
EIP1167_SUFFIX = "5af43d82803e903d91602b57fd5bf3"


def topic0(declaration: str) -> str:
    return "0x" + keccak(text=canonical(declaration)).hex()


async def all_logs(chain: DevChain) -> list[dict[str, Any]]:
    head = await chain.block_number()
    return list(await chain.request("eth_getLogs", [{"fromBlock": "0x0", "toBlock": hex(head)}]))


def emitter_kinds(deployment: Deployment, markets: set[str]) -> dict[str, str]:
    kinds = {f: "factory" for f in deployment.factories}
    kinds[deployment.resolution_manager] = "resolution_manager"
    kinds[deployment.reward_distributor] = "reward_distributor"
    kinds.update({m: "market" for m in markets})
    return kinds


async def test_every_reference_event_is_emitted_with_its_exact_topic0(
    dev_chain: DevChain, deployment: Deployment
) -> None:
    """Each reference signature's keccak appears as topic0 of a log from the right contract."""
    driver = ActivityDriver(dev_chain, deployment, seed=1)
    await driver.cover_all_events()
    kinds = emitter_kinds(deployment, set(driver.markets))
    seen: dict[tuple[str, str], int] = {}
    templates = {deployment.template, deployment.template_legacy}
    for log in await all_logs(dev_chain):
        if log["address"].lower() in templates:
            continue  # templates only log OpenZeppelin's "initializers disabled" marker
        kind = kinds[log["address"].lower()]
        key = (kind, log["topics"][0])
        seen[key] = len(log["topics"]) - 1
    missing = []
    for kind, declarations in REFERENCE_EVENTS.items():
        for declaration in declarations:
            topics = seen.get((kind, topic0(declaration)))
            if topics is None:
                missing.append(f"{kind}: {canonical(declaration)}")
            else:
                assert topics == indexed_count(declaration), declaration
    assert missing == []
    expected = {(k, topic0(d)) for k, ds in REFERENCE_EVENTS.items() for d in ds}
    assert set(seen) <= expected, "the contracts emit an event the reference does not list"


async def test_market_creation_logs_come_in_the_deployed_order(
    dev_chain: DevChain, deployment: Deployment
) -> None:
    """A create transaction logs the child's events before the factory's announcement."""
    driver = ActivityDriver(dev_chain, deployment, seed=2)
    await dev_chain.send(
        sender=dev_chain.accounts[1],
        to=deployment.factory_v2,
        data=driver.actions.create_market(deployment.factory_v2).data,
    )
    block = await dev_chain.mine()
    (receipt,) = block["receipts"]
    factory_events = dict(zip(("factory", "market"), REFERENCE_EVENTS.values(), strict=False))
    names = {topic0(d): canonical(d).split("(")[0] for ds in factory_events.values() for d in ds}
    order = [(log["address"].lower(), names[log["topics"][0]]) for log in receipt["logs"]]
    market = "0x" + receipt["logs"][-1]["topics"][1][-40:]
    assert order == [
        (market, "MarketStateChanged"),
        (market, "Initialized"),
        (deployment.factory_v2, "MarketProposed"),
        (deployment.factory_v2, "MarketCreated"),
    ]
    state_topic = receipt["logs"][0]["topics"][1]
    assert int(state_topic, 16) == 0  # PROPOSED
    assert int(receipt["logs"][1]["data"], 16) == 1  # Initialized(1)


async def test_markets_are_eip1167_clones_of_the_template(
    dev_chain: DevChain, deployment: Deployment
) -> None:
    """Each market's runtime code is the 45-byte minimal proxy pointing at its template."""
    driver = ActivityDriver(dev_chain, deployment, seed=3)
    await driver.cover_all_events()
    templates = {
        deployment.factory_v1: deployment.template_legacy,
        deployment.factory_v2: deployment.template,
    }
    for market in driver.markets.values():
        code = await dev_chain.request("eth_getCode", [market.address, "latest"])
        assert code == EIP1167_PREFIX + templates[market.factory][2:] + EIP1167_SUFFIX


async def test_legacy_markets_emit_no_state_machine_events(
    dev_chain: DevChain, deployment: Deployment
) -> None:
    """Markets of the v1 factory's legacy template never emit MarketStateChanged."""
    driver = ActivityDriver(dev_chain, deployment, seed=4)
    await driver.cover_all_events()
    state_changed = topic0("MarketStateChanged(uint8 indexed newState, uint256 timestamp)")
    emitters = {
        log["address"].lower()
        for log in await all_logs(dev_chain)
        if log["topics"][0] == state_changed
    }
    legacy = {m.address for m in driver.markets.values() if m.factory == deployment.factory_v1}
    assert legacy, "the coverage script creates at least one legacy market"
    assert emitters.isdisjoint(legacy)
    assert emitters, "current-template markets do emit it"


async def test_a_cancelled_market_keeps_its_state_and_refunds_its_bettors(
    dev_chain: DevChain, deployment: Deployment
) -> None:
    """cancelMarket() logs MarketResolved(CANCELLED) alone and leaves the state; the market then
    refuses resolution and bets, and gives each bettor their stake back."""
    driver = ActivityDriver(dev_chain, deployment, seed=6)
    views, manager = dev_chain.contract("PredictionMarket"), dev_chain.contract("ResolutionManager")
    admin, rm = dev_chain.accounts[0], deployment.resolution_manager
    for factory in deployment.factories:
        market = await driver.active_market(factory)
        await driver.bet(market)
        cancel = manager.encode_abi("cancelMarket", [market.address])
        await dev_chain.send(sender=admin, to=rm, data=cancel)
        (receipt,) = (await dev_chain.mine())["receipts"]
        (log,) = receipt["logs"]
        assert log["address"].lower() == market.address
        assert log["topics"][0] == topic0(
            "MarketResolved(uint8 indexed result, address indexed resolver, uint256 timestamp)"
        )
        assert int(log["topics"][1], 16) == 3  # CANCELLED
        assert "0x" + log["topics"][2][-40:] == admin
        for view, value in (("state", 2), ("outcome", 3), ("cancelled", 1)):  # ACTIVE, CANCELLED
            data = views.encode_abi(view)
            assert int(await dev_chain.call(to=market.address, data=data), 16) == value
        refused = (
            (rm, manager.encode_abi("resolveMarket", [market.address, 1]), 0),
            (rm, cancel, 0),
            (market.address, views.encode_abi("placeBet", [1]), 1),
        )
        for to, data, value in refused:
            await dev_chain.send(sender=admin, to=to, data=data, value=value)
            with pytest.raises(ChainError, match="reverted"):
                await dev_chain.mine()
        ((bettor, _), stake) = next(iter(market.stakes.items()))
        claim = views.encode_abi("claimWinnings")
        await dev_chain.send(sender=bettor, to=market.address, data=claim)
        (receipt,) = (await dev_chain.mine())["receipts"]
        (claimed,) = receipt["logs"]
        assert int(claimed["data"][2:66], 16) == stake  # WinningsClaimed(bettor, amount, ts)
