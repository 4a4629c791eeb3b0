"""The JSON-RPC wire format: answer envelopes, HTTP statuses and what each failure means.

Pure functions over bytes and decoded JSON, no I/O. Every failure lands in one of three bins,
which decide what RpcClient does next: transient (`TransientFailure`: back off and try the next
endpoint), a range error (`RpcRangeTooLarge`: eth_getLogs asked for too much, the caller
shrinks the range) or final (`RpcResponseError`: raise at once, retrying cannot help).
"""

from __future__ import annotations

import email.utils
import enum
import re
import time
from collections.abc import Sequence
from typing import NoReturn

import orjson

from indexer.errors import RpcRangeTooLarge, RpcResponseError

__all__ = [
    "BatchRejected",
    "TransientFailure",
    "Verdict",
    "batch_results",
    "check_status",
    "classify",
    "decode",
    "encode_request",
    "parse_quantity",
    "parse_retry_after",
    "result_of",
]

GET_LOGS = "eth_getLogs"
# EIP-1474 "limit exceeded", "internal error", and the HTTP status some providers copy in.
TRANSIENT_CODES = frozenset({-32005, -32603, 429})
# Statuses that say "this endpoint, now" rather than "this request": another endpoint or a
# later attempt may well succeed.
TRANSIENT_STATUSES = frozenset({401, 403, 408, 425, 429})
# Statuses that say "no JSON-RPC at this URL" (a mistyped path) for a batch as for a single
# call, unless the body holds a JSON-RPC error: not a refusal of batches, which would lose
# them for nothing.
NOT_AN_ENDPOINT_STATUSES = frozenset({404, 405, 410})
ERROR_EXCERPT = 200
# The largest quantity taken from a node: block numbers, log and transaction indexes, times
# and chain ids are Postgres bigints, and no chain comes near it.
MAX_QUANTITY = 2**63 - 1

# Provider wordings for an eth_getLogs query that asks for too much, checked before the
# transient patterns because Infura answers both "rate limited" and "more than 10000 results"
# with -32005.
_RANGE_PATTERNS = (
    r"block range",  # "block range too large", "exceed maximum block range: 5000"
    r"range (?:is )?too (?:large|wide|big)",  # "range is too large, max is 1k blocks"
    r"max(?:imum)? (?:is )?\d+k? blocks",
    r"more than \d+ (?:results|logs)",  # "query returned more than 10000 results"
    r"max(?:imum)? results",  # "query exceeds max results 20000"
    r"too many (?:results|logs|blocks)",
    r"response size",  # "Log response size exceeded"
    r"logs? (?:matched|limit)",  # "logs matched by query exceeds limit of 10000"
    r"query timeout",  # "Query timeout exceeded. Consider reducing your block range."
    r"\brange \d+ exceeds",  # "range 1000000 exceeds limit of 10000"
    r"limited to (?:a )?[\d,]+(?: blocks?)? range",  # "eth_getLogs is limited to a 10,000 range"
    r"exceed(?:s|ed)? (?:the )?max(?:imum)?(?: rpc)? range",  # Besu, Infura: "exceeds maximum
    # RPC range limit", "Exceeded max range limit for eth_getLogs: 1000"
    r"ranges? over [\d,]+ blocks",  # dRPC: "ranges over 10000 blocks are not supported"
    r"blocks? distance",  # Ethermint, Cronos, Evmos: "maximum [from, to] blocks distance: 10000"
    r"bigger than (?:the )?range limit",  # Tenderly: "range 5000 is bigger than range limit 2000"
    # geth's -32002 "request timed out" past its own HTTP timeout: as with no answer at all
    # (RpcRangeTimedOut), a lighter range may pass.
    r"timed? ?out",
    # geth's -32003 on a batch's calls past --rpc.batch-response-max-size: the range's logs
    # are what made the answer large.
    r"response (?:is )?too (?:large|big)",
)
# Answers naming a range that are not about its size: a toBlock past the node's head (geth:
# "block range extends beyond current head block") is a backend behind its siblings.
_NOT_RANGE_PATTERNS = (r"beyond (?:the )?(?:current )?head",)
_RATE_PATTERNS = (
    r"rate limit",
    r"too many requests",
    r"limit exceeded",
    r"rate exceeded",
    r"request rate",
    r"request limit",  # QuickNode's -32007 "100/second request limit reached"
    r"capacity",
    r"throttl",
)
# A node that is busy or lags behind its siblings behind a load balancer.
_UNAVAILABLE_PATTERNS = (
    r"try again",
    r"temporar",
    r"unavailable",
    r"overloaded",
    r"busy",
    r"timeout",
    r"timed out",
    r"header not found",
    r"unknown block",
    r"block not found",  # erigon, besu
    r"block with hash \S+ (?:could )?not (?:be )?found",  # nethermind
    r"block height is",  # anvil: "block height is 7 but requested was 9"
    r"beyond (?:the )?(?:current )?head",
    r"not (?:yet )?synced",
)
# A cap on one batch's calls or answer (Besu's -32005 "Number of requests exceeds max batch
# size", geth's "batch too large", Erigon's "batch limit 100 exceeded", Nethermind's "Batch
# size limit exceeded" and "MaxBatchResponseBodySize"): this batch is too large, as with HTTP
# 413; smaller ones are taken.
_BATCH_SIZE_PATTERNS = (r"batch (?:size|too large|limit|request limit)", r"max(?:imum)? ?batch")
_RANGE_RE = re.compile("|".join(_RANGE_PATTERNS), re.IGNORECASE)
_NOT_RANGE_RE = re.compile("|".join(_NOT_RANGE_PATTERNS), re.IGNORECASE)
_RATE_RE = re.compile("|".join(_RATE_PATTERNS), re.IGNORECASE)
_UNAVAILABLE_RE = re.compile("|".join(_UNAVAILABLE_PATTERNS), re.IGNORECASE)
_BATCH_SIZE_RE = re.compile("|".join(_BATCH_SIZE_PATTERNS), re.IGNORECASE)
# geth's cap on a batch's answer (--rpc.batch-response-max-size, 25 MB by default): the calls
# past it get -32003 "response too large". A cap on this batch, unless it is an eth_getLogs
# range, which gets smaller instead.
_RESPONSE_CAP_RE = re.compile(r"response (?:is )?too (?:large|big)", re.IGNORECASE)


