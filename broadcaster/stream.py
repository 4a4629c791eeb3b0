"""The Redis side, the only module that speaks Redis: follow the event stream, read history.

Only the Stream is read, never Pub/Sub (docs/protocol.md): one XREAD BLOCK loop from the
last entry read gives order, gap detection and, after a Redis restart or a network cut,
catch-up from exactly where it stopped. A half-open socket cannot stall the loop: XREAD
blocks for half of BROADCASTER_REDIS_TIMEOUT and the whole call times out at all of it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from broadcaster.errors import InvalidEntry, StreamUnavailable
from broadcaster.events import Event, entry_seq, parse_entry
from broadcaster.hub import Hub
from broadcaster.metrics import Metrics

__all__ = ["EventStream", "open_stream"]

log = structlog.get_logger()

# Entries per XREAD: each client gets one write per read, so this bounds what one write adds
# to a socket buffer (about 100 KiB) during a catch-up after an outage.
READ_COUNT = 100
QUERY_CONNECTIONS = 8  # resumes share these; a reconnect storm's resumes wait their turn
# How long a query may wait for its turn on those connections (first come, first served; the
# query itself is then bounded by BROADCASTER_REDIS_TIMEOUT).
QUERY_QUEUE_TIMEOUT = 30.0
BACKOFF_BASE = 0.1
BACKOFF_MAX = 5.0
# While entries keep coming (no idle read to check on), how often the entry relayed last is
# looked up again to see that the stream is still the same one.
SAME_STREAM_CHECK_INTERVAL = 5.0
# A stream that is missing, or ends before the entry relayed last, lost entries that the
# indexer writes again from its outbox (Redis restarted empty or from an older snapshot; the
# indexer looks every 5 s while idle). Until the stream reaches that entry again nothing is
# read, only its top polled; once it exists and grew no more for this long, it is a new one.
REFILL_GRACE = 15.0
# However it keeps growing, a stream still short of that entry after this long is a new one
# (re-indexed from scratch, say): a refill of OUTBOX_KEEP entries takes seconds.
REFILL_LIMIT = 60.0
REFILL_POLL = 0.25
READ_FAILURES_SHOWN = 2  # attempts in a row that failed before /healthz says so
# A stream missing at boot that comes back written from its middle is the indexer's refill
# of entries relayed long ago: followed from its top once it grew no more for this long.
REFILL_SETTLE = 1.0

Entry = tuple[bytes, dict[bytes, bytes]]
MISSING = b"0-0"  # the last-generated-id of a stream that does not exist


class EventStream:
    """The event stream of one Redis: followed by follow(), queried by resumes (hub.Source)."""

    def __init__(
        self,
        *,
        reader: aioredis.Redis,
        queries: aioredis.Redis,
        monitor: aioredis.Redis,
        key: str,
        timeout: float,
    ) -> None:
        self._reader = reader
        self._queries = queries
        self._monitor = monitor  # /healthz's own connection: never queued behind resumes
        # redis-py's pool serves waiters in no order and its timeout also covers the wait:
        # in a storm some resumes waited 10 s while others went first. A FIFO turn here.
        self._turns = asyncio.Semaphore(QUERY_CONNECTIONS)
        self.key = key
        self._timeout = timeout
        self._block_ms = max(1, int(timeout * 500))
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        self._booted: bytes | None = None  # where follow() starts, once boot() succeeded
        self._last_entry: Entry | None = None  # the newest entry relayed, as it was read
        self._awaiting_refill = False  # the stream ends before _last_entry: read nothing
        self._short_since: float | None = None  # loop time it was last seen growing, short
        self._short_top = 0  # its top then
        self._short_first: float | None = None  # loop time it was first seen existing, short
        self._from_start = False  # following from seq 0: there was no stream at boot
        # Whether the stream is being read: the last read (or boot) worked, or only one
        # attempt failed since. /healthz says degraded otherwise, though Redis may answer its
        # own look at the stream.
        self.reading = False

    async def top(self) -> int:
        """The seq of the newest entry ever added (last-generated-id), 0 for no stream."""
        async with self._turn():
            return await self._read_top(self._queries)

    async def monitored_top(self) -> int:
        """top() for /healthz, on a connection of its own."""
        return await self._read_top(self._monitor)

    async def _read_top(self, client: aioredis.Redis) -> int:
        try:
            async with asyncio.timeout(self._timeout):
                return entry_seq_or_zero(await self._last_id(client))
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            raise StreamUnavailable(str(exc) or type(exc).__name__) from None

    async def entries(self, after: int, upto: int, count: int) -> list[tuple[int, Event | None]]:
        """Entries with after < seq <= upto, oldest first (hub.Source)."""
        try:
            async with self._turn(), asyncio.timeout(self._timeout):
                raw = await self._queries.xrange(self.key, f"({after}-0", f"{upto}-0", count=count)
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(str(exc) or type(exc).__name__) from None
        return self._parse(_entries(raw))

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """One of the query connections, in arrival order (StreamUnavailable past the queue
        bound)."""
        try:
            async with asyncio.timeout(QUERY_QUEUE_TIMEOUT):
                await self._turns.acquire()
        except TimeoutError:
            message = f"no Redis connection free within {QUERY_QUEUE_TIMEOUT:g} s"
            raise StreamUnavailable(message) from None
        try:
            yield
        finally:
            self._turns.release()

    async def follow(self, hub: Hub, metrics: Metrics, *, history: int) -> None:
        """Relay every entry to the hub, forever. Safe to cancel: nothing is half-done.

        Reconnects without a bound, on purpose: while Redis is away, connected clients stay
        connected (/healthz says 503) and get everything they missed once it is back; exiting
        would instead drop every client at once.
        """
        cursor, self._booted = self._booted, None
        failures = 0
        loop = asyncio.get_running_loop()
        check_due = loop.time() + SAME_STREAM_CHECK_INTERVAL
        while True:
            # Each step within the timeout, not all of them together: a slow Redis (round
            # trips of a tenth of it) took the whole of it to reconnect and look at the
            # stream, and the read never began.
            try:
                if failures:  # a new connection first: its handshake costs round trips
                    async with asyncio.timeout(self._timeout):
                        await self._reader.ping()
                if cursor is None:
                    async with asyncio.timeout(self._timeout):
                        cursor = await self._boot(hub, history)
                elif failures or self._awaiting_refill or loop.time() >= check_due:
                    # Redis may be back with another stream (restored, or recreated and
                    # refilled past our position while we were away).
                    async with asyncio.timeout(self._timeout):
                        cursor = await self._check_same_stream(hub, cursor)
                    check_due = loop.time() + SAME_STREAM_CHECK_INTERVAL
                # Answered: said now, not once the blocking read below returns (half the
                # timeout later with nothing published). `reading` waits for that read.
                metrics.redis_up.set(1)
                raw = None
                if not self._awaiting_refill:
                    async with asyncio.timeout(self._timeout):
                        raw = await self._reader.xread(
                            {self.key: cursor}, count=READ_COUNT, block=self._block_ms
                        )
                self.reading = True
                if failures:
                    log.info("redis reading resumed", after_failures=failures, seq=hub.position)
                    failures = 0
                metrics.redis_up.set(1)
                if raw is None:
                    await asyncio.sleep(REFILL_POLL)
                    continue
                entries = _stream_entries(raw)
                if entries and self._from_start:
                    if entry_seq_or_zero(entries[0][0]) > 1:
                        # Clears _from_start once done: a Redis failure meanwhile comes back here.
                        cursor = await self._follow_refill(hub)
                        continue
                    self._from_start = False
                if entries:
                    cursor = entries[-1][0]
                    self._last_entry = entries[-1]
                    hub.dispatch(self._parse(entries, metrics))
                else:
                    async with asyncio.timeout(self._timeout):
                        cursor = await self._check_same_stream(hub, cursor)
                    check_due = loop.time() + SAME_STREAM_CHECK_INTERVAL
            except (RedisError, OSError) as exc:
                failures += 1
                # Not for one failure: a stall of the event loop past the timeout, or a
                # connection Redis closed, is retried at once (0.1-0.2 s) and reads again.
                self.reading = failures < READ_FAILURES_SHOWN
                metrics.redis_up.set(0)
                # Nothing can refill the stream while Redis is away: the refill's grace and
                # limit count again from the first look once it is back.
                self._short_since = self._short_first = None
                metrics.redis_reconnects.inc()
                delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(failures, 16))
                delay *= 0.5 + self._rng.random() / 2
                log.warning(
                    "redis read failed, reconnecting",
                    error=str(exc) or type(exc).__name__,
                    attempt=failures,
                    retry_in=round(delay, 2),
                    seq=hub.position,
                )
                await asyncio.sleep(delay)

    async def boot(self, hub: Hub, *, history: int) -> None:
        """Take the stream's position and recent history before clients are served, so that a
        resume arriving the moment the server listens is answered rather than told to reload.

        One attempt, bounded: with Redis away the server serves anyway and follow() boots
        once Redis is back (until then resumes answer recovered: false).
        """
        try:
            async with asyncio.timeout(self._timeout):
                self._booted = await self._boot(hub, history)
            self.reading = True
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            log.warning(
                "redis unreachable at start; serving clients, following the stream once back",
                error=str(exc) or type(exc).__name__,
            )

    async def _boot(self, hub: Hub, history: int) -> bytes:
        """Start at the stream's newest entry, with recent entries in memory for resumes."""
        last_id = await self._last_id(self._reader)
        top = entry_seq_or_zero(last_id)
        newest: list[Entry] = []
        if hub.position is None and top:
            newest = _entries(
                await self._reader.xrevrange(self.key, last_id, "-", count=max(1, history))
            )
            newest.reverse()
            if history:
                hub.prefill(self._parse(newest, hub.metrics))
        hub.start(top)
        self._from_start = hub.position == 0
        log.info("following the event stream", key=self.key, seq=hub.position)
        if hub.position != top:
            return f"{hub.position}-0".encode()
        self._last_entry = newest[-1] if newest and newest[-1][0] == last_id else None
        return last_id

    async def _check_same_stream(self, hub: Hub, cursor: bytes) -> bytes:
        """Check that the stream is still the one followed: the entry relayed last is there as
        it was read (or trimmed away, which the next read shows as a gap). If not, the stream
        was recreated (deleted, or Redis restored from another copy): subscribers are closed
        with 4009 and the new stream is followed from its top.

        A stream that is missing or ends before that entry is waited for (REFILL_GRACE)
        while the indexer writes the lost entries again, reading nothing meanwhile; so are
        resumes that find it short (replay.py, through Hub.refill_awaited).
        """
        try:
            return await self._compare_stream(hub, cursor)
        finally:
            # Published once the check is done, after a reset if there was one: a resume
            # waiting for the refill then sees how it ended (its client dropped, if so).
            hub.refill_awaited = self._awaiting_refill

    async def _compare_stream(self, hub: Hub, cursor: bytes) -> bytes:
        last_id = await self._last_id(self._reader)
        top = entry_seq_or_zero(last_id)
        if self._last_entry is not None and top < entry_seq_or_zero(self._last_entry[0]):
            if self._refill_awaited(hub, missing=last_id == MISSING, top=top):
                return cursor
        elif self._awaiting_refill:
            log.info("the stream reached the entry relayed last again", seq=hub.position)
        self._awaiting_refill, self._short_since, self._short_first = False, None, None
        if last_id == MISSING:
            # Gone, not recreated yet, before anything was relayed: decided once it is back.
            return cursor
        if self._last_entry is None:  # nothing relayed yet: only a stream gone backwards shows
            if hub.position is not None and top < hub.position:
                return await self._restart_at_top(hub, last_id)
            return cursor
        entry_id, fields = self._last_entry
        found = _entries(await self._reader.xrange(self.key, entry_id, entry_id, count=1))
        if found and found[0][1] == fields:
            return cursor
        if not found and top >= entry_seq_or_zero(entry_id):
            # Trimmed past it: the read after the cursor shows the gap. Or emptied (XTRIM
            # MAXLEN 0, freeing Redis's memory), which keeps the stream's last id: what was
            # relayed is all there was, or the next entry read shows the gap.
            oldest = _entries(await self._reader.xrange(self.key, "-", "+", count=1))
            if not oldest or entry_seq_or_zero(oldest[0][0]) > entry_seq_or_zero(entry_id):
                return cursor
        return await self._restart_at_top(hub, last_id)

    async def _restart_at_top(self, hub: Hub, last_id: bytes) -> bytes:
        """Follow the stream from its top, closing subscribers with 4009. The entry there is
        kept as the one relayed last: if entries are lost again before anything new comes,
        the stream is then waited for, not taken for a new one once more."""
        found = _entries(await self._reader.xrange(self.key, last_id, last_id, count=1))
        self._last_entry = found[0] if found else None
        hub.restart_at(entry_seq_or_zero(last_id))
        return last_id

    async def _follow_refill(self, hub: Hub) -> bytes:
        """The stream, missing at boot, came back written from its middle: the indexer's
        refill after Redis lost it, not news. Wait until it stops growing, then follow it from
        its top; clients that subscribed meanwhile are closed with 4009 (reload)."""
        log.warning(
            "the stream came back written from its middle (Redis lost it); "
            "following it from its top once the indexer's refill settles",
        )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + REFILL_GRACE  # a stream that never stops growing is live
        async with asyncio.timeout(self._timeout):
            last_id = await self._last_id(self._reader)
        while last_id != MISSING and loop.time() < give_up:
            await asyncio.sleep(REFILL_SETTLE)
            async with asyncio.timeout(self._timeout):
                settled = await self._last_id(self._reader)
            if settled == last_id:
                break
            last_id = settled
        if last_id == MISSING:
            # Gone again (deleted, evicted): still following from seq 0, what comes back is
            # looked at as it was at boot.
            log.warning("the stream went missing while its refill settled; waiting for it")
            return MISSING
        async with asyncio.timeout(self._timeout):
            cursor = await self._restart_at_top(hub, last_id)
        self._from_start = False
        return cursor

    def _refill_awaited(self, hub: Hub, *, missing: bool, top: int) -> bool:
        """Whether to go on waiting for the stream to reach the entry relayed last again."""
        if not self._awaiting_refill:
            self._awaiting_refill = True
            log.warning(
                "the stream ends before the entry relayed last (Redis lost entries); "
                "waiting for the indexer to write them again",
                seq=hub.position,
                stream_top=top,
            )
        if missing:  # the grace counts from when the key is back
            self._short_since = None
            return True
        now = asyncio.get_running_loop().time()
        if self._short_first is None:
            self._short_first = now
        if self._short_since is None or top > self._short_top:  # growing: the refill goes on
            self._short_since, self._short_top = now, top
        if now - self._short_since < REFILL_GRACE and now - self._short_first < REFILL_LIMIT:
            return True
        log.warning(
            "the stream stayed short of the entry relayed last: taken as a new stream",
            seq=hub.position,
            stream_top=top,
            waited=REFILL_GRACE,
        )
        return False

    async def _last_id(self, client: aioredis.Redis) -> bytes:
        """The stream's last-generated-id (MISSING when it does not exist)."""
        try:
            info = await client.xinfo_stream(self.key)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return MISSING
            raise
        last = info["last-generated-id"]
        return last if isinstance(last, bytes) else str(last).encode()

    def _parse(
        self, raw: Sequence[Entry], metrics: Metrics | None = None
    ) -> list[tuple[int, Event | None]]:
        parsed: list[tuple[int, Event | None]] = []
        for entry_id, fields in raw:
            try:
                seq = entry_seq(entry_id)
            except InvalidEntry as exc:
                _invalid(exc, metrics)
                continue
            try:
                parsed.append((seq, parse_entry(entry_id, fields)))
            except InvalidEntry as exc:
                _invalid(exc, metrics)
                parsed.append((seq, None))
            except Exception as exc:  # a validation bug: skip the entry, not every instance
                log.exception("stream entry refused by an unexpected error", entry=seq)
                _invalid(InvalidEntry(str(seq), type(exc).__name__), metrics)
                parsed.append((seq, None))
        return parsed


