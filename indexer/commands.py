"""The one-shot CLI commands: migrate, status, backfill, reindex, verify.

Commands that write (backfill, reindex) take the write lease like the service does and refuse
to start while an indexer runs. What they store is published by the next `run`, from the
outbox, in seq order.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TextIO

from redis.exceptions import RedisError, ResponseError

from indexer import queries, schema
from indexer.cursor import load_state
from indexer.database import Database
from indexer.errors import ChainIdMismatch, IndexerError, StoreError
from indexer.follower import Follower
from indexer.lease import LeaseTerm, lease_holder, release_lease
from indexer.metrics import Metrics
from indexer.outbox import last_seq, published_seq
from indexer.publisher import seq_of_entry_id
from indexer.rpc import RpcClient
from indexer.service import (
    REDIS_TIMEOUT,
    acquire_lease,
    build_follower,
    dead_local_pid,
    keep_lease,
    lease_owner,
    log_range_sizer,
    open_database,
    redis_client,
    rpc_client,
    sources,
)
from indexer.sources import (
    MARKETS_BEFORE,
    backfill_command,
    backfills_needed,
    began_at,
    indexed_from,
    start_block_changed,
)
from indexer.verification import verify_range
from shared.indexer_settings import IndexerSettings
from shared.redaction import Writer

MAX_REPORTED = 20
# Looks at an unsettled cursor (see Follower.settle) before a backfill or reindex refuses,
# a poll interval apart: a node behind the others catches up within a few blocks.
SETTLE_ATTEMPTS = 5


def _say(settings: IndexerSettings, line: str, *, stream: TextIO | None = None) -> None:
    """Print a line of the command's output, with the settings' secrets redacted as in logs."""
    Writer(settings.log_secrets()).say(line, stream=stream)


def report_failure(settings: IndexerSettings, command: str, error: BaseException) -> None:
    """Say on stderr that a one-shot command failed, and why (the command failed, not the
    service: said as `migrate` says it)."""
    _say(settings, f"kektech: {command} failed: {error}", stream=sys.stderr)


@asynccontextmanager
async def _connections(
    settings: IndexerSettings, *, once_each: bool = False
) -> AsyncIterator[tuple[Database, RpcClient]]:
    async with (
        open_database(settings) as db,
        rpc_client(settings, once_each=once_each) as rpc,
    ):
        yield db, rpc


async def migrate(settings: IndexerSettings) -> int:
    """Apply pending migrations (what `run` does at start-up) and say which; 1 if unreachable."""
    try:
        async with open_database(settings, max_size=1) as db:
            applied = await schema.migrate(db)
            version = await schema.schema_version(db)
    except StoreError as exc:  # refused, unknown host, timed out: the operator's one line
        _say(settings, f"kektech: {exc}", stream=sys.stderr)
        return 1
    for name in applied:
        _say(settings, f"applied: {name}")
    _say(settings, f"schema: version {version}, {len(applied) or 'no'} migrations applied")
    return 0


async def status(settings: IndexerSettings) -> int:
    """Print where the indexer stands; exit 0 even when the node is unreachable (not when
    the database is: there is nothing to report without it). Each RPC endpoint is asked
    once: the service's retries would keep the operator waiting over a minute on a hung one."""
    async with _connections(settings, once_each=True) as (db, rpc):
        version = await schema.schema_version(db)
        _say(settings, f"schema: version {version} of {schema.latest_schema_version()}")
        try:
            head: int | None = await rpc.block_number()
        except ChainIdMismatch as exc:  # it answers, but for another chain than CHAIN_ID
            head = None
            _say(settings, f"chain head: wrong chain ({exc})")
        except IndexerError as exc:
            head = None
            _say(settings, f"chain head: unreachable ({exc})")
        if version == 0:
            _say(settings, "cursor: none (the database was never migrated)")
            return 0
        state = await load_state(db)
        if state is None:
            _say(settings, "cursor: none yet (the indexer has not started)")
        else:
            _say(settings, f"cursor: block {state.block_number} ({state.block_hash})")
            if head is not None:
                # As the indexer counts it: it stays CONFIRMATIONS behind the head on purpose.
                lag = max(0, head - settings.confirmations - state.block_number)
                _say(settings, f"chain head: block {head}, lag {lag} blocks")
            # Not migrated yet, it may lack the record (schema version 4): `migrate` adds it.
            latest = version >= schema.latest_schema_version()
            began = await indexed_from(db) if latest else None
            if began is not None:
                _say(settings, f"began: block {began} (nothing below it is indexed)")
            if changed := start_block_changed(settings.start_block, began):
                _say(settings, changed)
            if began is not None:
                for line in await _backfills_said(db, began):
                    _say(settings, line)
        published = await published_seq(db)
        last = await last_seq(db)
        _say(
            settings,
            f"publishing: seq {published} of {last} recorded as published,"
            f" backlog {max(0, last - published)}",
        )
        _say(settings, await _stream_said(settings))
        counts = await queries.counts(db)
        _say(
            settings,
            f"stored: {counts['events']} events, {counts['markets']} markets, "
            f"{counts['outbox']} outbox rows",
        )
        _say(settings, "write lease: " + await _lease_said(db))
    return 0