class TransientFailure(Exception):  # noqa: N818 - named like the errors module's
    """One attempt failed in a way another attempt may not; RpcClient never lets it escape."""

    kind: str
    detail: str
    retry_after: float | None

    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        self.kind = kind
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(kind, detail, retry_after)


class BatchRejected(Exception):  # noqa: N818 - named like the errors module's
    """A batch was refused as a batch; RpcClient sends its calls one by one.

    `lasting`: the endpoint refuses batches (an error says so, or a status without a
    JSON-RPC reason), so it gets none for a while. Otherwise only this batch was too large.
    """

    lasting: bool

    def __init__(self, reason: str, *, lasting: bool = True) -> None:
        self.lasting = lasting
        super().__init__(reason)


class Verdict(enum.Enum):
    """What a JSON-RPC error means for the caller."""

    TRANSIENT = "transient"
    RANGE = "range"
    FINAL = "final"


def classify(code: int, message: str, method: str, *, shrinkable: bool = False) -> Verdict:
    """Decide from a JSON-RPC error code and message whether to retry, shrink or give up.

    `shrinkable`: the call is an eth_getLogs range that a smaller range may replace. A range
    refusal of any other eth_getLogs (by block hash, or a range at the floor) is retried: the
    provider answers so when it is loaded, and nothing else could make the query smaller.
    """
    if method == GET_LOGS and _RANGE_RE.search(message) and not _NOT_RANGE_RE.search(message):
        return Verdict.RANGE if shrinkable else Verdict.TRANSIENT
    if code in TRANSIENT_CODES or _RATE_RE.search(message) or _UNAVAILABLE_RE.search(message):
        return Verdict.TRANSIENT
    return Verdict.FINAL


def encode_request(request_id: int, method: str, params: Sequence[object]) -> bytes:
    """Return the body of one JSON-RPC request."""
    return orjson.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})


def encode_calls(calls: Sequence[tuple[int, str, Sequence[object]]]) -> bytes:
    """Return the body of a JSON-RPC batch of (id, method, params) calls."""
    return orjson.dumps(
        [
            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
            for request_id, method, params in calls
        ]
    )


