"""Retries and failover of the JSON-RPC client: which endpoint is current, and what a failure costs.

`Failover.run` is the one place that retries: it sends attempts to the current endpoint, moves
on to the next on failure and backs off between attempts, within a bound. It knows endpoints,
not HTTP: the attempts and the chain id check are the client's, passed in as callables.
An endpoint found serving another chain is left out for good; after FAILBACK_AFTER on another
endpoint, calls go back to the first one left.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from indexer import rpc_wire as wire
from indexer.errors import (
    AnotherChain,
    BlockNotFound,
    ChainIdMismatch,
    RpcError,
    RpcRangeTimedOut,
    RpcRangeTooLarge,
    RpcResponseError,
    RpcUnavailable,
    WrongChainError,
)
from indexer.rpc_transport import Endpoint

__all__ = ["BATCH_PROBE_AFTER", "FAILBACK_AFTER", "RETRY_AFTER_MAX", "Failover", "RpcStats"]

# Past this many doublings the backoff cap has long been reached; keeps 2**n small.
MAX_BACKOFF_EXPONENT = 32
# The longest Retry-After honoured, in seconds. Longer than the backoff cap, so that a provider
# asking for 30 s is not asked again every 10 s; covers a per-minute quota. Past it (an hourly
# or daily quota, or a bogus header) the endpoint is asked again after this long, with a
# warning, rather than left silent for a day.
RETRY_AFTER_MAX = 60.0
# Batches taken at an endpoint's remembered cap after which twice the cap is tried: a lifted
# cap grows back, a lasting one costs a refused batch every this many.
BATCH_PROBE_AFTER = 64
# Seconds on an endpoint failed over to after which a call starts at the first endpoint of
# RPC_PROVIDER_URL again. The one failed over to may answer from a stuck or lagging node: as
# it answers, no failure would ever move the client on, and the indexer would stay behind for
# good, "caught up" with a head that no longer moves. The first is the operator's preferred
# one; if it still fails, the call fails over as before, and it is tried again this much later.
FAILBACK_AFTER = 60.0

log = structlog.get_logger()

T = TypeVar("T")


@dataclass
class RpcStats:
    """Counters for the metrics exporter; plain ints that only grow."""

    calls: int = 0  # requests and batches asked for, retries not counted
    attempts: int = 0  # HTTP requests sent, retries and chain id checks included
    failovers: int = 0  # switches to the next endpoint
    failbacks: int = 0  # returns to the first endpoint after FAILBACK_AFTER
    errors: Counter[str] = field(default_factory=Counter)  # failed attempts by kind


class Failover:
    """Endpoints tried in turn from the current one, with bounded, jittered retries."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        attempts: int,
        backoff_base: float,
        backoff_max: float,
        retry_after_max: float = RETRY_AFTER_MAX,
        batch_retry_interval: float,
        max_batch_size: int,
        verify: Callable[[Endpoint], Awaitable[None]] | None,
        failback_after: float = FAILBACK_AFTER,
    ) -> None:
        # verify raises unless the endpoint serves the expected chain; run() calls it before
        # an endpoint's first use, so that failover cannot switch chains.
        self._endpoints = list(endpoints)
        self._attempts = attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._retry_after_max = retry_after_max
        self._batch_retry_interval = batch_retry_interval
        self._max_batch_size = max_batch_size
        self._verify = verify
        self._failback_after = failback_after
        self._current = 0
        self._switched_at = time.monotonic()  # when _current last changed
        self._wrong_chain: set[int] = set()  # endpoints left out: they serve another chain
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        self.stats = RpcStats()

    @property
    def current(self) -> Endpoint:
        """The endpoint the next attempt goes to."""
        return self._endpoints[self._current]

    async def run(self, method: str, attempt: Callable[[Endpoint], Awaitable[T]]) -> T:
        """Run attempt until it succeeds, failing over and backing off on transient failures.

        The one place that retries. Safe to cancel: an attempt changes nothing on the node.
        An answer that cannot be used (malformed, or an HTTP status such as 404 for a mistyped
        path) is the endpoint's fault, which waiting does not cure: the call moves on to the
        next endpoint at once, and raises it when every endpoint has given one.
        An endpoint's Retry-After (up to retry_after_max) holds for every call: until it has
        passed, attempts go to another endpoint that is free, or wait for it.
        An endpoint that serves another chain is left out, for this call and later ones, with
        an error logged: WrongChainError (its chain id, or its block 0) only when every endpoint
        does. A block one endpoint
        does not have ("not yet", BlockNotFound) is asked of the others before the call
        raises it: the endpoint may lag behind the one that gave the head.
        """
        self.stats.calls += 1
        last_error = "no attempt made"
        unusable: set[int] = set()
        lacking: dict[int, BlockNotFound] = {}  # endpoints that do not have the block asked
        delay = 0.0  # the backoff before the next attempt, logged with the failure
        for number in range(1, self._attempts + 1):
            if number == 1:
                self._fail_back()
                self._leave_held()
            index = self._current
            endpoint = self._endpoints[index]
            held = endpoint.ready_at - time.monotonic()
            if held > delay:  # not a backoff already logged: an earlier call's Retry-After
                log.warning(
                    "rpc endpoint asked to wait (Retry-After), waiting",
                    method=method,
                    endpoint=endpoint.label,
                    wait=round(held, 3),
                )
            if max(delay, held) > 0:
                await asyncio.sleep(max(delay, held))
            delay = 0.0
            try:
                if self._verify is not None and not endpoint.verified:
                    try:
                        await self._verify(endpoint)
                    except WrongChainError as exc:
                        self._leave_out(index, exc)
                        last_error = f"{_error_kind(exc)} at {endpoint.label}: {exc}"
                        continue
                    endpoint.verified = True
                return await attempt(endpoint)
            except wire.TransientFailure as failure:
                self.stats.errors[failure.kind] += 1
                last_error = f"{failure.kind} at {endpoint.label}: {failure.detail}"
                if failure.retry_after is not None:
                    self._hold(endpoint, failure.retry_after)
                # The next call starts there too. Staying is allowed: better to retry this
                # endpoint after a backoff than to wait out another's Retry-After.
                next_endpoint = self._fail_over(index, may_stay=True)
                if number == self._attempts:
                    break
                delay = self._backoff(number, next_endpoint)
                log.warning(
                    "rpc attempt failed",
                    method=method,
                    endpoint=endpoint.label,
                    error=failure.kind,
                    detail=failure.detail,
                    attempt=number,
                    retry_in=round(delay, 3),
                    retry_after=failure.retry_after,
                )
            except RpcResponseError as exc:
                # Malformed, or a refusal the node states (a JSON-RPC error): one that any node
                # would give (invalid params) fails once every endpoint has given it, but most
                # are the endpoint's own (a method it disables, a key or plan it refuses), and
                # waiting cures neither: on to the next endpoint at once.
                kind = "bad_response" if exc.code is None else "rpc_error"
                self.stats.errors[kind] += 1
                unusable.add(index)
                if self._none_left(unusable):
                    raise
                last_error = f"{kind} at {endpoint.label}: {exc}"
                self._fail_over(index)  # the next call starts past it too
                if number == self._attempts:
                    break  # others failed for now only: as for any outage
                log.warning(
                    "rpc endpoint gave an unusable answer, failing over"
                    if exc.code is None
                    else "rpc endpoint refused the call, failing over",
                    method=method,
                    endpoint=endpoint.label,
                    detail=str(exc),
                )
            except wire.BatchRejected as rejected:
                self.batch_refused(endpoint, rejected)
                raise  # the caller sends the calls one by one
            except BlockNotFound as exc:
                # An answer ("not yet"), not an error of the endpoint; but another endpoint
                # may be ahead of this one, which may lag behind the one that gave the head.
                lacking[index] = exc
                if self._none_left(lacking):
                    raise
                log.info(
                    "rpc endpoint does not have the block, asking the next",
                    method=method,
                    endpoint=endpoint.label,
                    block=exc.number,
                )
                self._fail_over(index)
            except RpcRangeTimedOut as exc:
                # Too heavy a range, or a hanging endpoint: the caller asks a smaller range,
                # of the next endpoint, so that a hanging one costs a timeout, not one per
                # halving down to LOGS_RANGE_MIN.
                self.stats.errors["timeout"] += 1
                self._fail_over(index)
                log.warning(
                    "rpc range timed out, asking a smaller one of the next endpoint",
                    method=method,
                    endpoint=endpoint.label,
                    detail=exc.reason,
                )
                raise
            except RpcError as exc:
                self.stats.errors[_error_kind(exc)] += 1
                raise
        if lacking:  # the others were down: "not yet" is the only answer there was
            raise next(iter(lacking.values()))
        raise RpcUnavailable(method, self._attempts, last_error)

    def batch_size(self) -> int:
        """Calls to put in a batch for the current endpoint: max_batch_size, or less if it
        refused a larger batch."""
        limit = self.current.batch_limit
        return self._max_batch_size if limit is None else min(limit, self._max_batch_size)

    def batch_taken(self, endpoint: Endpoint, calls: int) -> None:
        """Note a batch of that many calls the endpoint answered; after BATCH_PROBE_AFTER
        near its remembered cap, try twice the cap (a limit that is gone, or was transient,
        must not shrink its batches for good)."""
        limit = endpoint.batch_limit
        if limit is None or 2 * calls <= limit:  # the small batches at the tip prove nothing
            return
        endpoint.batches_at_limit += 1
        if endpoint.batches_at_limit < BATCH_PROBE_AFTER:
            return
        endpoint.batches_at_limit = 0
        endpoint.batch_limit = None if 2 * limit >= self._max_batch_size else 2 * limit
        log.info(
            "rpc endpoint took many batches at its cap, trying larger ones",
            endpoint=endpoint.label,
            calls_per_batch=min(2 * limit, self._max_batch_size),
        )

    def batch_too_large(self, endpoint: Endpoint, calls: int) -> None:
        """Note a batch of that many calls refused as too large: the endpoint's batches are
        half that size from now on, for every call, until batch_taken grows them back."""
        limit = (calls + 1) // 2
        if endpoint.batch_limit is None or limit < endpoint.batch_limit:
            endpoint.batch_limit = limit
        endpoint.batches_at_limit = 0

    def batch_refused(self, endpoint: Endpoint, rejected: wire.BatchRejected) -> None:
        """Note a refused batch. After a lasting refusal the endpoint gets no batches for
        batch_retry_interval seconds (other endpoints keep theirs), then they are tried again:
        a provider's plan or a firewall's mood may change, and batches carry range proofs."""
        self.stats.errors["batch_rejected"] += 1
        retry_in = self._batch_retry_interval if rejected.lasting else 0.0
        endpoint.batches_from = max(endpoint.batches_from, time.monotonic() + retry_in)
        log.warning(
            "rpc endpoint refused a batch, sending its calls one by one"
            if rejected.lasting
            else "rpc endpoint refused a batch as too large, sending less at once",
            endpoint=endpoint.label,
            reason=str(rejected),
            batches_again_in=retry_in,
            calls_per_batch=endpoint.batch_limit,
        )

    def _hold(self, endpoint: Endpoint, retry_after: float) -> None:
        """Send the endpoint nothing for retry_after seconds, at most retry_after_max."""
        wait = min(retry_after, self._retry_after_max)
        endpoint.ready_at = time.monotonic() + wait
        if retry_after > wait:
            log.warning(
                "rpc endpoint asks to wait longer than retry_after_max, asking it again sooner",
                endpoint=endpoint.label,
                retry_after=retry_after,
                waits=wait,
            )

    def verify_again(self) -> None:
        """Have every endpoint verified again before its next use (what verify checks grew)."""
        for endpoint in self._endpoints:
            endpoint.verified = False

    def _leave_out(self, index: int, mismatch: WrongChainError) -> None:
        """Leave out for good the endpoint at index, found serving another chain (a URL of
        another network among RPC_PROVIDER_URL, or a node of another chain with the same id):
        failing over to it must not stop the indexer, nor send it requests. Raises mismatch
        when no endpoint is left."""
        self.stats.errors[_error_kind(mismatch)] += 1
        self._wrong_chain.add(index)
        if self._none_left():
            raise mismatch
        log.error(
            "rpc endpoint serves another chain, leaving it out until restarted",
            endpoint=self._endpoints[index].label,
            expected=mismatch.expected,
            actual=mismatch.actual,
        )
        self._fail_over(index)

    def _none_left(self, tried: Collection[int] = ()) -> bool:
        """Whether every endpoint is either in `tried` (indexes) or left out (another chain)."""
        return all(i in tried or i in self._wrong_chain for i in range(len(self._endpoints)))

    def _fail_back(self) -> None:
        """Before a call's first attempt: go back to the first endpoint left once FAILBACK_AFTER
        has passed on another, unless a Retry-After still holds for it."""
        first = min(i for i in range(len(self._endpoints)) if i not in self._wrong_chain)
        now = time.monotonic()
        if (
            self._current == first
            or now - self._switched_at < self._failback_after
            or self._endpoints[first].ready_at > now
        ):
            return
        log.info(
            "rpc returning to the first endpoint",
            endpoint=self._endpoints[first].label,
            left=self._endpoints[self._current].label,
        )
        self._current = first
        self._switched_at = now
        self.stats.failbacks += 1

    def _switch(self, index: int) -> None:
        """Make the endpoint at index the current one (a failover)."""
        self._current = index
        self._switched_at = time.monotonic()
        self.stats.failovers += 1

    def _leave_held(self) -> None:
        """Before a call's first attempt: leave an endpoint whose Retry-After still holds for
        one free sooner (its own retries may have ended on it, or a concurrent call's)."""
        index = self._current
        now = time.monotonic()
        if self._endpoints[index].ready_at <= now:
            return
        sooner = self._next_endpoint(index, now, may_stay=False)
        if self._endpoints[sooner].ready_at < self._endpoints[index].ready_at:
            self._switch(sooner)

    def _fail_over(self, index: int, *, may_stay: bool = False) -> Endpoint:
        """Move on from the endpoint at index, unless a concurrent call already did.

        `may_stay`: keep it if every other endpoint's Retry-After holds and its own does not.
        """
        if len(self._endpoints) > 1 and self._current == index:
            chosen = self._next_endpoint(index, time.monotonic(), may_stay=may_stay)
            if chosen != index:
                self._switch(chosen)
        return self._endpoints[self._current]

    def _next_endpoint(self, index: int, now: float, *, may_stay: bool) -> int:
        """Return the index of the endpoint to try after the one at index: the first of the
        others in turn that no Retry-After holds (with may_stay, index itself last), else of
        those the one free soonest. Endpoints left out are never chosen."""
        count = len(self._endpoints)
        candidates = [
            i
            for i in ((index + step) % count for step in range(1, count))
            if i not in self._wrong_chain
        ]
        if may_stay or not candidates:
            candidates.append(index)
        return next(
            (i for i in candidates if self._endpoints[i].ready_at <= now),
            min(candidates, key=lambda i: self._endpoints[i].ready_at),
        )

    def _backoff(self, attempt: int, endpoint: Endpoint) -> float:
        """Return the delay before the next attempt: full jitter up to backoff_max, or longer
        if the endpoint's Retry-After (bounded by retry_after_max) says so."""
        ceiling = self._backoff_base * 2 ** min(attempt - 1, MAX_BACKOFF_EXPONENT)
        jitter = self._rng.uniform(0.0, min(self._backoff_max, ceiling))
        return max(jitter, endpoint.ready_at - time.monotonic())


def _error_kind(exc: RpcError) -> str:
    if isinstance(exc, RpcRangeTooLarge):
        return "range_too_large"
    if isinstance(exc, ChainIdMismatch):
        return "chain_id_mismatch"
    if isinstance(exc, AnotherChain):
        return "genesis_mismatch"
    return "rpc_error"
