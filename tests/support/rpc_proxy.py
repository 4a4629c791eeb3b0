"""A fault-injecting JSON-RPC proxy: a real HTTP server between a client under test and a node.

`RpcFaultProxy` listens on a free 127.0.0.1 port (`.url`) and forwards JSON-RPC requests,
single or batched, to an upstream node such as anvil. Each HTTP request may get one fault
instead of a faithful answer: the next entry of an explicit `schedule()` if there is one
(None there means "no fault"), otherwise a draw of a seeded RNG against `rates`, a probability
per fault kind (their sum at most 1):

    http_429        HTTP 429 with `Retry-After: <retry_after>`
    http_502        HTTP 502 Bad Gateway
    http_503        HTTP 503 Service Unavailable
    http_413        HTTP 413 Payload Too Large (a provider's size limit, for a body or an answer)
    rpc_rate_limit  HTTP 200, a JSON-RPC rate-limit error for every call (provider wordings rotate)
    timeout         the faithful answer, but only after `timeout_delay` seconds
    drop            the connection is closed without an answer
    invalid_json    HTTP 200 with a truncated body that is not JSON
    lagging         answered by a node `lag_blocks` (default 1) behind the others, as behind a
                    load balancer: an eth_getLogs range silently lacks the newest blocks' logs,
                    a blockHash query for one of them fails with "unknown block" (or, with
                    `empty_unknown_hash`, answers [] as Besu before 25.2, reth before 2024-03
                    and anvil before 2026-04 do), eth_blockNumber and "latest" give the node's
                    own top, the newest blocks by number or by hash are null (other calls
                    faithful)

Faults of the endpoint itself, not of the moment, which no retry on it cures (not in
FAULT_KINDS, whose faults a lone endpoint survives; usable in `rates` and `schedule()` alike):

    http_404        HTTP 404 Not Found, as a provider answers a URL with a mistyped path
    garbled         HTTP 200, every call answered with a result of the wrong shape

And one that only some requests get, as a web application firewall in front of a provider
blocks a request it dislikes (in OTHER_FAULTS; a single call answered so is unusable):

    http_400        HTTP 400 with an HTML page

Random faults hit only requests that call one of `fault_methods` (None: every method).

Besides, eth_getLogs is limited the way public providers limit it, deterministically:

    max_range       a filter spanning more than max_range blocks is refused with a range error
                    (wordings rotate; one of them is HTTP 413 for a single request)
    max_results     an answer with more than max_results logs becomes "more than N results"
    reject_batches  every batch is answered with one "batch not supported" error object
    max_batch       a batch of more than max_batch calls is answered HTTP 200 with one error,
                    by turns Besu's (an object, -32005 "Number of requests exceeds max batch
                    size", id null), geth's and Erigon's (a list of one -32600 "batch too
                    large" under the first call's id) and both the other way round
    max_body        a request body of more than max_body bytes is answered HTTP 413 (a
                    provider's or its proxy's size limit, e.g. nginx's client_max_body_size)

And, as a provider's endpoint of its own may be, deterministically:

    refused_methods a call of one of these methods (a mapping to (code, message)) is answered
                    with that JSON-RPC error, as a provider that disables a method or refuses
                    a key answers
    chain_id        eth_chainId answers this chain id: a URL of another network

And, as a node whose log index lags its headers (go-ethereum#26098, lotus#13749), for
eth_getLogs answers, by range or by block hash, deterministically:

    log_index_lag   the logs of a block are left out for this many seconds from when the
                    proxy first answered with its header (by number, "latest" or hash), or
                    its number (eth_blockNumber)
    hidden_blocks   the logs of the blocks with these numbers are always left out: a block
                    whose bloom names logs that the node never gives

`stale_header(number, header, times)` has the next `times` single eth_getBlockByNumber calls
for that number answered with `header`: a block as a backend still on a replaced branch has
it (batches are answered faithfully). `number` may be a block tag instead, "latest": the head
as such a backend reports it, while the calls by number reach another backend, as behind a
load balancer. `clear_stale()` drops the answers still queued.

Block tags ("latest") and blockHash filters are not range-checked. Every setting above is a
plain attribute and may be changed while the proxy runs.

Counters for assertions: `requests` (HTTP requests received), `forwarded` (HTTP requests sent
upstream), `methods` (Counter of JSON-RPC methods received), `calls` (every JSON-RPC call
received, as (method, params)) and `injected` (Counter of faults by kind, plus "range",
"results", "batch_rejected", "batch_too_large" and "body_too_large" for the provider
limits, "refused" for refused_methods, "hidden_logs" for the logs log_index_lag and
hidden_blocks left out). `on_call`, when set, is awaited with each call's
method and params before the request is answered (to hold one back).

    async with RpcFaultProxy(anvil.rpc_url, seed=7, rates={"http_503": 0.2}) as proxy:
        async with RpcClient([proxy.url], timeout=1, max_retries=10) as client: ...
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import socket
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp
import orjson
from aiohttp import web

__all__ = ["ENDPOINT_FAULTS", "FAULT_KINDS", "OTHER_FAULTS", "RpcFaultProxy"]

FAULT_KINDS = (
    "http_429",
    "http_502",
    "http_503",
    "http_413",
    "rpc_rate_limit",
    "timeout",
    "drop",
    "invalid_json",
    "lagging",
)
ENDPOINT_FAULTS = ("http_404", "garbled")
OTHER_FAULTS = ("http_400",)
ALL_FAULTS = FAULT_KINDS + ENDPOINT_FAULTS + OTHER_FAULTS
RATE_LIMIT_ERRORS = (
    (-32005, "limit exceeded"),
    (429, "Too Many Requests"),
    (-32000, "rate limit exceeded, retry in 1s"),
    (-32016, "Your app has exceeded its compute units per second capacity"),
)
# {n}: the proxy's max_range; "413" stands for an HTTP 413 answer instead of an error object.
RANGE_ERRORS = (
    (-32602, "block range too large"),
    (-32000, "exceed maximum block range: {n}"),
    (413, "Payload Too Large"),
    (-32600, "range is too large, max is {n} blocks"),
    (-32000, "Log response size exceeded. Try a block range of at most {n} blocks"),
    (-32000, "maximum [from, to] blocks distance: {n}"),  # Ethermint
    (-32002, "request timed out"),  # geth, past its own HTTP timeout
)
# {n}: the proxy's max_results.
RESULTS_ERRORS = (
    (-32005, "query returned more than {n} results"),
    (-32602, "Log response size exceeded: query returned more than {n} logs"),
    (-32000, "logs matched by query exceeds limit of {n}"),
)
SHUTDOWN_TIMEOUT = 0.2
JSON = "application/json"


class RpcFaultProxy:
    """A JSON-RPC reverse proxy on 127.0.0.1 that injects faults; an async context manager."""

    def __init__(
        self,
        upstream_url: str,
        *,
        seed: int,
        rates: Mapping[str, float] | None = None,
        fault_methods: Collection[str] | None = None,
        retry_after: float = 0,
        timeout_delay: float = 5.0,
        max_range: int | None = None,
        max_results: int | None = None,
        reject_batches: bool = False,
        max_batch: int | None = None,
        max_body: int | None = None,
        lag_blocks: int = 1,
        empty_unknown_hash: bool = False,
        refused_methods: Mapping[str, tuple[int, str]] | None = None,
        chain_id: int | None = None,
        log_index_lag: float = 0.0,
        hidden_blocks: Collection[int] = (),
    ) -> None:
        self.upstream_url = upstream_url
        self.rates = dict(rates or {})
        self.fault_methods = fault_methods
        self.retry_after = retry_after
        self.timeout_delay = timeout_delay
        self.max_range = max_range
        self.max_results = max_results
        self.reject_batches = reject_batches
        self.max_batch = max_batch
        self.max_body = max_body
        self.lag_blocks = lag_blocks
        self.empty_unknown_hash = empty_unknown_hash
        self.refused_methods = dict(refused_methods or {})
        self.chain_id = chain_id
        self.log_index_lag = log_index_lag
        self.hidden_blocks = set(hidden_blocks)
        self.delay = 0.0  # seconds before any request is handled: a remote node's round trip
        self.requests = 0
        self.forwarded = 0
        self.methods: Counter[str] = Counter()
        self.calls: list[tuple[str, list[Any]]] = []
        # Awaited with each call before it is answered: a test can hold a request back.
        self.on_call: Callable[[str, list[Any]], Awaitable[None]] | None = None
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._schedule: deque[str | None] = deque()
        self._stale: dict[str, deque[object]] = {}  # hex block number or tag -> headers
        self._block_seen: dict[int, float] = {}  # block number -> loop time first answered
        self._wordings = itertools.count()
        self._runner: web.AppRunner | None = None
        self._upstream: aiohttp.ClientSession | None = None
        self._port = 0

    @property
    def url(self) -> str:
        """The proxy's JSON-RPC URL."""
        return f"http://127.0.0.1:{self._port}"

    def schedule(self, *faults: str | None) -> None:
        """Queue faults for the next HTTP requests, in order; None lets one request through."""
        for fault in faults:
            if fault is not None and fault not in ALL_FAULTS:
                raise ValueError(f"unknown fault {fault!r}")
        self._schedule.extend(faults)

    def stale_header(self, number: int | str, header: object, times: int) -> None:
        """Answer the next `times` single eth_getBlockByNumber calls for block `number` (or a
        block tag: "latest") with `header` (as a backend on a replaced branch would)."""
        key = number if isinstance(number, str) else hex(number)
        self._stale.setdefault(key, deque()).extend([header] * times)

    def clear_stale(self) -> None:
        """Answer faithfully again: drop every stale header still queued."""
        self._stale.clear()

    async def __aenter__(self) -> Self:
        unknown = set(self.rates) - set(ALL_FAULTS)
        if unknown or sum(self.rates.values()) > 1:
            raise ValueError(f"rates must name known faults and sum to <= 1: {self.rates}")
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        self._upstream = aiohttp.ClientSession()
        try:
            await self._runner.setup()
            # Binding the socket ourselves gives a free port with no window for another taker.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            self._port = sock.getsockname()[1]
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._upstream is not None:
            await self._upstream.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        batch = isinstance(payload, list)
        calls = [c for c in (payload if batch else [payload]) if isinstance(c, dict)]
        self.methods.update(str(c.get("method")) for c in calls)
        received = [(str(c.get("method")), list(c.get("params") or [])) for c in calls]
        self.calls += received
        if self.on_call is not None:
            for method, params in received:
                await self.on_call(method, params)
        if not batch and (stale := self._stale_answer(payload)) is not None:
            self.injected["stale_header"] += 1
            return _json(stale)
        if self.max_body is not None and len(body) > self.max_body:
            self.injected["body_too_large"] += 1
            return web.Response(status=413, text="Payload Too Large")
        if batch and self.reject_batches:
            self.injected["batch_rejected"] += 1
            return _json(_error(None, -32600, "batch requests are not supported"))
        if batch and self.max_batch is not None and len(calls) > self.max_batch:
            turn = self.injected["batch_too_large"]
            self.injected["batch_too_large"] += 1
            if turn % 2 == 0:
                capped = _error(None, -32005, "Number of requests exceeds max batch size")
            else:
                capped = _error(calls[0].get("id"), -32600, "batch too large")
            return _json([capped] if turn % 4 in (1, 2) else capped)
        fault = self._pick_fault(str(c.get("method")) for c in calls)
        if fault is not None:
            self.injected[fault] += 1
            if fault == "drop":
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            if fault == "timeout":
                await asyncio.sleep(self.timeout_delay)
            elif fault == "lagging":
                return _json(await self._lagging(calls, batch))
            else:
                return self._fault_response(fault, calls, batch)
        if not batch and self._too_wide(payload):
            assert isinstance(payload, dict)
            refusal = self._refusal(payload, batch=False)
            if refusal is None:
                return web.Response(status=413, text="Payload Too Large")
            return _json(refusal)
        if not batch:
            status, raw = await self._upstream_post(body)
            if status != 200 or not self._rewrites():
                return web.Response(status=status, body=raw, content_type=JSON)
            return _json(self._limit_results(payload, orjson.loads(raw)))
        return await self._forward_batch(body, calls)

    def _stale_answer(self, call: object) -> dict[str, Any] | None:
        if not isinstance(call, dict) or call.get("method") != "eth_getBlockByNumber":
            return None
        params = call.get("params") or []
        queued = self._stale.get(params[0]) if params and isinstance(params[0], str) else None
        if not queued:
            return None
        return {"jsonrpc": "2.0", "id": call.get("id"), "result": queued.popleft()}

    def _pick_fault(self, methods: Iterable[str]) -> str | None:
        if self._schedule:
            return self._schedule.popleft()
        if self.fault_methods is not None and not set(methods) & set(self.fault_methods):
            return None
        draw = self._rng.random()
        for kind in ALL_FAULTS:
            draw -= self.rates.get(kind, 0.0)
            if draw < 0:
                return kind
        return None

    def _fault_response(self, fault: str, calls: list[dict[str, Any]], batch: bool) -> web.Response:
        if fault == "http_429":
            headers = {"Retry-After": f"{self.retry_after:g}"}
            return web.Response(status=429, text="Too Many Requests", headers=headers)
        if fault == "http_404":
            return web.Response(status=404, text="Not Found")
        if fault == "http_413":
            return web.Response(status=413, text="Payload Too Large")
        if fault == "http_400":
            page = "<html><body><h1>400 Bad Request</h1>Request blocked.</body></html>"
            return web.Response(status=400, text=page, content_type="text/html")
        if fault == "garbled":
            answers = [
                {"jsonrpc": "2.0", "id": c.get("id"), "result": {"garbled": 1}} for c in calls
            ]
            return _json(answers if batch else answers[0])
        if fault in ("http_502", "http_503"):
            return web.Response(status=int(fault[-3:]), text="upstream unavailable")
        if fault == "invalid_json":
            return web.Response(body=b'{"jsonrpc":"2.0","id":1,"result":[{"addr', content_type=JSON)
        assert fault == "rpc_rate_limit", fault
        code, message = self._wording(RATE_LIMIT_ERRORS)
        errors = [_error(c.get("id"), code, message) for c in calls]
        return _json(errors if batch else errors[0])

    async def _forward_batch(self, body: bytes, calls: list[dict[str, Any]]) -> web.Response:
        # Calls the range limit refuses are answered here; the others go upstream as one batch.
        refused = {id(c): self._refusal(c, batch=True) for c in calls if self._too_wide(c)}
        passed = [c for c in calls if id(c) not in refused]
        by_id: dict[object, object] = {}
        if passed:
            status, raw = await self._upstream_post(orjson.dumps(passed) if refused else body)
            if status != 200 or (not refused and not self._rewrites()):
                return web.Response(status=status, body=raw, content_type=JSON)
            answers = orjson.loads(raw)
            if not isinstance(answers, list):
                return _json(answers)
            by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
        return _json(
            [refused.get(id(c)) or self._limit_results(c, by_id.get(c.get("id"))) for c in calls]
        )

    async def _lagging(self, calls: list[dict[str, Any]], batch: bool) -> object:
        """Answer as a node that has not seen the newest `lag_blocks` blocks yet."""
        top = int(str(await self._upstream_call("eth_blockNumber", [])), 16) - self.lag_blocks
        answers = []
        for call in calls:
            params = call.get("params")
            filter_ = params[0] if isinstance(params, list) and params else None
            if call.get("method") == "eth_blockNumber":
                answers.append({"jsonrpc": "2.0", "id": call.get("id"), "result": hex(top)})
                continue
            if call.get("method") == "eth_getBlockByNumber" and isinstance(params, list):
                tag = str(filter_)
                number = top if tag == "latest" else int(tag, 16)
                call = {**call, "params": [hex(number), *params[1:]]}
                if number > top:
                    answers.append({"jsonrpc": "2.0", "id": call.get("id"), "result": None})
                    continue
            if call.get("method") == "eth_getBlockByHash" and isinstance(params, list):
                block = await self._upstream_call("eth_getBlockByHash", [filter_, False])
                if isinstance(block, dict) and int(block["number"], 16) > top:
                    answers.append({"jsonrpc": "2.0", "id": call.get("id"), "result": None})
                    continue
            answer = orjson.loads((await self._upstream_post(orjson.dumps(call)))[1])
            if call.get("method") == "eth_getLogs" and isinstance(filter_, dict):
                if "blockHash" in filter_:
                    block = await self._upstream_call(
                        "eth_getBlockByHash", [filter_["blockHash"], False]
                    )
                    if isinstance(block, dict) and int(block["number"], 16) > top:
                        answer = (
                            {"jsonrpc": "2.0", "id": call.get("id"), "result": []}
                            if self.empty_unknown_hash
                            else _error(call.get("id"), -32000, "unknown block")
                        )
                elif isinstance(answer.get("result"), list):
                    answer["result"] = [
                        lg for lg in answer["result"] if int(lg["blockNumber"], 16) <= top
                    ]
            answers.append(answer)
        return answers if batch else answers[0]

    async def _upstream_call(self, method: str, params: list[object]) -> object:
        _, raw = await self._upstream_post(
            orjson.dumps({"jsonrpc": "2.0", "id": 0, "method": method, "params": params})
        )
        return orjson.loads(raw).get("result")

    async def _upstream_post(self, body: bytes) -> tuple[int, bytes]:
        assert self._upstream is not None
        self.forwarded += 1
        async with self._upstream.post(
            self.upstream_url, data=body, headers={"Content-Type": JSON}
        ) as upstream:
            return upstream.status, await upstream.read()

    def _too_wide(self, call: object) -> bool:
        if self.max_range is None or not isinstance(call, dict):
            return False
        if call.get("method") != "eth_getLogs":
            return False
        span = _span(call)
        return span is not None and span > self.max_range

    def _refusal(self, call: dict[str, Any], *, batch: bool) -> dict[str, Any] | None:
        """Return the error answer refusing a too-wide range; None means "answer HTTP 413"."""
        self.injected["range"] += 1
        code, message = self._wording(RANGE_ERRORS)
        if code == 413:
            if not batch:
                return None
            code, message = RANGE_ERRORS[0]  # a status code cannot answer one call of a batch
        return _error(call.get("id"), code, message.format(n=self.max_range))

    def _rewrites(self) -> bool:
        """Whether answers from upstream may be changed here, so must be decoded."""
        return bool(
            self.max_results is not None
            or self.refused_methods
            or self.chain_id is not None
            or self.log_index_lag
            or self.hidden_blocks
        )

    def _limit_results(self, call: object, answer: object) -> object:
        if not isinstance(call, dict) or not isinstance(answer, dict):
            return answer
        method = call.get("method")
        if self.log_index_lag or self.hidden_blocks:
            answer = self._hide_logs(method, answer)
        if isinstance(method, str) and method in self.refused_methods:
            self.injected["refused"] += 1
            return _error(call.get("id"), *self.refused_methods[method])
        if method == "eth_chainId" and self.chain_id is not None:
            return {**answer, "result": hex(self.chain_id)}
        if self.max_results is None:
            return answer
        result = answer.get("result")
        if call.get("method") != "eth_getLogs" or not isinstance(result, list):
            return answer
        if len(result) <= self.max_results:
            return answer
        self.injected["results"] += 1
        code, message = self._wording(RESULTS_ERRORS)
        return _error(call.get("id"), code, message.format(n=self.max_results))

    def _hide_logs(self, method: object, answer: dict[str, Any]) -> dict[str, Any]:
        """Note when a block was first answered; leave out the logs not to be seen yet."""
        now = asyncio.get_running_loop().time()
        result = answer.get("result")
        if method == "eth_blockNumber" and isinstance(result, str):
            self._block_seen.setdefault(int(result, 16), now)
        elif method in ("eth_getBlockByNumber", "eth_getBlockByHash") and isinstance(result, dict):
            self._block_seen.setdefault(int(result["number"], 16), now)
        elif method == "eth_getLogs" and isinstance(result, list):
            # A block never answered (a catch-up range's) is taken as indexed long ago.
            kept = [
                lg
                for lg in result
                if int(lg["blockNumber"], 16) not in self.hidden_blocks
                and now - self._block_seen.get(int(lg["blockNumber"], 16), -math.inf)
                >= self.log_index_lag
            ]
            if len(kept) < len(result):
                self.injected["hidden_logs"] += len(result) - len(kept)
                return {**answer, "result": kept}
        return answer

    def _wording(self, wordings: tuple[tuple[int, str], ...]) -> tuple[int, str]:
        return wordings[next(self._wordings) % len(wordings)]


def _span(call: dict[str, Any]) -> int | None:
    """Return the number of blocks an eth_getLogs call spans, None if it names no numbers."""
    params = call.get("params")
    filter_ = params[0] if isinstance(params, list) and params else None
    if not isinstance(filter_, dict):
        return None
    try:
        return int(filter_["toBlock"], 16) - int(filter_["fromBlock"], 16) + 1
    except (KeyError, TypeError, ValueError):
        return None


def _error(request_id: object, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _json(payload: object) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type=JSON)
