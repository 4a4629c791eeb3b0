"""Tests of the indexer's JSON-RPC layer on a real anvil, directly and through a faulty proxy."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import pytest_asyncio
import structlog
from hypothesis import given
from hypothesis import strategies as st

from devnet.anvil_node import ANVIL_CHAIN_ID, Anvil
from indexer.bloom import FULL_BLOOM, bloom_number, may_contain
from indexer.errors import (
    BlockNotFound,
    ChainIdMismatch,
    ReorgDuringFetch,
    RpcRangeTooLarge,
    RpcResponseError,
    RpcUnavailable,
)
from indexer.rpc import LogRangeSizer, RawLog, RpcClient, fetch_logs
from indexer.rpc_failover import BATCH_PROBE_AFTER
from indexer.rpc_results import LogQuery, check_has_block, parse_header, parse_logs
from indexer.rpc_transport import Endpoint
from indexer.rpc_wire import (
    BatchRejected,
    TransientFailure,
    Verdict,
    batch_results,
    check_status,
    classify,
    parse_quantity,
    result_of,
)
from tests.support.rpc_proxy import ENDPOINT_FAULTS, FAULT_KINDS, RpcFaultProxy

pytestmark = pytest.mark.timeout(60)

TOPIC0 = "0x" + "ab" * 32
# Runtime of a contract that emits LOG2(topic0=TOPIC0, topic1=i, data=i) for i = n..1, where n
# is the first 32-byte word of the calldata: CALLDATALOAD, then a loop DUP/ISZERO/JUMPI,
# MSTORE the counter, LOG2, SUB 1, JUMP back.
EMITTER_RUNTIME = (
    "600035" "5b" "80" "15" "603b" "57" "80" "6000" "52" "80" "7f" + TOPIC0[2:] +
    "6020" "6000" "a2" "6001" "90" "03" "6003" "56" "5b" "00"
)  # fmt: skip
# Init code: CODECOPY the 61-byte runtime that follows these 12 bytes, then RETURN it.
EMITTER_INIT = "0x603d600c600039603d6000f3" + EMITTER_RUNTIME
TX_GAS = 1_000_000
BLOCKS_WITH_LOGS = 150
MAX_LOGS_PER_TX = 60
MAX_TXS_PER_BLOCK = 3
MAX_B_LOGS = 10
# No single block may exceed a results limit, or no range could ever be small enough.
MAX_LOGS_PER_BLOCK = MAX_TXS_PER_BLOCK * MAX_LOGS_PER_TX + MAX_B_LOGS
SEED = 20251106
# Long enough that the calls right after a failover come before it on a loaded machine.
FAILBACK_AFTER = 1.5


@dataclass(frozen=True)
class Chain:
    """A running anvil with two log emitters and thousands of logs over hundreds of blocks."""

    url: str
    emitter_a: str
    emitter_b: str
    head: int


async def raw_call(session: aiohttp.ClientSession, url: str, method: str, params: list[Any]) -> Any:
    """Call the node directly, as the reference the client under test is compared with."""
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        answer = orjson.loads(await r.read())
    assert "error" not in answer, answer
    return answer["result"]


async def direct_logs(
    url: str, from_block: int, to_block: int, **filter_: Any
) -> list[tuple[object, ...]]:
    """Return the node's own eth_getLogs answer as comparable tuples."""
    params = {"fromBlock": hex(from_block), "toBlock": hex(to_block), **filter_}
    async with aiohttp.ClientSession() as session:
        logs = await raw_call(session, url, "eth_getLogs", [params])
    return [
        (
            int(x["blockNumber"], 16),
            int(x["logIndex"], 16),
            x["address"].lower(),
            tuple(x["topics"]),
            x["data"],
            x["blockHash"],
            x["transactionHash"],
            int(x["transactionIndex"], 16),
        )
        for x in logs
    ]


def as_tuples(logs: Sequence[RawLog]) -> list[tuple[object, ...]]:
    """Return RawLogs in the form direct_logs uses."""
    return [
        (
            x.block_number,
            x.log_index,
            x.address,
            x.topics,
            x.data,
            x.block_hash,
            x.transaction_hash,
            x.transaction_index,
        )
        for x in logs
    ]


def dead_url() -> str:
    """Return a loopback URL where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    """One anvil for this module, mining only when asked."""
    with Anvil() as node:
        yield node.rpc_url


@pytest_asyncio.fixture(scope="module")
async def chain(anvil_url: str) -> AsyncIterator[Chain]:
    """Deploy two emitters and fill a few hundred blocks with their logs."""
    rng = random.Random(SEED)
    async with aiohttp.ClientSession() as session:

        async def call(method: str, params: list[Any]) -> Any:
            return await raw_call(session, anvil_url, method, params)

        sender = (await call("eth_accounts", []))[0]
        nonce = 0

        def tx(to: str | None, data: str) -> dict[str, Any]:
            nonlocal nonce
            nonce += 1
            fields = {"from": sender, "data": data, "gas": hex(TX_GAS), "nonce": hex(nonce - 1)}
            return fields | ({"to": to} if to else {})

        hashes = [await call("eth_sendTransaction", [tx(None, EMITTER_INIT)]) for _ in range(2)]
        await call("evm_mine", [])
        a, b = [(await call("eth_getTransactionReceipt", [h]))["contractAddress"] for h in hashes]
        for _ in range(BLOCKS_WITH_LOGS):
            for _ in range(rng.randint(1, MAX_TXS_PER_BLOCK)):
                logs = rng.randint(1, MAX_LOGS_PER_TX)
                await call("eth_sendTransaction", [tx(a, "0x" + logs.to_bytes(32).hex())])
            if rng.random() < 0.5:
                logs = rng.randint(1, MAX_B_LOGS)
                await call("eth_sendTransaction", [tx(b, "0x" + logs.to_bytes(32).hex())])
            await call("evm_mine", [])
            if gap := rng.randint(0, 4):
                await call("anvil_mine", [hex(gap)])
        head = int(await call("eth_blockNumber", []), 16)
    yield Chain(anvil_url, a.lower(), b.lower(), head)


def client_for(*urls: str, **options: Any) -> RpcClient:
    """Return a client with test-sized timeouts and backoff, overridable per test."""
    settings = {"timeout": 5.0, "max_retries": 3, "backoff_base": 0.01, "backoff_max": 0.1}
    return RpcClient(urls, **(settings | options))


async def test_chain_id_and_block_number_match_the_node(chain: Chain) -> None:
    """chain_id and block_number return the node's values as ints."""
    async with client_for(chain.url) as client:
        assert await client.chain_id() == ANVIL_CHAIN_ID
        assert await client.block_number() == chain.head


async def test_block_header_matches_the_node(chain: Chain) -> None:
    """get_block_header returns number, lowercase hashes and timestamp of the node's block."""
    async with client_for(chain.url) as client, aiohttp.ClientSession() as session:
        block = await raw_call(session, chain.url, "eth_getBlockByNumber", [hex(5), False])
        header = await client.get_block_header(5)
    assert header.number == 5
    assert header.hash == block["hash"].lower()
    assert header.parent_hash == block["parentHash"].lower()
    assert header.timestamp == int(block["timestamp"], 16)


async def test_a_headers_bloom_holds_its_logs_addresses_and_topics(chain: Chain) -> None:
    """The logs bloom of a header as parsed is the node's, and holds the address and every
    topic of each log of its block; addresses in no log are seldom in it (a bloom's false
    positives: about 0.1% here), and never in the bloom of a block without logs."""
    first, last = chain.head - 80, chain.head
    # Address and topics of each log, by block.
    items: dict[int, set[str]] = {}
    for number, _, address, topics, *_ in await direct_logs(chain.url, first, last):
        assert isinstance(number, int)
        assert isinstance(topics, tuple)
        items.setdefault(number, set()).update([str(address), *topics])
    async with client_for(chain.url) as client, aiohttp.ClientSession() as session:
        headers = await client.get_block_headers(range(first, last + 1))
        block = await raw_call(session, chain.url, "eth_getBlockByNumber", [hex(last), False])
    assert headers[-1].logs_bloom is not None
    assert "0x" + headers[-1].logs_bloom.hex() == block["logsBloom"]
    rng = random.Random(SEED)
    strangers = ["0x" + rng.randbytes(20).hex() for _ in range(20)]
    false_positives = 0
    empty = 0
    for header in headers:
        assert header.logs_bloom is not None
        bloom = bloom_number(header.logs_bloom)
        held = items.get(header.number, set())
        assert all(may_contain(bloom, item) for item in held), header.number
        found = sum(may_contain(bloom, stranger) for stranger in strangers)
        false_positives += found
        if not held:
            empty += 1
            assert bloom == 0
            assert found == 0
    assert 0 < empty < len(headers), "blocks with logs and without"
    assert false_positives <= len(headers) * len(strangers) // 100