async def _backfills_said(db: Database, began: int) -> list[str]:
    """The backfills `status` says are needed: of contracts added after indexing began."""
    return [
        f"backfill needed: {kind} {address} was added after indexing began and is followed"
        f" from block {since}: `{backfill_command(began, since)}`"
        + (f"; {MARKETS_BEFORE.format(began=began)}" if kind == "factory" else "")
        for address, kind, since in await backfills_needed(db, began)
    ]


async def _stream_said(settings: IndexerSettings) -> str:
    """Where the Redis Stream ends, as `status` says it: the database records what was
    published, not whether Redis still holds it or answers now."""
    key = settings.redis_stream_key
    try:
        async with (
            redis_client(settings.redis_url.get_secret_value()) as redis,
            asyncio.timeout(REDIS_TIMEOUT),
        ):
            info = await redis.xinfo_stream(key)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return f"redis: no stream {key} (nothing published yet, or Redis lost it)"
        return f"redis: refused to describe the stream {key} ({exc})"
    except TimeoutError:
        return f"redis: unreachable (no answer within {REDIS_TIMEOUT:g} s)"
    except (RedisError, OSError) as exc:
        return f"redis: unreachable ({type(exc).__name__}: {exc})"
    return f"redis: the stream {key} ends at seq {seq_of_entry_id(info.get('last-generated-id'))}"


async def _lease_said(db: Database) -> str:
    """Who holds the write lease, as `status` says it: an expired one is anyone's to take,
    and a holder on this host whose process is gone is taken over by the next indexer."""
    holder = await lease_holder(db)
    if holder.owner is None:
        return "free"
    if holder.expired:
        return f"expired at {holder.expires_at} (last held by {holder.owner}), free to take"
    said = f"{holder.owner} until {holder.expires_at}"
    pid = dead_local_pid(holder.owner)
    if pid is not None:
        said += f"; its process (pid {pid} on this host) is gone: the next indexer takes it over"
    return said


@asynccontextmanager
async def _writer(
    settings: IndexerSettings, *, rewind_to: int | None = None
) -> AsyncIterator[Follower | None]:
    """A follower holding the write lease, or None (said why) if nothing is indexed yet, a
    running indexer holds the lease, or the cursor could not be confirmed canonical after a
    reorg at start-up.

    `rewind_to`: the block a reindex rolls back to (see Follower.prepare).
    """
    async with _connections(settings) as (db, rpc):
        if await schema.schema_version(db) == 0 or await load_state(db) is None:
            # The cursor is `run`'s to create: here it would wait for a START_BLOCK beyond
            # the head, and a backfill or reindex of nothing indexed has nothing to do. Said
            # before migrating: a DATABASE_URL naming the wrong database is left untouched.
            _say(settings, "nothing indexed yet: `run` indexes from START_BLOCK")
            yield None
            return
        await schema.migrate(db)
        lease = await acquire_lease(db, owner=lease_owner(), ttl=settings.lease_ttl, wait=False)
        if lease is None:
            holder = await lease_holder(db)
            _say(
                settings,
                f"an indexer is running (write lease held by {holder.owner}); stop it first, "
                "e.g. `pm2 stop kektech-event-indexer`",
            )
            yield None
            return
        metrics = Metrics()
        # Renewed all along, not only by each commit: one step between two commits (a
        # rollback, a range behind a slow node) may take longer than LEASE_TTL.
        renewal = asyncio.create_task(
            keep_lease(db, lease, LeaseTerm(settings.lease_ttl)),
            name="keep-lease",
        )
        try:
            follower = build_follower(settings, rpc=rpc, db=db, lease=lease, metrics=metrics)
            await follower.prepare(rewind_to=rewind_to)
            settled = await follower.settle(
                attempts=SETTLE_ATTEMPTS, pause=settings.poll_interval, rewind_to=rewind_to
            )
            if not settled:
                # Writing now could store the node's branch beside a replaced one still stored
                # (a backfill) or keep blocks of it below the rewind (a reindex).
                _say(
                    settings,
                    "the block at the cursor is replaced or not on the node yet; run the indexer"
                    " (`pm2 start kektech-event-indexer`) or try again",
                )
                yield None
                return
            yield follower
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal  # a LeaseLost it met is raised here
            await release_lease(db, lease)


async def backfill(settings: IndexerSettings, first: int, last: int) -> int:
    """Store whatever of [first, last] is missing (an indexed range; the cursor stays)."""
    async with _writer(settings) as follower:
        if follower is None:
            return 1
        if last > follower.cursor:
            _say(settings, f"block {last} is above the cursor {follower.cursor}: `run` indexes it")
            return 1
        began = follower.began
        if last < began:
            _say(
                settings,
                f"nothing backfilled: the database began at block {began}, nothing below it is"
                f" indexed; `reindex --from {first}` indexes from block {first} on",
            )
            return 1
        if first < began:
            # The reorg handling trusts the block before it as an ancestor (Follower.backfill).
            _say(
                settings,
                f"--from {first} is below block {began}, where the database began: backfilled"
                f" from {began} (`reindex --from {first}` indexes from block {first} on)",
            )
            first = began
        done = await follower.backfill(first, last)
        _say(settings, f"backfill {first}..{last}: {done.events} missing events stored")
        if done.announced and last < done.cursor:
            _say(
                settings,
                f"{done.announced} markets announced in the range ({done.markets} of them not"
                f" followed before): their events from block {last + 1} to the cursor"
                f" {done.cursor} were fetched too, {done.later_events} missing events stored",
            )
    return 0


