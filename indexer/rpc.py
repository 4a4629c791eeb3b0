"""JSON-RPC client of the indexer: failover, bounded retries, batches and checked answers.

The transport is aiohttp, not web3's AsyncHTTPProvider. web3 8's provider can switch its own
retries off and send batches, but its default session closes the connection after every
request (`force_close=True`), its timeout is per provider rather than per call, it decodes with
the stdlib json through an extra text copy, and it logs the full endpoint URL (API key and all)
at debug level. Measured on a local anvil: 100 batched eth_getBlockByNumber took 2-3 ms with
aiohttp and orjson against 5-7 ms through the provider, 200 sequential eth_blockNumber 70-80 ms
against 110-260 ms; a 10,000-log eth_getLogs costs the same either way (decoding dominates).

Either a call returns a complete, checked answer or it raises an `RpcError`. The pieces:
`rpc_transport` makes one HTTP attempt, `rpc_wire` classifies failures, `rpc_results` checks
answers, `rpc_ranges` splits long eth_getLogs ranges and `rpc_failover` retries and fails over;
this module builds the calls and re-exports.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self, TypeVar

import aiohttp

from indexer import rpc_wire as wire
from indexer.errors import AnotherChain, ChainIdMismatch
from indexer.rpc_failover import FAILBACK_AFTER, RETRY_AFTER_MAX, Failover, RpcStats
from indexer.rpc_ranges import LogRangeSizer, fetch_logs
from indexer.rpc_results import (
    BlockHeader,
    LogQuery,
    RawLog,
    TopicFilter,
    check_has_block,
    parse_header,
    parse_logs,
)
from indexer.rpc_transport import MAX_ANSWER_BYTES, Endpoint, post

__all__ = [
    "BlockHeader",
    "LogRangeSizer",
    "RawLog",
    "RpcClient",
    "RpcStats",
    "TopicFilter",
    "fetch_logs",
]

DEFAULT_MAX_BATCH_SIZE = 100
# After an endpoint refuses a batch, its calls go one by one for this long, then batches are
# tried again: one refusal costs that many seconds without range proofs, not all of them.
DEFAULT_BATCH_RETRY_INTERVAL = 600.0
GET_BLOCK_BY_HASH = "eth_getBlockByHash"

T = TypeVar("T")
# A JSON-RPC call: method and parameters.
Call = tuple[str, Sequence[object]]


class RpcClient:
    """JSON-RPC over HTTP to the first working endpoint of several, with bounded retries."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout: float,
        max_retries: int,
        backoff_base: float = 0.2,
        backoff_max: float = 10.0,
        retry_after_max: float = RETRY_AFTER_MAX,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_retry_interval: float = DEFAULT_BATCH_RETRY_INTERVAL,
        expected_chain_id: int | None = None,
        first_index: int = 0,
        failback_after: float = FAILBACK_AFTER,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        if not urls:
            raise ValueError("at least one RPC URL is required")
        if timeout <= 0 or max_retries < 0 or max_batch_size < 1 or batch_retry_interval < 0:
            raise ValueError(
                "timeout and max_batch_size must be positive, max_retries and"
                " batch_retry_interval >= 0"
            )
        # Endpoints are named "#i host" in logs and errors, counted from first_index: a client
        # given one URL of RPC_PROVIDER_URL (kektech doctor probes each alone) names it as the
        # indexer does.
        self._failover = Failover(
            [Endpoint.from_url(i, url) for i, url in enumerate(urls, start=first_index)],
            attempts=max_retries + 1,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            retry_after_max=retry_after_max,
            batch_retry_interval=batch_retry_interval,
            max_batch_size=max_batch_size,
            verify=self._verify_chain,
            failback_after=failback_after,
        )
        self._expected_chain_id = expected_chain_id
        self._genesis: str | None = None  # the hash of block 0 every endpoint must have
        self._timeout = timeout
        self._max_answer = max_answer_bytes
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self.stats = self._failover.stats

    async def __aenter__(self) -> Self:
        # One keep-alive pool for every endpoint; the timeout bounds each attempt, not a call.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout), raise_for_status=False
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def chain_id(self) -> int:
        """Return the chain id of the current endpoint."""
        return await self._call("eth_chainId", [], _parse_chain_id)

    async def block_number(self) -> int:
        """Return the number of the newest block."""
        return await self._call("eth_blockNumber", [], _parse_block_number)

    async def get_block_header(self, number: int) -> BlockHeader:
        """Return the header of a block; BlockNotFound if the node does not have it yet."""
        return await self._call(
            "eth_getBlockByNumber", _block_params(number), lambda r: parse_header(r, number)
        )

    async def get_head(self) -> BlockHeader:
        """Return the header of the newest block."""
        return await self._call(
            "eth_getBlockByNumber", ["latest", False], lambda r: parse_header(r, None)
        )

    async def get_block_headers(self, numbers: Sequence[int]) -> list[BlockHeader]:
        """Return the headers of several blocks in order, fetched in JSON-RPC batches."""
        return await self._request_batch(
            "eth_getBlockByNumber",
            [_block_params(n) for n in numbers],
            lambda i, result: parse_header(result, numbers[i]),
        )

    async def get_logs(
        self,
        from_block: int,
        to_block: int,
        *,
        addresses: Sequence[str],
        topics: TopicFilter | None = None,
        shrinkable: bool = True,
    ) -> list[RawLog]:
        """Return every log of the inclusive range in one call; RpcRangeTooLarge if refused.

        A node that has not seen the range's last block answers with an empty or partial list,
        not an error, and behind a load balancer it may be another node than the one that gave
        the head. So the header of `to_block` goes in the same batch (one HTTP request, one
        node): an answer without it is retried like "unknown block". An endpoint that refuses
        batches gets the query alone, unproven; which of the two is decided at each attempt,
        by the endpoint it goes to. `shrinkable`: a smaller range could replace this one, so
        a range refusal raises RpcRangeTooLarge, and a timeout RpcRangeTimedOut after failing
        over (the endpoint may hang rather than find the range heavy).
        """
        query = LogQuery.build(from_block, to_block, addresses, topics)
        logs_id, header_id, alone_id = next(self._ids), next(self._ids), next(self._ids)
        proven = wire.encode_calls(
            [
                (logs_id, wire.GET_LOGS, query.params()),
                (header_id, "eth_getBlockByNumber", _block_params(to_block)),
            ]
        )
        alone = wire.encode_request(alone_id, wire.GET_LOGS, query.params())

        async def with_proof(endpoint: Endpoint) -> list[RawLog]:
            payload = await self._post(
                endpoint, proven, wire.GET_LOGS, shrinkable=shrinkable, batch=True
            )
            ids = [logs_id, header_id]
            result, header = wire.batch_results(payload, ids, wire.GET_LOGS, shrinkable=shrinkable)
            if header is None:
                raise wire.TransientFailure("behind", f"the node has no block {to_block} yet")
            parse_header(header, to_block)  # checked: a wrong one is an error, not a proof
            return parse_logs(result, query)

        async def attempt(endpoint: Endpoint) -> list[RawLog]:
            # Decided at each attempt: a retry may go to an endpoint that can prove its answer.
            if endpoint.batches:
                try:
                    return await with_proof(endpoint)
                except wire.BatchRejected as rejected:
                    self._failover.batch_refused(endpoint, rejected)
            payload = await self._post(endpoint, alone, wire.GET_LOGS, shrinkable=shrinkable)
            result = wire.result_of(payload, alone_id, wire.GET_LOGS, shrinkable=shrinkable)
            return parse_logs(result, query)

        return await self._failover.run(wire.GET_LOGS, attempt)

    async def get_logs_at(
        self, headers: Sequence[BlockHeader], *, addresses: Sequence[str]
    ) -> list[RawLog]:
        """Return the logs of the given blocks, asked by block hash, in JSON-RPC batches.

        A node that has not seen a block answers its hash with "unknown block", or on some
        versions (Besu before 25.2, reth before 2024-03, anvil before 2026-04) with an empty
        list, as a backend behind its siblings does behind a load balancer. So each block's
        header is asked by hash in the same batch as its logs (one HTTP request, one node),
        before them: a null or other header is retried like "unknown block", never taken as
        "no logs". An endpoint that refuses batches gets the header, then the logs, one by
        one in the same attempt: a node that gave the header has the block, but a load
        balancer may send the two requests to different backends, a window left open there
        as for a range sent alone. Used at the tip, where a node may still lack the logs of a
        block it has: RangeBatches.tip checks an empty answer against the header's bloom.
        """
        queries = [LogQuery.at_block(header, addresses) for header in headers]

        def parse(i: int, results: Sequence[object]) -> list[RawLog]:
            block, logs = results
            check_has_block(block, headers[i])
            return parse_logs(logs, queries[i])

        answers = await self._request_groups(
            wire.GET_LOGS,
            [
                [(GET_BLOCK_BY_HASH, [header.hash, False]), (wire.GET_LOGS, query.params())]
                for header, query in zip(headers, queries, strict=True)
            ],
            parse,
        )
        return [log for logs in answers for log in logs]

    async def request(self, method: str, params: Sequence[object] = ()) -> object:
        """Call any JSON-RPC method and return its unchecked result."""
        return await self._call(method, list(params), _unchecked)

    async def _request_batch(
        self,
        method: str,
        params_list: Sequence[Sequence[object]],
        parse: Callable[[int, object], T],
    ) -> list[T]:
        """Call one method once per parameter list, in batches; answers in request order.

        parse(i, result) checks the result of params_list[i], in the attempt that got it.
        """
        return await self._request_groups(
            method,
            [[(method, params)] for params in params_list],
            lambda i, results: parse(i, results[0]),
        )

    async def _request_groups(
        self,
        method: str,
        groups: Sequence[Sequence[Call]],
        parse: Callable[[int, Sequence[object]], T],
    ) -> list[T]:
        """Send groups of calls in batches, each group whole in one; answers in group order.

        parse(i, results) checks the results of groups[i] together, in the attempt that got
        them. `method` names the groups' work in errors and logs. A batch holds at most
        max_batch_size calls, or what the current endpoint took after refusing a larger
        batch as too large (HTTP 413, a cap on calls): each refusal halves its batches, for
        this call and later ones. A batch refused as such goes group by group, each group's
        calls one by one on one endpoint, in order.
        """
        answers: list[T] = []
        widest = max((len(g) for g in groups), default=1)
        start = 0
        while start < len(groups):
            # Sized at each batch: a refusal, or a failover, changes the size to use.
            chunk = groups[start : start + max(1, self._failover.batch_size() // widest)]
            if self._batches:
                try:
                    answers += await self._batch(method, chunk, start, parse)
                    start += len(chunk)
                    continue
                except wire.BatchRejected as rejected:
                    # batch_too_large has halved the endpoint's batches: try again smaller.
                    if not rejected.lasting and len(chunk) > 1:
                        continue
            for i, calls in enumerate(chunk, start):
                answers.append(await self._in_sequence(method, calls, functools.partial(parse, i)))
            start += len(chunk)
        return answers

    @property
    def _batches(self) -> bool:
        """Whether the current endpoint takes batches, as far as the client knows."""
        return self._failover.current.batches

    async def _call(
        self,
        method: str,
        params: list[object],
        parse: Callable[[object], T],
        *,
        shrinkable: bool = False,
    ) -> T:
        """One call; parse checks its result in the attempt, so a bad answer can fail over."""
        return await self._in_sequence(
            method, [(method, params)], lambda results: parse(results[0]), shrinkable=shrinkable
        )

    async def _in_sequence(
        self,
        method: str,
        calls: Sequence[Call],
        parse: Callable[[Sequence[object]], T],
        *,
        shrinkable: bool = False,
    ) -> T:
        """Calls one by one, in order, each attempt on one endpoint; parse checks the results
        together in the attempt, so a bad answer can fail over."""
        requests = [(next(self._ids), call_method, params) for call_method, params in calls]
        bodies = [wire.encode_request(*request) for request in requests]

        async def attempt(endpoint: Endpoint) -> T:
            results = []
            for (request_id, call_method, _), body in zip(requests, bodies, strict=True):
                payload = await self._post(endpoint, body, call_method, shrinkable=shrinkable)
                results.append(
                    wire.result_of(payload, request_id, call_method, shrinkable=shrinkable)
                )
            return parse(results)

        return await self._failover.run(method, attempt)

    async def _batch(
        self,
        method: str,
        groups: Sequence[Sequence[Call]],
        first: int,
        parse: Callable[[int, Sequence[object]], T],
    ) -> list[T]:
        """One batch; parse(first + i, results) checks the results of groups[i]."""
        ids = [[next(self._ids) for _ in calls] for calls in groups]
        count = sum(len(group_ids) for group_ids in ids)
        body = wire.encode_calls(
            [
                (request_id, call_method, params)
                for group_ids, calls in zip(ids, groups, strict=True)
                for request_id, (call_method, params) in zip(group_ids, calls, strict=True)
            ]
        )

        async def attempt(endpoint: Endpoint) -> list[T]:
            try:
                payload = await self._post(endpoint, body, method, batch=True)
                answers = wire.batch_results(payload, list(itertools.chain(*ids)), method)
            except wire.BatchRejected as rejected:
                if not rejected.lasting:
                    self._failover.batch_too_large(endpoint, count)
                raise
            self._failover.batch_taken(endpoint, count)
            results = iter(answers)
            return [
                parse(i, list(itertools.islice(results, len(group_ids))))
                for i, group_ids in enumerate(ids, first)
            ]

        return await self._failover.run(method, attempt)

    def expect_genesis(self, block_hash: str) -> None:
        """From now on an endpoint serves the chain only if its block 0 is this one too (the
        chain id alone does not tell a fork or a node set up again from scratch): each is
        checked again before its next use, and one that differs is left out (AnotherChain
        once every endpoint does)."""
        self._genesis = block_hash
        self._failover.verify_again()

    async def _verify_chain(self, endpoint: Endpoint) -> None:
        """Before an endpoint's first use: raise ChainIdMismatch unless it serves the expected
        chain id, AnotherChain if its block 0 is not the expected one (expect_genesis)."""
        expected = self._expected_chain_id
        if expected is not None:
            request_id = next(self._ids)
            body = wire.encode_request(request_id, "eth_chainId", [])
            payload = await self._post(endpoint, body, "eth_chainId")
            actual = _parse_chain_id(wire.result_of(payload, request_id, "eth_chainId"))
            if actual != expected:
                raise ChainIdMismatch(expected, actual, endpoint.label)
        if self._genesis is None:
            return
        request_id = next(self._ids)
        body = wire.encode_request(request_id, "eth_getBlockByNumber", _block_params(0))
        payload = await self._post(endpoint, body, "eth_getBlockByNumber")
        genesis = parse_header(wire.result_of(payload, request_id, "eth_getBlockByNumber"), 0)
        if genesis.hash != self._genesis:
            raise AnotherChain(
                expected or 0, expected=self._genesis, actual=genesis.hash, endpoint=endpoint.label
            )

    async def _post(
        self,
        endpoint: Endpoint,
        body: bytes,
        method: str,
        *,
        shrinkable: bool = False,
        batch: bool = False,
    ) -> object:
        assert self._session is not None, "RpcClient used outside `async with`"
        self.stats.attempts += 1
        return await post(
            self._session,
            endpoint,
            body,
            method,
            shrinkable=shrinkable,
            batch=batch,
            max_answer=self._max_answer,
        )


def _parse_chain_id(result: object) -> int:
    return wire.parse_quantity(result, "chain id", "eth_chainId")


def _parse_block_number(result: object) -> int:
    return wire.parse_quantity(result, "block number", "eth_blockNumber")


def _unchecked(result: object) -> object:
    return result


def _block_params(number: int) -> list[object]:
    if number < 0:
        raise ValueError(f"negative block number {number}")
    return [hex(number), False]