async def test_block_past_the_head_raises_block_not_found(chain: Chain) -> None:
    """A block the node does not have yet raises BlockNotFound, singly and in a batch."""
    async with client_for(chain.url) as client:
        with pytest.raises(BlockNotFound) as raised:
            await client.get_block_header(chain.head + 1)
        assert raised.value.number == chain.head + 1
        with pytest.raises(BlockNotFound):
            await client.get_block_headers([chain.head, chain.head + 1])


async def test_batched_headers_equal_sequential_headers(chain: Chain) -> None:
    """get_block_headers sends one batch per max_batch_size blocks and matches single calls."""
    numbers = list(range(chain.head + 1))
    async with client_for(chain.url, max_batch_size=100) as client:
        batched = await client.get_block_headers(numbers)
        assert client.stats.attempts == -(-len(numbers) // 100)
        single = [await client.get_block_header(n) for n in numbers]
    assert batched == single
    assert all(h.parent_hash == p.hash for p, h in itertools.pairwise(batched))


async def test_headers_fall_back_to_single_calls_when_batches_are_rejected(chain: Chain) -> None:
    """A provider that refuses batches gets single calls, with the same headers as a result."""
    numbers = list(range(40))
    async with RpcFaultProxy(chain.url, seed=1, reject_batches=True) as proxy:
        async with client_for(proxy.url) as client:
            headers = await client.get_block_headers(numbers)
            again = await client.get_block_headers(numbers)
        assert proxy.injected["batch_rejected"] == 1
    async with client_for(chain.url) as direct:
        assert headers == again == await direct.get_block_headers(numbers)


async def test_a_batch_too_large_goes_in_halves_and_batches_stay(chain: Chain) -> None:
    """HTTP 413 to a batch says that request was too large, not that the endpoint takes no
    batches: its calls go in two smaller batches, and the next call's in batches of that size
    too, not one by one."""
    async with RpcFaultProxy(chain.url, seed=16) as proxy:
        proxy.schedule("http_413")
        async with client_for(proxy.url) as client:
            headers = await client.get_block_headers(range(10))
            sent = proxy.requests
            later = await client.get_block_headers(range(10, 20))
        assert sent == 1 + 2  # the refused batch, then its two halves
        assert proxy.requests - sent == 2
    async with client_for(chain.url) as direct:
        assert headers + later == await direct.get_block_headers(range(20))


async def test_a_batch_over_the_endpoints_size_limit_is_sent_in_smaller_batches(
    chain: Chain,
) -> None:
    """An endpoint with a body size limit answers a large batch with HTTP 413: the batch is
    halved until it fits, and the rest of the call goes in batches of that size, not call by
    call (100 headers here: 3 refused batches and 8 of 13, against 1 and 100 single calls)."""
    numbers = range(100)
    call_bytes = len(
        orjson.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1000,
                "method": "eth_getBlockByNumber",
                "params": ["0x63", False],
            }
        )
    )
    async with RpcFaultProxy(chain.url, seed=18, max_body=16 * call_bytes) as proxy:
        async with client_for(proxy.url) as client:
            headers = await client.get_block_headers(numbers)
        assert proxy.injected["body_too_large"] >= 1
        assert proxy.requests < 20
    async with client_for(chain.url) as direct:
        assert headers == await direct.get_block_headers(numbers)


async def test_a_batch_over_the_endpoints_call_limit_is_sent_in_smaller_batches(
    chain: Chain,
) -> None:
    """An endpoint with a cap on calls per batch (Besu's --rpc-http-max-batch-size, geth's
    --rpc.batch-request-limit) answers a larger batch with one error object, -32005 from
    Besu: halved until it fits, as for a 413, not retried whole until the call fails, nor
    taken as "no batches here"; the rest goes in batches of that size."""
    numbers = range(100)
    async with RpcFaultProxy(chain.url, seed=19, max_batch=16) as proxy:
        async with client_for(proxy.url) as client:
            headers = await client.get_block_headers(numbers)
            sent = proxy.requests
            await client.get_block_headers(range(10))
        assert proxy.injected["batch_too_large"] == 3  # 100, 50, 25 refused; 8 batches of 13
        assert sent == 3 + 8
        assert proxy.requests - sent == 1  # batches kept
    async with client_for(chain.url) as direct:
        assert headers == await direct.get_block_headers(numbers)


async def test_later_calls_start_at_the_batch_size_the_endpoint_took(chain: Chain) -> None:
    """The batch size an endpoint took after refusing a larger one is remembered for it:
    later calls send batches of that size at once, with no refusal, instead of paying three
    halvings each time; groups of calls (logs by hash with their header) too."""
    async with RpcFaultProxy(chain.url, seed=28, max_batch=16) as proxy:
        async with client_for(proxy.url) as client:
            headers = await client.get_block_headers(range(100))
            assert proxy.injected["batch_too_large"] == 3  # 100, 50, 25; then 13 taken
            sent = proxy.requests
            for _ in range(3):
                assert await client.get_block_headers(range(100)) == headers
            assert proxy.requests - sent == 3 * 8  # 13 headers a batch
            sent = proxy.requests
            await client.get_logs_at(headers[:20], addresses=[chain.emitter_a])
            assert proxy.requests - sent == 4  # 6 blocks (12 calls) a batch
        assert proxy.injected["batch_too_large"] == 3


async def test_the_batch_size_taken_is_remembered_per_endpoint(chain: Chain) -> None:
    """One endpoint's cap on batches is not another's: after a failover, the endpoint without
    one gets whole batches."""
    async with (
        RpcFaultProxy(chain.url, seed=29, max_batch=16) as capped,
        RpcFaultProxy(chain.url, seed=30) as free,
    ):
        async with client_for(capped.url, free.url) as client:
            await client.get_block_headers(range(100))
            capped.schedule("http_503")
            await client.get_block_headers(range(100))
        assert free.requests == 2  # the 13 sized for the capped one, then the other 87
        assert free.calls[13][1][0] == hex(13)


@pytest.mark.parametrize("lifted", [True, False], ids=["cap-lifted", "cap-kept"])
async def test_a_batch_size_cap_is_probed_again_after_many_batches(
    chain: Chain, lifted: bool
) -> None:
    """A cap on an endpoint's batches may be lifted (a transient limit, a provider's plan):
    after BATCH_PROBE_AFTER batches at the remembered size, twice that size is tried, kept if
    taken, and costs a single refusal if not."""
    async with (
        RpcFaultProxy(chain.url, seed=31, max_batch=16) as proxy,
        client_for(proxy.url) as client,
    ):
        await client.get_block_headers(range(100))  # 13 taken
        if lifted:
            proxy.max_batch = None
        for _ in range(BATCH_PROBE_AFTER):
            await client.get_block_headers(range(13))
        refused, sent = proxy.injected["batch_too_large"], proxy.requests
        await client.get_block_headers(range(100))
        if lifted:
            assert proxy.requests - sent == 4  # 26 headers a batch
            assert proxy.injected["batch_too_large"] == refused
        else:
            assert proxy.requests - sent == 1 + 8  # 26 refused, then 13 a batch
            assert proxy.injected["batch_too_large"] == refused + 1