def decode(body: bytes) -> object:
    """Decode an answer body; a body that is not JSON is a transient failure."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise TransientFailure("invalid_json", f"{len(body)} bytes that are not JSON") from None


def parse_retry_after(value: str | None) -> float | None:
    """Return the seconds a Retry-After header asks for (delay or HTTP date), None if unusable."""
    if value is None:
        return None
    delay = value.strip()
    if delay.isascii() and delay.isdigit():  # delay-seconds is 1*DIGIT: not "nan" or "-5"
        return float(delay)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # a year or second out of range: overflow
        return None
    return max(0.0, when.timestamp() - time.time())


def check_status(
    status: int,
    body: bytes,
    retry_after: str | None,
    method: str,
    *,
    batch: bool = False,
    shrinkable: bool = False,
) -> None:
    """Raise for an HTTP status other than 200; after a 200 the caller decodes the body.

    `shrinkable`: the request is an eth_getLogs range (with, in a batch, only the header that
    proves the node has its last block), so a 413 or a range refusal means "ask for less".
    Otherwise a 413 sends a batch's calls one by one, and a single call is tried again (a
    provider loaded, or an answer too large for now: nothing smaller could replace it).
    """
    if status == 200:
        return
    error = _error_object(body)
    if method == GET_LOGS and shrinkable:
        if status == 413:
            raise RpcRangeTooLarge("HTTP 413 payload too large")
        if error is not None and classify(*error, method, shrinkable=True) is Verdict.RANGE:
            raise RpcRangeTooLarge(f"HTTP {status}, error {error[0]}: {_excerpt(error[1])}")
    if status in TRANSIENT_STATUSES or status >= 500:
        kind = "http_5xx" if status >= 500 else f"http_{status}"
        raise TransientFailure(kind, f"HTTP {status}", parse_retry_after(retry_after))
    if status == 413:  # a size limit: for this request, not for every batch or call
        if batch:
            raise BatchRejected("HTTP 413 payload too large", lasting=False)
        raise TransientFailure("http_413", "HTTP 413 payload too large")
    if batch and (status not in NOT_AN_ENDPOINT_STATUSES or error is not None):
        # A JSON-RPC error object shows a JSON-RPC endpoint, whatever the status.
        why = f"HTTP {status}"
        if error is not None:
            why += f", error {error[0]}: {_excerpt(error[1])}"
        _refuse_batch(error, method, shrinkable=shrinkable, why=why)
    if error is not None:
        _raise_for_error(*error, method, shrinkable=shrinkable)
    raise RpcResponseError(None, f"HTTP {status}", method)


def result_of(payload: object, request_id: int, method: str, *, shrinkable: bool = False) -> object:
    """Return the result of one JSON-RPC answer, or raise what its error calls for."""
    if not isinstance(payload, dict):
        raise RpcResponseError(None, "answer is not a JSON object", method)
    error = payload.get("error")
    if error is not None:
        code, message = _check_error(error, method)
        _raise_for_error(code, message, method, shrinkable=shrinkable)
    if "result" not in payload:
        raise RpcResponseError(None, "answer has neither result nor error", method)
    if payload.get("id") != request_id:
        raise RpcResponseError(None, f"answer id {payload.get('id')!r} is not {request_id}", method)
    return payload["result"]


def batch_results(
    payload: object, ids: Sequence[int], method: str, *, shrinkable: bool = False
) -> list[object]:
    """Return the results of a batch answer in request order; any failed item fails the batch.

    `method`: the batch's method, or for a mixed batch the one whose errors it is classed by.
    """
    if isinstance(payload, list) and len(payload) == 1 and _is_batch_error(payload[0], ids):
        payload = payload[0]  # the batch's one error, in a list as geth and Erigon send it
    if not isinstance(payload, list):
        error = payload.get("error") if isinstance(payload, dict) else None
        if error is not None:
            code, message = _check_error(error, method)
            why = f"error {code}: {_excerpt(message)}"
            _refuse_batch((code, message), method, shrinkable=shrinkable, why=why)
        raise BatchRejected("answer to a batch is not a list")
    by_id: dict[object, object] = {}
    for item in payload:
        item_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(item_id, bool) or not isinstance(item_id, int | str | None):
            raise RpcResponseError(
                None, f"batch answer has an id of type {type(item_id).__name__}", method
            )
        if item_id in by_id:
            raise RpcResponseError(None, f"batch answer repeats id {item_id!r}", method)
        by_id[item_id] = item
    if by_id.keys() != set(ids):
        raise RpcResponseError(None, "batch answer ids do not match the request", method)
    for item in by_id.values():
        error = item.get("error") if isinstance(item, dict) else None
        if error is not None:
            code, message = _check_error(error, method)
            # Some providers cap batch size by failing the items past the cap.
            if _BATCH_SIZE_RE.search(message) or (
                not shrinkable and _RESPONSE_CAP_RE.search(message)
            ):
                raise BatchRejected(f"error {code}: {_excerpt(message)}", lasting=False)
            verdict = classify(code, message, method, shrinkable=shrinkable)
            if verdict is Verdict.FINAL and "batch" in message.lower():
                raise BatchRejected(f"error {code}: {_excerpt(message)}")
    return [
        result_of(by_id[request_id], request_id, method, shrinkable=shrinkable)
        for request_id in ids
    ]


def parse_quantity(value: object, what: str, method: str) -> int:
    """Return a non-negative JSON-RPC hex quantity ("0x1a") as an int, at most MAX_QUANTITY.

    A quantity is "0x" and one or more hex digits, in either letter case. Leading zeros, which
    the spec forbids but geth-compatible nodes accept on input, are taken: they change no value.
    """
    # int(value, 16) alone also takes "0x1_0", trailing whitespace and non-ASCII digits
    # (Arabic-Indic, fullwidth). With ASCII letters and digits only, hex digits are all it
    # can accept (a letter past f, or a second "0x", it refuses). Hot in catch-up (three a
    # log): these checks add ~65 ns to a ~340 ns call, a regex fullmatch ~120 (2-core VM).
    if isinstance(value, str) and value.startswith("0x") and value.isascii() and value.isalnum():
        try:
            quantity = int(value, 16)
        except ValueError:
            pass
        else:
            if quantity <= MAX_QUANTITY:
                return quantity
            raise RpcResponseError(None, f"{what} is out of range: {_excerpt(value)}", method)
    raise RpcResponseError(None, f"{what} is not a hex quantity: {_excerpt(repr(value))}", method)


def _is_batch_error(item: object, ids: Sequence[int]) -> bool:
    """Whether a lone item answering a batch of `ids` is an error about the whole batch: it
    names no call, or answers several under the first one's id (geth's and Erigon's "batch
    too large")."""
    if not isinstance(item, dict) or item.get("error") is None:
        return False
    item_id = item.get("id")
    return item_id is None or (len(ids) > 1 and item_id in ids)