async def reindex(settings: IndexerSettings, first: int) -> int:
    """Roll back to first-1 (queueing removal notices), then index up to the head again.

    The recovery from a reorg too deep for the indexer to roll back by itself, when `first`
    is at or below the block that error names.
    """
    async with _writer(settings, rewind_to=first - 1) as follower:
        if follower is None:
            return 1
        cursor = follower.cursor
        if first > cursor + 1:
            _say(
                settings,
                f"--from {first} is above the block after the cursor {cursor}: nothing there"
                " is indexed to roll back; `run` indexes it",
            )
            return 1
        if first == cursor + 1:  # asked to keep every stored block: only the indexing is left
            _say(settings, f"nothing to roll back: the cursor is at block {cursor}")
            again = ""
        else:
            removed = await follower.rewind(first - 1)
            _say(settings, f"rolled back to block {first - 1}: {removed} events removed")
            again = " again"
        await follower.follow(until=await follower.current_target())
        _say(settings, f"indexed{again} up to block {follower.cursor}")
    return 0


async def verify(settings: IndexerSettings, first: int, last: int | None) -> int:
    """Re-read [first, last] from the chain and report every difference with the database."""
    async with _connections(settings) as (db, rpc):
        version = await schema.schema_version(db)
        state = await load_state(db) if version else None
        if state is None:
            _say(settings, "nothing indexed yet")
            return 1
        if version < schema.latest_schema_version():
            _say(
                settings,
                f"the database is at schema version {version} of"
                f" {schema.latest_schema_version()}:"
                " run `.venv/bin/python -m indexer migrate` first",
            )
            return 1
        # The cursor and the rows above it in one snapshot: a running indexer moves on.
        at = await queries.above_cursor(db)
        assert at is not None  # the cursor is never deleted
        cursor = at.block_number
        if first > cursor:  # not a success: nothing of the range is indexed to compare
            _say(settings, f"nothing verified: --from {first} is above the cursor {cursor}")
            return 1
        # Not START_BLOCK, which may have been changed since: see verify_range.
        began = await began_at(db, start_block=settings.start_block)
        if (last if last is not None else cursor) < began:
            _say(settings, f"nothing verified: the database began at block {began}")
            return 1
        if first < began:
            _say(
                settings,
                f"--from {first} is below block {began}, where the database began: verified"
                f" from {began} (`reindex --from {first}` indexes from block {first} on)",
            )
            first = began
        if last is not None and last > cursor:
            # Still judged by what was compared: the blocks above are not indexed yet, and a
            # --to at the head is the usual request (the cursor stays CONFIRMATIONS behind).
            _say(settings, f"--to {last} is above the cursor {cursor}: verified up to {cursor}")
        last = cursor if last is None else min(last, cursor)
        report = await verify_range(
            db,
            rpc,
            log_range_sizer(settings),
            first=first,
            last=last,
            cursor=cursor,
            cursor_hash=at.block_hash,
            static=sources(settings).static_kinds(),
            began=began,
            max_addresses=settings.logs_max_addresses,
            window_events=settings.batch_events,
            keep=MAX_REPORTED,
        )
    if at.rows:
        report.differences += 1
        _say(
            settings,
            f"above the cursor (block {cursor}): {at.events} events, {at.headers} block"
            f" headers, {at.markets} markets stored, which no commit of the indexer leaves"
            " (it moves the cursor with them): something else wrote them",
        )
    for difference in report.first:
        _say(settings, f"{difference.where}: {difference.what}")
    if report.differences > MAX_REPORTED:
        _say(settings, f"... and {report.differences - MAX_REPORTED} more")
    if report.not_compared or report.markets_not_compared:
        _say(
            settings,
            f"{report.not_compared} stored events and {report.markets_not_compared} markets of"
            " contracts no longer in the configuration (table sources) were not compared",
        )
    if report.projections_not_compared:
        _say(
            settings,
            f"{report.projections_not_compared} market rows were not compared with their"
            f" events on chain: {report.projections_why}",
        )
    if report.markets_moved_on:
        _say(
            settings,
            f"{report.markets_moved_on} market rows were not compared: the running indexer"
            f" updated them with events above block {cursor} since verify began",
        )
    verdict = "OK" if not report.differences else f"{report.differences} differences"
    _say(
        settings,
        f"verify {first}..{last}: {report.chain_logs} logs on chain,"
        f" {report.stored_events} stored, {report.markets_compared} market rows,"
        f" {report.headers_compared} block headers: {verdict}",
    )
    return 0 if not report.differences else 1