async def test_a_range_at_the_floor_answered_413_is_retried(chain: Chain) -> None:
    """A range that cannot be made smaller, refused with HTTP 413 (proven and alone), is tried
    again like any overloaded answer, not given up as an unusable endpoint's."""
    first, last = chain.head - 40, chain.head
    expected = await direct_logs(chain.url, first, last, address=chain.emitter_a)
    async with RpcFaultProxy(chain.url, seed=17) as proxy:
        proxy.schedule("http_413", "http_413")
        async with client_for(proxy.url) as client:
            logs = await client.get_logs(first, last, addresses=[chain.emitter_a], shrinkable=False)
            assert proxy.requests == 3  # proven (413), alone (413), proven
            await client.get_logs(first, last, addresses=[chain.emitter_a], shrinkable=False)
        assert proxy.requests == 4
        assert proxy.methods["eth_getBlockByNumber"] == 3  # batches kept: every later one proven
    assert as_tuples(logs) == expected


async def test_a_batch_refused_without_a_json_rpc_reason_is_tried_again_later(
    chain: Chain,
) -> None:
    """An HTML 400 to a batch (a firewall's, say) sends the calls one by one for a while, then
    batches are tried again: one such answer must not cost the range proofs for good."""
    async with RpcFaultProxy(chain.url, seed=18) as proxy:
        proxy.schedule("http_400")
        # An interval that 21 loopback requests cannot outlast, even on a loaded machine.
        async with client_for(proxy.url, batch_retry_interval=3.0) as client:
            headers = await client.get_block_headers(range(10))
            assert proxy.requests == 1 + 10
            assert await client.get_block_headers(range(10)) == headers
            assert proxy.requests == 1 + 10 + 10  # within the interval: one by one
            await asyncio.sleep(3.1)
            assert await client.get_block_headers(range(10)) == headers
            assert proxy.requests == 1 + 10 + 10 + 1
    async with client_for(chain.url) as direct:
        assert headers == await direct.get_block_headers(range(10))


async def test_an_unproven_range_answer_is_taken_only_from_an_endpoint_that_cannot_prove(
    chain: Chain,
) -> None:
    """Whether a range's logs need their proof depends on the endpoint that answers, not on
    the one the call started at: after a retry moves from an endpoint without batches to one
    with them, a lagging backend's empty answer there is not taken."""
    first, last = chain.head - 60, chain.head
    expected = await direct_logs(chain.url, first, last, address=chain.emitter_a)
    assert expected
    async with (
        RpcFaultProxy(chain.url, seed=19, reject_batches=True, rates={"http_429": 1.0}) as alone,
        RpcFaultProxy(chain.url, seed=20, rates={"lagging": 1.0}, lag_blocks=100) as behind,
        client_for(alone.url, behind.url) as client,
    ):
        with pytest.raises(RpcUnavailable):
            await client.get_logs(first, last, addresses=[chain.emitter_a])
        assert behind.injected["lagging"] >= 1
        alone.rates = behind.rates = {}
        logs = await client.get_logs(first, last, addresses=[chain.emitter_a])
    assert as_tuples(logs) == expected


@pytest.mark.parametrize("reject_batches", [False, True], ids=["batched", "one_by_one"])
async def test_logs_by_hash_from_a_backend_that_answers_an_unknown_hash_with_nothing_are_not_taken(
    chain: Chain, reject_batches: bool
) -> None:
    """Some nodes answer a blockHash query for a block they have not seen with [] rather than
    "unknown block": a backend behind gives no logs for the newest blocks, and that answer is
    retried elsewhere instead of taken, whether the endpoint takes batches or not."""
    first, last = chain.head - 60, chain.head
    expected = await direct_logs(chain.url, first, last, address=chain.emitter_a)
    assert expected
    async with client_for(chain.url) as direct:
        headers = await direct.get_block_headers(range(first, last + 1))
    async with (
        RpcFaultProxy(
            chain.url,
            seed=21,
            rates={"lagging": 1.0},
            lag_blocks=100,
            empty_unknown_hash=True,
            reject_batches=reject_batches,
        ) as behind,
        RpcFaultProxy(chain.url, seed=22, reject_batches=reject_batches) as working,
        client_for(behind.url, working.url) as client,
    ):
        logs = await client.get_logs_at(headers, addresses=[chain.emitter_a])
        assert behind.injected["lagging"] >= 1
    assert as_tuples(logs) == expected


async def test_get_logs_equals_the_nodes_answer(chain: Chain) -> None:
    """get_logs returns exactly the logs of a direct eth_getLogs, sorted and lowercase."""
    addresses = [chain.emitter_a, chain.emitter_b]
    expected = await direct_logs(chain.url, 0, chain.head, address=addresses)
    async with client_for(chain.url) as client:
        logs = await client.get_logs(0, chain.head, addresses=addresses)
    assert len(expected) > 5000
    assert as_tuples(logs) == sorted(expected)
    assert {log.address for log in logs} == set(addresses)


async def test_get_logs_filters_by_address_and_topic(chain: Chain) -> None:
    """Address and topic filters reach the node and every returned log matches them."""
    topic1 = "0x" + (5).to_bytes(32).hex()
    topics: list[Any] = [TOPIC0, [topic1]]
    expected = await direct_logs(chain.url, 0, chain.head, address=chain.emitter_a, topics=topics)
    async with client_for(chain.url) as client:
        logs = await client.get_logs(
            0, chain.head, addresses=[chain.emitter_a.upper().replace("0X", "0x")], topics=topics
        )
    assert expected
    assert as_tuples(logs) == expected
    assert all(log.address == chain.emitter_a and log.topics[1] == topic1 for log in logs)


async def test_fetch_logs_through_provider_limits_is_complete(chain: Chain) -> None:
    """fetch_logs shrinks past range and result limits and still returns every log once."""
    addresses = [chain.emitter_a, chain.emitter_b]
    expected = await direct_logs(chain.url, 0, chain.head, address=addresses)
    sizer = LogRangeSizer(initial=1000, minimum=1, maximum=5000)
    max_results = MAX_LOGS_PER_BLOCK + 20
    async with RpcFaultProxy(chain.url, seed=2, max_range=40, max_results=max_results) as proxy:
        async with client_for(proxy.url) as client:
            logs = await fetch_logs(
                client, sizer, from_block=0, to_block=chain.head, addresses=addresses
            )
        assert proxy.injected["range"] > 0
        assert proxy.injected["results"] > 0
        refused = proxy.injected["range"] + proxy.injected["results"]
    assert as_tuples(logs) == sorted(expected)
    assert client.stats.errors["range_too_large"] == refused
    assert sizer.size < 1000


async def test_fetch_logs_survives_transient_faults(chain: Chain) -> None:
    """Under frequent 429s, 5xxs, timeouts, drops, bad JSON and rate-limit errors the answers
    are still exactly right."""
    addresses = [chain.emitter_a, chain.emitter_b]
    expected = await direct_logs(chain.url, 0, chain.head, address=addresses)
    async with client_for(chain.url) as direct:
        expected_headers = await direct.get_block_headers(range(chain.head + 1))
    rates = dict.fromkeys(FAULT_KINDS, 0.06) | {"timeout": 0.02}
    sizer = LogRangeSizer(initial=60, minimum=1, maximum=60)
    async with RpcFaultProxy(chain.url, seed=3, rates=rates, timeout_delay=1.0) as proxy:
        proxy.schedule(*FAULT_KINDS)  # every kind at least once
        async with client_for(proxy.url, timeout=0.5, max_retries=20) as client:
            logs = await fetch_logs(
                client, sizer, from_block=0, to_block=chain.head, addresses=addresses
            )
            headers = await client.get_block_headers(range(chain.head + 1))
        assert all(proxy.injected[kind] >= 1 for kind in FAULT_KINDS)
    assert as_tuples(logs) == sorted(expected)
    assert headers == expected_headers
    assert sum(client.stats.errors.values()) >= len(FAULT_KINDS)