def _error_object(body: bytes) -> tuple[int, str] | None:
    """Return (code, message) of a JSON-RPC error in a non-200 body, None if there is none."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    if error is None:
        return None
    try:
        return _check_error(error, "")
    except RpcResponseError:
        return None


def _check_error(error: object, method: str) -> tuple[int, str]:
    """Return (code, message) of a JSON-RPC error object, or raise if it is malformed."""
    if isinstance(error, dict):
        code, message, data = error.get("code"), error.get("message", ""), error.get("data")
        if isinstance(code, int) and not isinstance(code, bool) and isinstance(message, str):
            # Some providers say only "invalid params" and put the reason in `data`: a string,
            # or an object with it among its strings (Tenderly: {"error_id", "payload"}).
            if isinstance(data, dict):
                data = "; ".join(v for v in data.values() if isinstance(v, str) and v)
            return code, f"{message}: {data}" if isinstance(data, str) and data else message
    raise RpcResponseError(None, f"malformed error object: {_excerpt(repr(error))}", method)


def _refuse_batch(
    error: tuple[int, str] | None, method: str, *, shrinkable: bool, why: str
) -> NoReturn:
    """A batch failed as a whole. Its error object may say why (a node behind, a rate limit,
    a range to shrink, a cap on its size); only a final one, or none, is taken as "this
    endpoint takes no batches"."""
    if error is not None and _BATCH_SIZE_RE.search(error[1]):
        raise BatchRejected(why, lasting=False)
    if error is not None and classify(*error, method, shrinkable=shrinkable) is not Verdict.FINAL:
        _raise_for_error(*error, method, shrinkable=shrinkable)
    raise BatchRejected(why)


def _raise_for_error(code: int, message: str, method: str, *, shrinkable: bool) -> NoReturn:
    """Raise what a JSON-RPC error calls for."""
    verdict = classify(code, message, method, shrinkable=shrinkable)
    if verdict is Verdict.RANGE:
        raise RpcRangeTooLarge(f"error {code}: {_excerpt(message)}")
    if verdict is Verdict.TRANSIENT:
        kind = "rpc_rate_limit" if _RATE_RE.search(message) or code == 429 else "rpc_transient"
        raise TransientFailure(kind, f"error {code}: {_excerpt(message)}")
    raise RpcResponseError(code, message, method)


def _excerpt(text: str) -> str:
    """Cut provider text to a length fit for a log line."""
    return text if len(text) <= ERROR_EXCERPT else text[:ERROR_EXCERPT] + "..."
