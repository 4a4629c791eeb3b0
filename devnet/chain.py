"""A thin JSON-RPC session to the dev chain, plus deployment of the KEKTECH test contracts.

Everything here talks to anvil through web3's async HTTP provider. Transactions are sent from
anvil's unlocked dev accounts with `eth_sendTransaction` and explicit gas, so nothing is
estimated or signed: the driver decides what goes into each block and then mines it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import orjson
from eth_abi.abi import encode
from eth_utils.abi import function_signature_to_4byte_selector
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.types import RPCEndpoint

ARTIFACTS_DIR = Path(__file__).resolve().parent / "contracts" / "artifacts"
TX_GAS = 2_000_000
DEPLOY_GAS = 8_000_000


class ChainError(RuntimeError):
    """The dev chain refused or reverted something the driver expected to succeed."""


@functools.cache
def artifact(name: str) -> dict[str, Any]:
    """Load a compiled test contract (`abi`, `bytecode`) by contract name."""
    path = ARTIFACTS_DIR / f"{name}.json"
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise ChainError(f"missing artifact {path}; run `npm run build:contracts`") from exc
    return cast(dict[str, Any], data)


def _abi_type(param: dict[str, Any]) -> str:
    kind = str(param["type"])
    if kind.startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in param["components"])
        return f"({inner}){kind[5:]}"
    return kind


class Calldata:
    """Encodes calls and constructor arguments of one compiled contract with eth_abi."""

    def __init__(self, compiled: dict[str, Any]) -> None:
        self._bytecode = str(compiled["bytecode"])
        self._functions: dict[str, tuple[bytes, list[str]]] = {}
        self._constructor: list[str] = []
        for item in compiled["abi"]:
            types = [_abi_type(p) for p in item.get("inputs", [])]
            if item["type"] == "constructor":
                self._constructor = types
            elif item["type"] == "function":
                if item["name"] in self._functions:
                    raise ChainError(f"overloaded function {item['name']} is not supported")
                signature = f"{item['name']}({','.join(types)})"
                selector = function_signature_to_4byte_selector(signature)
                self._functions[item["name"]] = (selector, types)

    def encode_abi(self, fn: str, args: Sequence[Any] = ()) -> str:
        """0x calldata for calling `fn` with `args`."""
        selector, types = self._functions[fn]
        return "0x" + (selector + encode(types, list(args))).hex()

    def encode_abi_raw_strings(self, fn: str, args: Sequence[Any] = ()) -> str:
        """Like encode_abi, with bytes for `string` parameters: any bytes, as a contract may
        be sent, valid UTF-8 or not (the ABI encodes both the same way)."""
        selector, types = self._functions[fn]
        raw = ["bytes" if kind == "string" else kind for kind in types]
        return "0x" + (selector + encode(raw, list(args))).hex()

    def deploy_data(self, *args: Any) -> str:
        """0x creation code with encoded constructor arguments."""
        return self._bytecode + encode(self._constructor, list(args)).hex()


class DevChain:
    """An RPC session to anvil: raw requests, sending, mining and receipts."""

    def __init__(self, rpc_url: str) -> None:
        self.rpc_url = rpc_url
        self.w3 = AsyncWeb3(AsyncHTTPProvider(rpc_url, exception_retry_configuration=None))
        self._accounts: list[str] = []

    async def __aenter__(self) -> Self:
        self._accounts = [a.lower() for a in await self.request("eth_accounts", [])]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.w3.provider.disconnect()

    @property
    def accounts(self) -> list[str]:
        return self._accounts

    async def request(self, method: str, params: Sequence[Any]) -> Any:
        """Send one JSON-RPC request and return its result or raise ChainError."""
        response = await self.w3.provider.make_request(RPCEndpoint(method), list(params))
        if "error" in response:
            raise ChainError(f"{method} failed: {response['error']}")
        return response.get("result")

    def contract(self, name: str) -> Calldata:
        """A calldata encoder for the named test contract."""
        return Calldata(artifact(name))

    async def send(
        self, *, sender: str, to: str | None, data: str, value: int = 0, gas: int = TX_GAS
    ) -> str:
        """Queue a transaction from an unlocked account; returns its hash."""
        tx: dict[str, Any] = {"from": sender, "data": data, "gas": hex(gas), "value": hex(value)}
        if to is not None:
            tx["to"] = to
        return cast(str, await self.request("eth_sendTransaction", [tx]))

    async def call(self, *, to: str, data: str) -> str:
        """eth_call against the latest block; returns the 0x result."""
        return cast(str, await self.request("eth_call", [{"to": to, "data": data}, "latest"]))

    async def mine(self) -> dict[str, Any]:
        """Mine one block with everything queued and return its receipts, all checked."""
        await self.request("evm_mine", [])
        number = int(await self.request("eth_blockNumber", []), 16)
        receipts = cast(
            list[dict[str, Any]], await self.request("eth_getBlockReceipts", [hex(number)])
        )
        for receipt in receipts:
            if int(receipt["status"], 16) != 1:
                raise ChainError(f"transaction {receipt['transactionHash']} reverted")
        return {"number": number, "receipts": receipts}

    async def mine_empty(self, blocks: int = 1) -> None:
        """Mine empty blocks."""
        await self.request("anvil_mine", [hex(blocks)])

    async def block_number(self) -> int:
        return int(await self.request("eth_blockNumber", []), 16)

    async def set_automine(self, enabled: bool) -> None:
        await self.request("evm_setAutomine", [enabled])


@dataclass(frozen=True)
class Deployment:
    """Addresses of a deployed KEKTECH test system (all lowercase)."""

    chain_id: int
    factory_v1: str
    factory_v2: str
    resolution_manager: str
    reward_distributor: str
    template_legacy: str
    template: str
    block: int

    @property
    def factories(self) -> tuple[str, str]:
        return (self.factory_v1, self.factory_v2)

    def as_env(self) -> dict[str, str]:
        """The indexer settings that point at this deployment."""
        return {
            "CHAIN_ID": str(self.chain_id),
            "MARKET_FACTORY_ADDRESS": ",".join(self.factories),
            "RESOLUTION_MANAGER_ADDRESS": self.resolution_manager,
            "REWARD_DISTRIBUTOR_ADDRESS": self.reward_distributor,
            "START_BLOCK": str(self.block),
        }


async def deploy(chain: DevChain) -> Deployment:
    """Deploy templates, resolution manager, reward distributor and two factories, in two blocks.

    `Deployment.block` is the first of them.
    """
    admin = chain.accounts[0]

    async def create(name: str, *args: Any) -> str:
        data = chain.contract(name).deploy_data(*args)
        return await chain.send(sender=admin, to=None, data=data, gas=DEPLOY_GAS)

    # Addresses are needed as constructor arguments, so deploy in two mined steps.
    await create("ResolutionManager")
    await create("RewardDistributor")
    await create("PredictionMarket", True)
    await create("PredictionMarket", False)
    first = await chain.mine()
    rm, rd, legacy, current = (r["contractAddress"].lower() for r in first["receipts"])
    await create("FlexibleMarketFactoryUnified", legacy, rm, rd)
    await create("FlexibleMarketFactoryUnified", current, rm, rd)
    second = await chain.mine()
    v1, v2 = (r["contractAddress"].lower() for r in second["receipts"])
    chain_id = int(await chain.request("eth_chainId", []), 16)
    return Deployment(
        chain_id=chain_id,
        factory_v1=v1,
        factory_v2=v2,
        resolution_manager=rm,
        reward_distributor=rd,
        template_legacy=legacy,
        template=current,
        block=int(first["number"]),
    )