async def test_a_range_that_times_out_is_shrunk_on_the_next_endpoint(chain: Chain) -> None:
    """A timed-out eth_getLogs range may be too heavy or its endpoint may hang: the smaller
    range goes to the next endpoint, so a hanging first endpoint costs one timeout, not one
    per halving down to the floor."""
    addresses = [chain.emitter_a, chain.emitter_b]
    expected = await direct_logs(chain.url, 0, chain.head, address=addresses)
    sizer = LogRangeSizer(initial=64, minimum=1, maximum=64)
    hanging = RpcFaultProxy(chain.url, seed=5, rates={"timeout": 1.0}, timeout_delay=30.0)
    async with hanging, client_for(hanging.url, chain.url, timeout=1.5) as client:
        logs = await fetch_logs(
            client, sizer, from_block=0, to_block=chain.head, addresses=addresses
        )
        assert hanging.requests == 1
    assert as_tuples(logs) == sorted(expected)
    assert client.stats.errors == {"timeout": 1}
    assert client.stats.failovers == 1


async def test_fails_over_to_the_next_endpoint_and_stays_there(chain: Chain) -> None:
    """A dead first endpoint costs one failed attempt; later calls go to the working one."""
    async with client_for(dead_url(), chain.url) as client:
        assert await client.chain_id() == ANVIL_CHAIN_ID
        for _ in range(5):
            assert await client.block_number() == chain.head
    assert client.stats.errors == {"connect": 1}
    assert client.stats.failovers == 1
    assert client.stats.attempts == 7


async def test_calls_go_back_to_the_first_endpoint_after_failback_after(chain: Chain) -> None:
    """Failed over, the client does not stay on the second endpoint for good: it may answer
    from a node stuck on an old head, which no failure would ever reveal. After
    failback_after, calls start at the first endpoint again (and fail over again if it
    still fails)."""
    async with (
        RpcFaultProxy(chain.url, seed=41) as first,
        RpcFaultProxy(chain.url, seed=42) as second,
        client_for(first.url, second.url, failback_after=FAILBACK_AFTER) as client,
    ):
        first.schedule("http_503")
        await client.block_number()
        await client.block_number()
        assert (first.requests, second.requests) == (1, 2)
        await asyncio.sleep(FAILBACK_AFTER + 0.1)
        await client.block_number()
        await client.block_number()
        assert (first.requests, second.requests) == (3, 2)
        first.schedule("http_503")
        await client.block_number()
        assert (first.requests, second.requests) == (4, 3)
    assert client.stats.failbacks == 1


async def test_an_endpoint_on_another_chain_is_left_out(chain: Chain) -> None:
    """A URL of another network among the endpoints, found when failed over to, is left out
    with an error logged: the calls go on at the others (it stopped the indexer). Only
    when every endpoint serves another chain is it ChainIdMismatch."""
    async with (
        RpcFaultProxy(chain.url, seed=43) as good,
        RpcFaultProxy(chain.url, seed=44, chain_id=1) as other,
        client_for(
            good.url, other.url, failback_after=0.0, expected_chain_id=ANVIL_CHAIN_ID
        ) as client,
    ):
        good.schedule("http_503", "http_503")
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):  # failback_after 0: each call starts at the first again
                assert await client.block_number() == chain.head
        assert other.methods == {"eth_chainId": 1}
    assert [e["actual"] for e in logs if "serves another chain" in e["event"]] == [1]
    assert client.stats.errors["chain_id_mismatch"] == 1
    async with (
        RpcFaultProxy(chain.url, seed=45, chain_id=1) as first,
        RpcFaultProxy(chain.url, seed=46, chain_id=2) as second,
        client_for(first.url, second.url, expected_chain_id=ANVIL_CHAIN_ID) as client,
    ):
        with pytest.raises(ChainIdMismatch):
            await client.block_number()
        assert first.methods == second.methods == {"eth_chainId": 1}


async def test_a_block_one_endpoint_lacks_is_asked_of_the_next(chain: Chain) -> None:
    """A null header from an endpoint behind the others ("not yet" there) is asked of the
    next endpoint before BlockNotFound is raised; when none has it, it is raised."""
    async with (
        RpcFaultProxy(chain.url, seed=47, rates={"lagging": 1.0}, lag_blocks=3) as behind,
        client_for(behind.url, chain.url) as client,
    ):
        header = await client.get_block_header(chain.head)
        assert header.number == chain.head
        assert behind.injected["lagging"] == 1
        assert await client.get_block_header(chain.head) == header  # the next one is current
        with pytest.raises(BlockNotFound):
            await client.get_block_header(chain.head + 100)
    assert client.stats.failovers == 2


async def test_a_call_an_endpoint_refuses_goes_to_the_next(chain: Chain) -> None:
    """A JSON-RPC error an endpoint gives of its own (a method it disables, a key it refuses)
    sends the call to the next endpoint (it stopped the indexer at every restart though a
    working endpoint was configured); the error is raised when every endpoint gives one."""
    refused = {"eth_getLogs": (-32601, "the method eth_getLogs does not exist/is not available")}
    expected = await direct_logs(chain.url, 0, chain.head, address=chain.emitter_a)
    async with (
        RpcFaultProxy(chain.url, seed=48, refused_methods=refused) as first,
        RpcFaultProxy(chain.url, seed=49) as second,
        client_for(first.url, second.url) as client,
    ):
        logs = await client.get_logs(0, chain.head, addresses=[chain.emitter_a])
        assert first.injected["refused"] == 1
        second.refused_methods = refused
        with pytest.raises(RpcResponseError) as raised:
            await client.get_logs(0, chain.head, addresses=[chain.emitter_a])
    assert as_tuples(logs) == sorted(expected)
    assert raised.value.code == -32601


async def test_an_answer_over_the_size_bound_is_not_read_whole(chain: Chain) -> None:
    """An endpoint's answer is read up to max_answer_bytes (a broken or hostile endpoint
    could send gigabytes): a larger eth_getLogs answer gets a smaller range, which completes;
    a call that cannot be made smaller goes to the next endpoint, then fails as unusable."""
    addresses = [chain.emitter_a, chain.emitter_b]
    expected = await direct_logs(chain.url, 0, chain.head, address=addresses)
    sizer = LogRangeSizer(initial=chain.head + 1, minimum=1, maximum=chain.head + 1)
    async with client_for(chain.url, max_answer_bytes=200_000) as client:
        logs = await fetch_logs(
            client, sizer, from_block=0, to_block=chain.head, addresses=addresses
        )
        assert client.stats.errors["range_too_large"] >= 1
        assert as_tuples(logs) == sorted(expected)
    # A block header is about 1.2 KB of JSON: 100 in a batch, about 120 KB.
    async with client_for(chain.url, chain.url, max_answer_bytes=50_000) as client:
        with pytest.raises(RpcResponseError, match="more than 50000 bytes"):
            await client.get_block_headers(range(100))
        assert client.stats.errors == {"bad_response": 2}
        assert len(await client.get_block_headers(range(5))) == 5


async def test_all_endpoints_dead_raises_unavailable_after_bounded_attempts() -> None:
    """With every endpoint dead a call raises RpcUnavailable after max_retries + 1 attempts,
    refused at once: in less than the capped backoffs plus one timeout, all together (a
    refused connection is no reason to wait out the timeout, nor to sleep past the cap)."""
    max_retries, backoff_max, timeout = 4, 0.05, 5.0
    started = time.monotonic()
    async with client_for(
        dead_url(), dead_url(), max_retries=max_retries, backoff_max=backoff_max, timeout=timeout
    ) as client:
        with pytest.raises(RpcUnavailable) as raised:
            await client.block_number()
    assert time.monotonic() - started < max_retries * backoff_max + timeout
    assert raised.value.method == "eth_blockNumber"
    assert raised.value.attempts == 5
    assert "connect" in raised.value.last_error
    assert client.stats.attempts == 5


async def test_deterministic_error_is_not_retried(chain: Chain) -> None:
    """A JSON-RPC error such as invalid params raises RpcResponseError after one attempt."""
    async with RpcFaultProxy(chain.url, seed=4) as proxy:
        async with client_for(proxy.url) as client:
            with pytest.raises(RpcResponseError) as raised:
                await client.request("eth_getBlockByNumber", ["zz", False])
        assert proxy.requests == 1
    assert raised.value.code == -32602
    assert raised.value.method == "eth_getBlockByNumber"
    assert client.stats.attempts == 1