def _invalid(exc: InvalidEntry, metrics: Metrics | None) -> None:
    """Log and count an entry that is skipped: when following, or reading the history at
    start-up; not when a resume reads it again."""
    if metrics is not None:
        metrics.invalid_entries.inc()
        log.warning("invalid stream entry skipped", entry=exc.entry_id, reason=exc.reason)


def entry_seq_or_zero(entry_id: bytes) -> int:
    head = entry_id.split(b"-", 1)[0]
    return int(head) if head.isdigit() else 0


def _stream_entries(raw: Any) -> list[Entry]:
    """The entries of the one stream in an XREAD answer (RESP2 list or RESP3 dict)."""
    if not raw:
        return []
    if isinstance(raw, dict):
        return [entry for entries in raw.values() for entry in _entries(entries[0])]
    return [entry for _, entries in raw for entry in _entries(entries)]


def _entries(raw: Any) -> list[Entry]:
    """(ID, fields) pairs as bytes; anything else (e.g. a deleted entry's None) is dropped."""
    return [
        (entry_id, fields)
        for entry_id, fields in raw or ()
        if isinstance(entry_id, bytes) and isinstance(fields, dict)
    ]


@asynccontextmanager
async def open_stream(url: str, *, key: str, redis_timeout: float) -> AsyncIterator[EventStream]:
    """Connect (lazily) to Redis; the clients are closed when the block exits.

    No hidden retries in redis-py: follow() retries in one place and a resume that cannot
    read the stream answers recovered=false at once. One exception: a pooled query
    connection, or /healthz's own one, that idled across a Redis restart is closed by the
    server without redis-py noticing, and its first command (or health-check PING) fails
    with a ConnectionError; those read-only queries are tried once more, at once, on a new
    connection. A timeout is not retried: the query stays bounded by one timeout.

    Every call is bounded with asyncio.timeout() here rather than redis-py's socket_timeout:
    with a socket_timeout redis-py sends through asyncio.wait_for(), which on Python 3.11 can
    swallow a cancellation (the task then ignored SIGTERM until XREAD BLOCK returned, seen in
    tests/broadcaster/test_resilience.py). A timed-out command leaves its connection
    disconnected by redis-py, and the next command reconnects.
    """
    options: dict[str, Any] = {
        "socket_timeout": None,
        "socket_connect_timeout": min(redis_timeout, 5.0),
        "retry": Retry(NoBackoff(), 0),
    }
    # Read-only queries on a connection a Redis restart may have closed are retried once.
    retried = options | {"retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))}
    reader = aioredis.Redis.from_url(url, single_connection_client=True, **options)
    # Pooled connections idle between resumes; one that idled a while is checked before use.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=QUERY_CONNECTIONS,
        timeout=redis_timeout,
        health_check_interval=max(1, int(redis_timeout)),
        **retried,
    )
    queries = aioredis.Redis.from_pool(pool)
    # /healthz's connection idles between checks too: without the retry the first check
    # after a Redis restart reported Redis down although it was back.
    monitor = aioredis.Redis.from_url(url, single_connection_client=True, **retried)
    try:
        yield EventStream(
            reader=reader, queries=queries, monitor=monitor, key=key, timeout=redis_timeout
        )
    finally:
        await reader.aclose()
        await queries.aclose()
        await monitor.aclose()