# Each of the client's calls, as a test makes it of a chain; each checks its own answer.
CALLS: dict[str, Callable[[RpcClient, Chain], Awaitable[object]]] = {
    "chain_id": lambda client, chain: client.chain_id(),
    "block_number": lambda client, chain: client.block_number(),
    "head": lambda client, chain: client.get_head(),
    "headers": lambda client, chain: client.get_block_headers(range(1, 6)),
    "logs": lambda client, chain: client.get_logs(1, chain.head, addresses=[chain.emitter_b]),
    "logs_by_hash": lambda client, chain: logs_by_hash(client, chain),
}


async def logs_by_hash(client: RpcClient, chain: Chain) -> list[RawLog]:
    return await client.get_logs_at(
        await client.get_block_headers(range(1, 11)), addresses=[chain.emitter_a]
    )


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("fault", ENDPOINT_FAULTS)
async def test_an_endpoint_with_unusable_answers_is_failed_over(
    chain: Chain, fault: str, call: str
) -> None:
    """An endpoint whose answers cannot be used (a mistyped URL path's 404, results of the wrong
    shape) is no reason to stop while another serves: the call moves on to the next endpoint
    at once and gets the answer the node gives."""
    async with (
        RpcFaultProxy(chain.url, seed=6, rates={fault: 1.0}) as broken,
        RpcFaultProxy(chain.url, seed=7) as working,
    ):
        async with client_for(working.url) as alone:
            expected = await CALLS[call](alone, chain)
        requests_alone = working.requests
        async with client_for(broken.url, working.url) as client:
            assert await CALLS[call](client, chain) == expected
            broken_requests, working_requests = broken.requests, working.requests
            assert await CALLS[call](client, chain) == expected
        # One request reached the broken endpoint; the working one serves as it does alone,
        # batches (and with them the range's proof) included, from the first call on.
        assert broken.requests == broken_requests == 1
        assert working_requests - requests_alone == requests_alone  # the first call
        assert working.requests - working_requests == requests_alone  # the second
    assert client.stats.failovers == 1
    assert client.stats.errors["bad_response"] == 1


@pytest.mark.parametrize("fault", ENDPOINT_FAULTS)
async def test_unusable_answers_from_every_endpoint_are_final(chain: Chain, fault: str) -> None:
    """When every endpoint gives unusable answers, retrying cannot help: the call raises the
    last one's error after one attempt on each, without waiting out backoffs."""
    async with (
        RpcFaultProxy(chain.url, seed=7, rates={fault: 1.0}) as first,
        RpcFaultProxy(chain.url, seed=8, rates={fault: 1.0}) as second,
    ):
        async with client_for(first.url, second.url, backoff_base=5, backoff_max=5) as client:
            with pytest.raises(RpcResponseError) as raised:
                await client.block_number()
        assert (first.requests, second.requests) == (1, 1)
    assert raised.value.code is None
    assert raised.value.method == "eth_blockNumber"


async def test_retries_spent_while_another_endpoint_is_only_down_are_an_outage(
    chain: Chain,
) -> None:
    """One endpoint gives unusable answers while the other is only down for now (503): when
    the retries run out, that is an outage (RpcUnavailable, waited out at start-up), not the
    final error only every endpoint's unusable answers make, whichever endpoint came last."""
    async with (
        RpcFaultProxy(chain.url, seed=10, rates={"http_404": 1.0}) as broken,
        RpcFaultProxy(chain.url, seed=11, rates={"http_503": 1.0}) as down,
    ):
        async with client_for(broken.url, down.url, max_retries=2) as client:
            with pytest.raises(RpcUnavailable) as raised:
                await client.block_number()
        assert (broken.requests, down.requests) == (2, 1)  # the last attempt was the 404's
    assert "bad_response" in raised.value.last_error


async def test_the_call_after_an_outage_starts_past_the_endpoint_that_failed_last(
    chain: Chain,
) -> None:
    """A call whose retries ran out on an endpoint with unusable answers leaves it: the next
    call starts at the next endpoint (back by then), not with one more request to it."""
    async with (
        RpcFaultProxy(chain.url, seed=12, rates={"http_404": 1.0}) as broken,
        RpcFaultProxy(chain.url, seed=13, rates={"http_503": 1.0}) as down,
    ):
        async with client_for(broken.url, down.url, max_retries=2) as client:
            with pytest.raises(RpcUnavailable):
                await client.block_number()
            assert (broken.requests, down.requests) == (2, 1)
            down.rates = {}  # back
            assert await client.block_number() == chain.head
        assert (broken.requests, down.requests) == (2, 2)


async def test_a_chain_id_check_that_gets_an_unusable_answer_fails_over(chain: Chain) -> None:
    """The chain id check of an endpoint is one of its calls: a garbled answer to it moves on to
    the next endpoint, which is checked in turn."""
    async with RpcFaultProxy(chain.url, seed=9, rates={"garbled": 1.0}) as broken:
        async with client_for(broken.url, chain.url, expected_chain_id=ANVIL_CHAIN_ID) as client:
            assert await client.block_number() == chain.head
        assert broken.methods == {"eth_chainId": 1}
    assert client.stats.failovers == 1


@pytest.mark.parametrize(
    ("retry_after", "retry_after_max"), [(1, 20.0), (86_400, 0.5)], ids=["honoured", "bounded"]
)
async def test_retry_after_is_honoured_up_to_its_own_bound(
    chain: Chain, retry_after: float, retry_after_max: float
) -> None:
    """After a 429 the client waits Retry-After seconds, longer than its backoff cap (a
    provider asking for 30 s is not asked again every 10 s), but no longer than
    retry_after_max: an absurd value (a day) is cut to that bound, with a warning that names
    the endpoint and the wait it asked for."""
    wait = min(retry_after, retry_after_max)
    async with RpcFaultProxy(chain.url, seed=5, retry_after=retry_after) as proxy:
        proxy.schedule("http_429")
        options = {"backoff_base": 0.001, "backoff_max": 0.1, "retry_after_max": retry_after_max}
        with structlog.testing.capture_logs() as events:
            async with client_for(proxy.url, **options) as client:
                started = time.monotonic()
                assert await client.block_number() == chain.head
                elapsed = time.monotonic() - started
    assert 0.9 * wait <= elapsed <= wait + 5.0
    assert client.stats.errors == {"http_429": 1}
    label = Endpoint.from_url(0, proxy.url).label
    warned = [e for e in events if e["log_level"] == "warning" and e.get("endpoint") == label]
    assert any(e.get("retry_after") == retry_after for e in warned), warned
    if retry_after > retry_after_max:
        assert any("longer than" in e["event"] for e in warned), warned


async def test_a_call_waits_out_a_retry_after_its_endpoint_gave_an_earlier_call(
    chain: Chain,
) -> None:
    """A Retry-After outlives the call that got it: when that call's retries ran out, the next
    call to the same (only) endpoint waits until the time asked for, then goes out, saying so
    in the log, rather than asking again at once."""
    async with RpcFaultProxy(chain.url, seed=23, retry_after=1) as proxy:
        proxy.schedule("http_429")
        with structlog.testing.capture_logs() as events:
            async with client_for(proxy.url, max_retries=0) as client:
                with pytest.raises(RpcUnavailable):
                    await client.block_number()
                started = time.monotonic()
                assert await client.block_number() == chain.head
                elapsed = time.monotonic() - started
        assert proxy.requests == 2
    assert 0.9 <= elapsed <= 6.0
    assert any("waiting" in e["event"] and e["log_level"] == "warning" for e in events), events


async def test_an_endpoint_that_asked_to_wait_is_left_alone_while_another_serves(
    chain: Chain,
) -> None:
    """While one endpoint's Retry-After holds, calls start at another that is free, even when
    the last call's retries ended on the waiting one: it gets no request before its time,
    and no call waits for it."""
    async with (
        RpcFaultProxy(chain.url, seed=24, retry_after=30, rates={"http_429": 1.0}) as waiting,
        RpcFaultProxy(chain.url, seed=25) as other,
    ):
        other.schedule("http_404")
        async with client_for(waiting.url, other.url, max_retries=1) as client:
            with pytest.raises(RpcUnavailable):  # 429 (30 s) at the first, 404 at the second
                await client.block_number()
            started = time.monotonic()
            for _ in range(3):
                assert await client.block_number() == chain.head
            elapsed = time.monotonic() - started
        assert waiting.requests == 1
        assert other.requests == 1 + 3
    assert elapsed < 5.0


async def test_a_transient_failure_is_retried_where_it_happened_while_the_others_wait(
    chain: Chain,
) -> None:
    """A transient failure while every other endpoint's Retry-After holds is retried on the
    same endpoint after a backoff, not by waiting out the other's Retry-After."""
    async with (
        RpcFaultProxy(chain.url, seed=26, retry_after=30, rates={"http_429": 1.0}) as waiting,
        RpcFaultProxy(chain.url, seed=27) as other,
    ):
        other.schedule("http_503")
        async with client_for(waiting.url, other.url) as client:
            started = time.monotonic()
            assert await client.block_number() == chain.head  # 429, 503, then the answer
            elapsed = time.monotonic() - started
        assert (waiting.requests, other.requests) == (1, 2)
    assert elapsed < 5.0


async def test_endpoint_secrets_never_reach_errors_or_logs() -> None:
    """Passwords and API keys in endpoint URLs appear in no error message and no log event."""
    secrets = ("hunter2hunter2", "PATHKEY0123456789", "QUERYKEY0123456789")
    url = dead_url().replace("//", f"//user:{secrets[0]}@") + f"/v3/{secrets[1]}?key={secrets[2]}"
    with structlog.testing.capture_logs() as events:
        async with client_for(url, max_retries=2) as client:
            with pytest.raises(RpcUnavailable) as raised:
                await client.chain_id()
    assert events
    text = f"{raised.value} {raised.value!r} {raised.value.last_error} {events}"
    assert not [s for s in secrets if s in text]


@pytest.mark.parametrize(
    ("url", "key", "shown"),
    [
        ("https://0123456789abcdef0123456789abcdef.based.rpc.rivet.cloud/", "0123456789abcdef",
         "#0 ***.based.rpc.rivet.cloud"),
        ("http://ab12cd34ef.node.example:8545/rpc", "ab12cd34ef", "#0 ***.node.example:8545"),
    ],
)  # fmt: skip
def test_an_api_key_in_the_host_name_stays_out_of_labels_and_errors(
    url: str, key: str, shown: str
) -> None:
    """Some providers (Rivet) put the API key in the host name. The label that names the
    endpoint in logs and errors hides it but still says which provider it is, and connection
    errors, which quote the host, are redacted too."""
    endpoint = Endpoint.from_url(0, url)
    assert endpoint.label == shown
    host = urlsplit(url).netloc
    assert key not in endpoint.redact(f"Cannot connect to host {host} ssl:default")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:8545", "#3 127.0.0.1:8545"),
        ("http://[2001:db8::1]:8545/", "#3 [2001:db8::1]:8545"),
        ("https://eth-mainnet.g.alchemy.com/v2/0123456789abcdef", "#3 eth-mainnet.g.alchemy.com"),
        ("https://arbitrum-mainnet.infura.io/v3/0123456789abcdef", "#3 arbitrum-mainnet.infura.io"),
        ("https://bsc-dataseed1.binance.org", "#3 bsc-dataseed1.binance.org"),
        ("https://ethereum-sepolia-rpc.publicnode.com", "#3 ethereum-sepolia-rpc.publicnode.com"),
    ],
)
def test_a_host_name_without_a_key_is_shown_whole(url: str, shown: str) -> None:
    """Addresses and provider host names are what the operator needs to see: kept whole."""
    assert Endpoint.from_url(3, url).label == shown


async def test_wrong_chain_raises_chain_id_mismatch(chain: Chain) -> None:
    """An endpoint serving another chain than expected_chain_id raises ChainIdMismatch."""
    async with client_for(chain.url, expected_chain_id=1) as client:
        with pytest.raises(ChainIdMismatch) as raised:
            await client.block_number()
    assert (raised.value.expected, raised.value.actual) == (1, ANVIL_CHAIN_ID)
    async with client_for(chain.url, expected_chain_id=ANVIL_CHAIN_ID) as client:
        assert await client.block_number() == chain.head
        assert await client.block_number() == chain.head
    assert client.stats.attempts == 3  # the chain id is checked once per endpoint


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (-32005, "query returned more than 10000 results"),
        (-32602, "block range too large"),
        (-32000, "exceed maximum block range: 5000"),
        (-32000, "Log response size exceeded. You can make eth_getLogs requests with up to a 2K"),
        (-32600, "range is too large, max is 1k blocks"),
        (-32602, "query exceeds max results 20000, retry with the range 1-2"),
        (-32000, "Query timeout exceeded. Consider reducing your block range."),
        (-32005, "logs matched by query exceeds limit of 10000"),
        (-32602, "range 1000000 exceeds limit of 10000"),
        (-32614, "eth_getLogs is limited to a 10,000 range"),
        (-32005, "Requested range exceeds maximum RPC range limit"),  # Besu
        (-32005, "Exceeded max range limit for eth_getLogs: 1000"),  # Infura, Validation Cloud
        (35, "ranges over 10000 blocks are not supported on freetier"),  # dRPC
        (-32000, "maximum [from, to] blocks distance: 10000"),  # Ethermint, Cronos, Evmos
        (-32602, "invalid params: range 5000 is bigger than range limit 2000"),  # Tenderly
        (-32002, "request timed out"),  # geth, past its own HTTP timeout
        (-32003, "response too large"),  # geth, past --rpc.batch-response-max-size
    ],
)
def test_provider_range_wordings_are_range_errors(code: int, message: str) -> None:
    """Range refusals of known providers classify as range errors for an eth_getLogs range
    that can shrink; for one that cannot (by block hash, or at the floor) they are retried."""
    assert classify(code, message, "eth_getLogs", shrinkable=True) is Verdict.RANGE
    assert classify(code, message, "eth_getLogs", shrinkable=False) is Verdict.TRANSIENT


def test_a_range_past_the_nodes_head_is_retried_not_shrunk() -> None:
    """geth refuses a toBlock past its head with "block range extends beyond current head
    block": a backend behind its siblings, to ask again, not a range to make smaller (which
    would lower the sizer's ceiling for nothing)."""
    message = "block range extends beyond current head block"
    assert classify(-32602, message, "eth_getLogs", shrinkable=True) is Verdict.TRANSIENT


def test_a_reason_given_only_in_the_error_data_is_read() -> None:
    """Some providers answer "invalid params" and give the range refusal in `error.data`."""
    answer = {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": -32602, "message": "invalid params", "data": "block range too large"},
    }
    with pytest.raises(RpcRangeTooLarge):
        result_of(answer, 1, "eth_getLogs", shrinkable=True)
    with pytest.raises(RpcResponseError):
        result_of({**answer, "error": {"code": -32602, "message": "invalid params"}}, 1, "x")


def test_a_reason_given_in_an_error_data_object_is_read() -> None:
    """Tenderly gives the reason inside an object in `error.data`."""
    data = {"error_id": "5f0c", "payload": "range 5000 is bigger than range limit 2000"}
    answer = {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": -32602, "message": "invalid params", "data": data},
    }
    with pytest.raises(RpcRangeTooLarge):
        result_of(answer, 1, "eth_getLogs", shrinkable=True)


def test_a_batch_answer_over_the_nodes_size_cap_shrinks_the_range() -> None:
    """geth answers the calls of a batch past --rpc.batch-response-max-size with -32003
    "response too large": the logs came, the range's header did not. The range is too large
    (the logs are what is large), not a final error that stopped the indexer."""
    answer = [
        {"jsonrpc": "2.0", "id": 1, "result": []},
        _rpc_error(2, -32003, "response too large"),
    ]
    with pytest.raises(RpcRangeTooLarge):
        batch_results(answer, [1, 2], "eth_getLogs", shrinkable=True)


@pytest.mark.parametrize(
    ("code", "message", "verdict"),
    [
        (-32005, "limit exceeded", Verdict.TRANSIENT),
        (429, "Too Many Requests", Verdict.TRANSIENT),
        (-32016, "over rate limit", Verdict.TRANSIENT),
        (-32603, "internal error", Verdict.TRANSIENT),
        # QuickNode's per-second cap, which it may send with HTTP 200:
        (
            -32007,
            "100/second request limit reached - reduce calls per second or upgrade your account",
            Verdict.TRANSIENT,
        ),
        (-32000, "header not found", Verdict.TRANSIENT),
        # A block by hash that a node behind its siblings has not seen yet, in other clients'
        # words than geth's "unknown block":
        (-32000, "block not found", Verdict.TRANSIENT),
        (-32001, "Block with hash 0x" + "ab" * 32 + " could not be found", Verdict.TRANSIENT),
        (-39001, "Unknown block", Verdict.TRANSIENT),
        (-32602, "invalid argument 0: hex string without 0x prefix", Verdict.FINAL),
        (-32601, "the method eth_foo does not exist/is not available", Verdict.FINAL),
    ],
)
def test_other_errors_classify_as_transient_or_final(
    code: int, message: str, verdict: Verdict
) -> None:
    """Rate limits and node hiccups are transient; bad requests are final, whatever the method."""
    assert classify(code, message, "eth_getLogs") is verdict
    assert classify(code, message, "eth_getBlockByNumber") is verdict


def test_http_statuses_are_classified() -> None:
    """413 on an eth_getLogs range is a range error, on another batch a refusal of that batch
    alone, on another single call transient; 429/5xx are transient, other 4xx are final (for
    a batch: batches refused for a while)."""
    with pytest.raises(RpcRangeTooLarge):
        check_status(413, b"", None, "eth_getLogs", shrinkable=True)
    with pytest.raises(RpcRangeTooLarge):
        check_status(413, b"", None, "eth_getLogs", batch=True, shrinkable=True)
    with pytest.raises(BatchRejected) as rejected:
        check_status(413, b"", None, "eth_getLogs", batch=True)
    assert not rejected.value.lasting
    with pytest.raises(TransientFailure):
        check_status(413, b"", None, "eth_getLogs")
    with pytest.raises(BatchRejected) as rejected:
        check_status(400, b"<html>blocked</html>", None, "eth_getBlockByNumber", batch=True)
    assert rejected.value.lasting
    # A batch answered 4xx with an error object: what the error says, not "no batches here".
    behind = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"header not found"}}'
    with pytest.raises(TransientFailure):
        check_status(400, behind, None, "eth_getLogs", batch=True)
    refused = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"batch not allowed"}}'
    with pytest.raises(BatchRejected):
        check_status(400, refused, None, "eth_getLogs", batch=True)
    with pytest.raises(TransientFailure) as raised:
        check_status(429, b"", "7", "eth_blockNumber")
    assert raised.value.retry_after == 7
    with pytest.raises(TransientFailure):
        check_status(502, b"<html>", None, "eth_blockNumber")
    with pytest.raises(RpcResponseError):
        check_status(400, b"bad request", None, "eth_blockNumber")


@pytest.mark.parametrize("status", [404, 405, 410])
def test_a_batch_answered_no_such_endpoint_is_a_refusal_only_when_json_rpc_says_so(
    status: int,
) -> None:
    """404/405/410 without a JSON-RPC error is no JSON-RPC at that URL (a mistyped path): an
    unusable answer, for a batch as for one call, not a refusal of batches, which would lose
    them for nothing. With a JSON-RPC error body the endpoint does speak JSON-RPC: a final
    error to a batch then refuses batches (the calls go one by one), as for any other status."""
    for body in (b"", b"<html>Not Found</html>"):
        for batch in (False, True):
            with pytest.raises(RpcResponseError) as raised:
                check_status(status, body, None, "eth_getBlockByNumber", batch=batch)
            assert raised.value.code is None
    refused = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"batch not allowed"}}'
    with pytest.raises(BatchRejected):
        check_status(status, refused, None, "eth_getBlockByNumber", batch=True)
    with pytest.raises(RpcResponseError) as raised:
        check_status(status, refused, None, "eth_getBlockByNumber")
    assert raised.value.code == -32600
    behind = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"header not found"}}'
    with pytest.raises(TransientFailure):
        check_status(status, behind, None, "eth_getBlockByNumber", batch=True)


def _log_item(**changes: Any) -> dict[str, Any]:
    item = {
        "address": "0x" + "11" * 20,
        "topics": [TOPIC0],
        "data": "0x",
        "blockNumber": "0xa",
        "blockHash": "0x" + "22" * 32,
        "transactionHash": "0x" + "33" * 32,
        "transactionIndex": "0x0",
        "logIndex": "0x0",
        "removed": False,
    }
    return item | changes


@pytest.mark.parametrize(
    "result",
    [
        [_log_item(blockNumber="0x14")],
        [_log_item(address="0x" + "99" * 20)],
        [_log_item(topics=["0x" + "cd" * 32])],
        [_log_item(), _log_item(data="0x01")],
        [_log_item(blockHash="0x1234")],
        [_log_item(data="0xabc")],
        [_log_item(data="0xab ")],
        [_log_item(data="0x0_a")],
        [_log_item(address="0X" + "11" * 20)],
        [_log_item(blockHash="0x" + "22" * 32 + "\n")],
        [_log_item(topics=[TOPIC0 + " "])],
        {"logs": []},
    ],
    ids=["outside-range", "foreign-address", "foreign-topic", "conflict", "bad-hash", "odd-data",
         "data-space", "data-underscore", "address-0X", "hash-newline", "topic-space",
         "not-a-list"],
)  # fmt: skip
def test_unexpected_logs_are_rejected(result: object) -> None:
    """A log outside the range, not asked for, malformed, or another log at the position of
    one in the answer fails the whole answer."""
    query = LogQuery.build(5, 15, ["0x" + "11" * 20], [TOPIC0])
    assert parse_logs([_log_item()], query)
    with pytest.raises(RpcResponseError):
        parse_logs(result, query)


def test_a_log_repeated_whole_is_taken_once() -> None:
    """Some providers repeat a log in an answer: the copies are the same log, taken once
    (an error here stopped the indexer on every restart, as the answer stays the same)."""
    query = LogQuery.build(5, 15, ["0x" + "11" * 20], [TOPIC0])
    later = _log_item(logIndex="0x1", data="0x02")
    logs = parse_logs([_log_item(), later, _log_item(), later, later], query)
    assert [(lg.log_index, lg.data) for lg in logs] == [(0, "0x"), (1, "0x02")]


def _header_item(**changes: Any) -> dict[str, Any]:
    item = {
        "number": "0x5",
        "hash": "0x" + "22" * 32,
        "parentHash": "0x" + "11" * 32,
        "timestamp": "0x6553f100",
    }
    return item | changes


@pytest.mark.parametrize(
    "changes",
    [
        {"timestamp": "0xffffffffffffff"},  # past year 9999: no date has it
        {"number": "0x" + "f" * 300},  # past what any chain (or Postgres's bigint) holds
        {"number": "0x8000000000000000"},
        {"timestamp": "0x"},
        {"logsBloom": "0x" + "00" * 255},
        {"logsBloom": "0x" + "0g" * 256},
        {"logsBloom": "0X" + "00" * 256},
        {"logsBloom": 0},
    ],
    ids=["timestamp-past-9999", "huge-number", "number-past-bigint", "empty", "bloom-short",
         "bloom-not-hex", "bloom-0X", "bloom-number"],
)  # fmt: skip
def test_a_header_with_impossible_values_is_a_bad_response(changes: dict[str, str]) -> None:
    """A buggy or hostile node's out-of-range numbers fail the answer as malformed (named as
    the node's fault, retried by the caller's policy), not deep in the indexer as a crash."""
    assert parse_header(_header_item(), None).number == 5
    with pytest.raises(RpcResponseError):
        parse_header(_header_item(**changes), None)


@pytest.mark.parametrize(
    "value",
    ["0x1_0", "0x_1", "0x10 ", "0x10\n", "0x 10", "0x-1", "0x+1", "0x", "0X10", "0x0x10",
     "0x\u0661\u0660", "0x\uff11\uff10", "0xg", "10", "", 16, None, True],
    ids=["underscore", "leading-underscore", "trailing-space", "trailing-newline",
         "inner-space", "minus", "plus", "empty", "capital-x", "double-prefix", "arabic-digits",
         "fullwidth-digits", "not-hex", "no-prefix", "empty-string", "json-number", "null",
         "boolean"],
)  # fmt: skip
def test_a_malformed_quantity_is_a_bad_response(value: object) -> None:
    """A quantity is 0x and hex digits; leading zeros are taken (geth-compatible nodes accept
    them), but whatever else Python's int() would tolerate (underscores, whitespace, signs,
    non-ASCII digits) fails the answer as malformed, in a header as in a log."""
    assert parse_quantity("0x00a", "log index", "eth_getLogs") == 10
    assert parse_quantity("0xAbC", "log index", "eth_getLogs") == 0xABC
    with pytest.raises(RpcResponseError, match="not a hex quantity"):
        parse_quantity(value, "log index", "eth_getLogs")
    with pytest.raises(RpcResponseError, match="block number is not a hex quantity"):
        parse_header(_header_item(number=value), None)
    query = LogQuery.build(5, 15, ["0x" + "11" * 20], [TOPIC0])
    with pytest.raises(RpcResponseError, match="log index is not a hex quantity"):
        parse_logs([_log_item(logIndex=value)], query)


def test_a_header_without_a_usable_bloom_keeps_none() -> None:
    """Some nodes leave the logs bloom out (or null), and Lotus sets every bit of it: either
    says nothing of the block's logs, so the header is taken without one."""
    bloom = bytes(range(256))
    assert parse_header(_header_item(logsBloom="0x" + bloom.hex()), None).logs_bloom == bloom
    assert parse_header(_header_item(logsBloom="0x" + bloom.hex().upper()), None).logs_bloom
    for absent in (_header_item(), _header_item(logsBloom=None)):
        assert parse_header(absent, None).logs_bloom is None
    full = _header_item(logsBloom="0x" + FULL_BLOOM.hex())
    assert parse_header(full, None).logs_bloom is None


def test_a_header_by_hash_that_is_null_or_another_block_does_not_prove_the_block() -> None:
    """A node that answers eth_getBlockByHash with null, or with another block, has not shown
    that it has the block: the attempt fails as transient (retried), its logs never taken."""
    header = parse_header(_header_item(), None)
    check_has_block(_header_item(), header)
    for answer in (None, _header_item(hash="0x" + "33" * 32)):
        with pytest.raises(TransientFailure):
            check_has_block(answer, header)
    with pytest.raises(RpcResponseError):
        check_has_block(_header_item(number="0x6"), header)


@pytest.mark.parametrize("bad_id", [[1], {"id": 1}, 1.5, True])
def test_a_batch_answer_with_a_strange_id_is_a_bad_response(bad_id: object) -> None:
    answer = [{"jsonrpc": "2.0", "id": bad_id, "result": "0x1"}]
    assert batch_results([{"jsonrpc": "2.0", "id": 1, "result": "0x1"}], [1], "eth_x") == ["0x1"]
    with pytest.raises(RpcResponseError):
        batch_results(answer, [1], "eth_x")


def _rpc_error(request_id: object, code: int, message: str) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


@pytest.mark.parametrize(
    "answer",
    [
        _rpc_error(None, -32005, "Number of requests exceeds max batch size"),  # Besu
        [_rpc_error(1, -32600, "batch too large")],  # geth: the first call's id
        [_rpc_error(1, -32600, "batch limit 2 exceeded (can increase by --rpc.batch.limit)")],
        [_rpc_error(None, -32005, "Number of requests exceeds max batch size")],
        [  # Nethermind, a cap on the answer's size, on the calls past it
            {"jsonrpc": "2.0", "id": 1, "result": "0x1"},
            _rpc_error(2, -32005, "MaxBatchResponseBodySize 30000000 exceeded"),
        ],
        [  # geth, the same cap (--rpc.batch-response-max-size)
            {"jsonrpc": "2.0", "id": 1, "result": "0x1"},
            _rpc_error(2, -32003, "response too large"),
        ],
    ],
)
def test_a_cap_on_a_batch_refuses_that_batch_only(answer: object) -> None:
    """A batch over an endpoint's cap on calls or on the answer's size, in each server's
    shape, is refused as too large (to be halved), not as "no batches here" nor as an
    unusable or transient answer."""
    with pytest.raises(BatchRejected) as rejected:
        batch_results(answer, [1, 2], "eth_getBlockByNumber")
    assert not rejected.value.lasting


def test_a_log_marked_removed_makes_the_range_be_fetched_again() -> None:
    """eth_getLogs answers with logs of the canonical chain; a node that marks one removed saw
    its block replaced meanwhile, so the answer is not stored but fetched again."""
    query = LogQuery.build(5, 15, ["0x" + "11" * 20], [TOPIC0])
    with pytest.raises(ReorgDuringFetch):
        parse_logs([_log_item(removed=True)], query)


def test_sizer_doubles_on_success_up_to_the_maximum() -> None:
    """on_success doubles the size and stops at the maximum."""
    sizer = LogRangeSizer(initial=100, minimum=10, maximum=350)
    sizes = []
    for _ in range(3):
        sizer.on_success()
        sizes.append(sizer.size)
    assert sizes == [200, 350, 350]


def test_sizer_halves_when_refused_and_raises_at_the_minimum() -> None:
    """on_too_large halves down to the minimum, then raises RpcRangeTooLarge."""
    sizer = LogRangeSizer(initial=100, minimum=30, maximum=100)
    sizer.on_too_large()
    assert sizer.size == 50
    sizer.on_too_large()
    assert sizer.size == 30
    with pytest.raises(RpcRangeTooLarge, match="minimum is 30"):
        sizer.on_too_large()


def test_sizer_halves_the_refused_span_not_the_size() -> None:
    """A refused short chunk (the tail of a range) shrinks the size below that chunk."""
    sizer = LogRangeSizer(initial=1000, minimum=1, maximum=1000)
    sizer.on_too_large(span=10)
    assert sizer.size == 5


def test_sizer_regrows_past_a_refused_size_only_after_a_streak() -> None:
    """After a refusal the size stays at the last good size until probe_after successes."""
    sizer = LogRangeSizer(initial=800, minimum=1, maximum=10_000, probe_after=4)
    sizer.on_too_large()
    sizes = []
    for _ in range(4):
        sizer.on_success()
        sizes.append(sizer.size)
    assert sizes == [400, 400, 400, 800]


def test_sizer_rejects_inconsistent_bounds() -> None:
    """Bounds must satisfy 1 <= minimum <= initial <= maximum."""
    with pytest.raises(ValueError, match="minimum"):
        LogRangeSizer(initial=5, minimum=10, maximum=20)


@given(
    bounds=st.lists(st.integers(1, 100_000), min_size=3, max_size=3).map(sorted),
    steps=st.lists(st.one_of(st.none(), st.integers(1, 200_000), st.just(0)), max_size=100),
)
def test_sizer_size_stays_within_bounds(bounds: list[int], steps: list[int | None]) -> None:
    """Whatever happens, minimum <= size <= maximum; success never shrinks, refusal shrinks."""
    minimum, initial, maximum = bounds
    sizer = LogRangeSizer(initial=initial, minimum=minimum, maximum=maximum)
    for step in steps:
        before = sizer.size
        if step == 0:
            sizer.on_success()
            assert sizer.size >= before
        else:
            try:
                sizer.on_too_large(step)
            except RpcRangeTooLarge:
                assert min(before, step or before) <= minimum
                assert sizer.size == before
            else:
                assert sizer.size < before
        assert minimum <= sizer.size <= maximum


def test_an_unavailable_call_counts_its_attempts_in_words() -> None:
    """The message of a call given up: "1 attempt", not "1 attempts" (RPC_MAX_RETRIES=0)."""
    assert str(RpcUnavailable("eth_chainId", 1, "connect")) == (
        "eth_chainId failed after 1 attempt; last: connect"
    )
    assert "after 3 attempts" in str(RpcUnavailable("eth_chainId", 3, "connect"))
