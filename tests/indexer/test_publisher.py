"""The outbox publisher on its own: stopping, pruning, Redis health, rows handed over by
commits and the write lease."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import structlog.testing

from devnet.redis_server import Redis
from indexer import outbox
from indexer import publisher as publisher_module
from indexer.database import Database
from indexer.lease import LeaseTerm
from indexer.metrics import Metrics
from indexer.outbox import OutboxRow, mark_published, published_seq
from indexer.publisher import Publisher
from indexer.schema import migrate
from indexer.service import redis_client
from tests.broadcaster.support import read_stream
from tests.support.database import connected
from tests.support.waiting import eventually

_keys = itertools.count()

IDLE_SETTLE = 0.2  # the publisher reaches its idle wait within a few ms on an empty outbox


@pytest.fixture
async def publisher_parts(
    database_url: str, redis_server: Redis
) -> AsyncIterator[tuple[Database, aioredis.Redis]]:
    async with (
        Database.open(database_url, command_timeout=10) as db,
        redis_client(redis_server.url) as redis,
    ):
        await migrate(db)
        yield db, redis


@asynccontextmanager
async def running(publisher: Publisher) -> AsyncIterator[None]:
    """The publisher's loop as a task for the block, cancelled after it."""
    task = asyncio.create_task(publisher.publish_forever(), name="publish-outbox")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


@asynccontextmanager
async def redis_user(
    admin: aioredis.Redis, server: Redis, name: str, commands: list[str]
) -> AsyncIterator[aioredis.Redis]:
    """A client of a Redis user allowed only `commands` (every key and channel), for the
    block; the user is deleted after it."""
    user, password = f"{name}-{os.getpid()}", f"{name}-password"
    await admin.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["-@all", *commands],
    )
    try:
        url = server.url.replace("redis://", f"redis://{user}:{password}@", 1)
        async with redis_client(url) as client:
            yield client
    finally:
        await admin.acl_deluser(user)


def stream_missing(metrics: Metrics) -> float:
    """kektech_indexer_stream_missing_total of these metrics."""
    return metrics.registry.get_sample_value("kektech_indexer_stream_missing_total") or 0.0


async def published_up_to(publisher: Publisher, seq: int) -> None:
    async def reached() -> bool:
        return publisher.published >= seq

    await eventually(reached, within=10, what=f"seq {seq} published")


def unique_key(name: str) -> str:
    """A stream key of this test's own, so a test can run again in one session."""
    return f"kektech:test-{name}:{os.getpid()}:{next(_keys)}"


def held_lease() -> LeaseTerm:
    """A lease term just renewed, which lasts longer than any test."""
    term = LeaseTerm(ttl=3600.0)
    term.renewed(term.now())
    return term


def make_publisher(
    parts: tuple[Database, aioredis.Redis], stream_key: str, **overrides: Any
) -> Publisher:
    """A publisher on this test's database and Redis, its lease held; keyword arguments override
    the defaults."""
    db, redis = parts
    options: dict[str, Any] = {
        "stream_maxlen": 1000,
        "outbox_keep": 100,
        "metrics": Metrics(),
        "term": held_lease(),
    }
    return Publisher(redis=redis, db=db, stream_key=stream_key, **(options | overrides))


async def test_a_stop_that_coincides_with_a_wake_up_still_stops_the_publisher(
    publisher_parts: tuple[Database, aioredis.Redis],
) -> None:
    """Cancelling the publisher in the same loop turn as a commit wakes it ends its task."""
    key = unique_key("publisher")
    publisher = make_publisher(publisher_parts, key)
    task = asyncio.create_task(publisher.publish_forever(), name="publish-outbox")
    await asyncio.sleep(IDLE_SETTLE)
    assert not task.done()
    publisher.wake()  # a commit...
    task.cancel()  # ...and SIGINT, in the same loop turn
    done, _ = await asyncio.wait([task], timeout=5)
    if not done:
        task.cancel()  # the second stop signal an operator would have to send
        await asyncio.wait([task], timeout=5)
    assert done, "the publisher kept running after being cancelled"
    assert task.cancelled()


async def test_published_rows_are_pruned_in_chunks_down_to_outbox_keep(
    publisher_parts: tuple[Database, aioredis.Redis],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once published, the outbox shrinks to OUTBOX_KEEP rows, a bounded chunk per statement."""
    _, redis = publisher_parts
    async with connected(database_url) as conn:
        await conn.executemany(
            "INSERT INTO outbox (seq, event_id, channels, payload) VALUES ($1, $2, $3, $4)",
            [
                (seq, f"32323:0xtx:{seq}", "events:test", b'{"type":"Test","seq":%d}' % seq)
                for seq in range(1, 26)
            ],
        )
    deletes: list[int] = []
    original = outbox.prune_outbox

    async def counting_prune(db: Database, keep: int, limit: int) -> int:
        deleted = await original(db, keep, limit)
        deletes.append(deleted)
        return deleted

    monkeypatch.setattr(outbox, "prune_outbox", counting_prune)
    key = unique_key("prune")
    publisher = make_publisher(publisher_parts, key, outbox_keep=5, prune_every=0.0, prune_chunk=8)
    async with running(publisher):
        await eventually(lambda: remaining(database_url, 5), within=10, what="pruning to 5")
    assert await redis.xlen(key) == 25, "every row reached Redis first"
    assert max(deletes) <= 8
    assert sum(deletes) == 20


async def remaining(database_url: str, rows: int) -> bool:
    async with connected(database_url) as conn:
        seqs = [r["seq"] for r in await conn.fetch("SELECT seq FROM outbox ORDER BY seq")]
    return seqs == list(range(26 - rows, 26))


async def test_redis_up_reports_redis_while_idle(
    publisher_parts: tuple[Database, aioredis.Redis], tmp_path: Path
) -> None:
    """With nothing to publish, kektech_indexer_redis_up still follows whether Redis answers,
    and the log says so once each way (a Redis stopped, or a wrong password, while the chain
    was quiet showed only in the metric)."""
    db, _ = publisher_parts
    metrics = Metrics()
    key = unique_key("redis-up")

    def redis_up() -> float | None:
        return metrics.registry.get_sample_value("kektech_indexer_redis_up")

    async def is_up(expected: float) -> bool:
        return redis_up() == expected

    # A Redis of its own to stop: the session's, were it not to come back, would fail every
    # test after this one.
    with Redis(workdir=tmp_path) as own:
        async with redis_client(own.url) as redis:
            publisher = make_publisher((db, redis), key, metrics=metrics, ping_every=0.2)
            with structlog.testing.capture_logs() as logs:
                async with running(publisher):
                    await eventually(lambda: is_up(1), within=5, what="redis_up 1 at first")
                    own.stop()
                    await eventually(lambda: is_up(0), within=10, what="redis_up 0, Redis stopped")
                    await asyncio.sleep(1)  # five idle checks
                    own.start()
                    await eventually(lambda: is_up(1), within=10, what="redis_up 1 again")
    said = [e["event"] for e in logs if e["event"].startswith("redis ")]
    assert said == [
        "redis does not answer; events wait in the outbox until it does",
        "redis answers again",
    ]


def outbox_row(seq: int, origin: str = "outbox") -> OutboxRow:
    payload = b'{"type":"Test","seq":%d,"from":"%s"}' % (seq, origin.encode())
    return OutboxRow(seq, "events:test", payload)


async def insert_outbox(database_url: str, rows: list[OutboxRow]) -> None:
    """Rows committed to the outbox, as the follower or a backfill would: the last seq
    assigned moves up with them."""
    async with connected(database_url) as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO outbox (seq, event_id, channels, payload) VALUES ($1, $2, $3, $4)",
            [(r.seq, f"32323:0xtx:{r.seq}", r.channels, r.payload) for r in rows],
        )
        await conn.execute(
            "INSERT INTO indexer_state (id, chain_id, block_number, block_hash, last_seq)"
            " VALUES (1, 32323, 0, '0x', $1) ON CONFLICT (id)"
            " DO UPDATE SET last_seq = greatest(indexer_state.last_seq, $1)",
            max(r.seq for r in rows),
        )


async def published(redis: aioredis.Redis, key: str, count: int) -> list[bytes]:
    """The payloads of the stream's first `count` entries, once it has that many."""

    async def enough() -> bool:
        return await redis.xlen(key) >= count

    await eventually(enough, within=10, what=f"{count} entries in {key}")
    return [fields[b"event"] for _, fields in await read_stream(redis, key)]


async def test_rows_handed_over_by_a_commit_are_published_without_reading_them_back(
    publisher_parts: tuple[Database, aioredis.Redis],
) -> None:
    """The rows a commit hands over reach Redis as they are, with no read of the outbox
    (here they are not in it, which shows where they came from)."""
    _, redis = publisher_parts
    key = unique_key("handed")
    publisher = make_publisher(publisher_parts, key)
    async with running(publisher):
        await asyncio.sleep(IDLE_SETTLE)
        publisher.wake([outbox_row(seq, "commit") for seq in (1, 2, 3)])
        assert await published(redis, key, 3) == [
            outbox_row(seq, "commit").payload for seq in (1, 2, 3)
        ]


async def test_rows_handed_over_after_a_gap_are_published_in_order_once(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """Rows another process committed (a backfill) precede the handed ones: the publisher
    reads those from the outbox first; every seq reaches the stream once, in order."""
    _, redis = publisher_parts
    key = unique_key("gap")
    publisher = make_publisher(publisher_parts, key)
    async with running(publisher):
        await asyncio.sleep(IDLE_SETTLE)
        await insert_outbox(database_url, [outbox_row(seq) for seq in (1, 2, 3, 4)])
        publisher.wake([outbox_row(seq) for seq in (3, 4)])
        payloads = await published(redis, key, 4)
        await asyncio.sleep(IDLE_SETTLE)
        assert await redis.xlen(key) == 4
        assert payloads == [outbox_row(seq).payload for seq in (1, 2, 3, 4)]


async def test_rows_handed_over_beyond_the_bound_are_read_back_instead(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """The publisher keeps at most `handoff_max` handed rows (Redis may be down for minutes);
    past it, it forgets them and reads the outbox, so memory stays bounded and nothing is lost."""
    _, redis = publisher_parts
    await insert_outbox(database_url, [outbox_row(seq) for seq in (1, 2, 3)])
    key = unique_key("bound")
    publisher = make_publisher(publisher_parts, key, handoff_max=2)
    publisher.wake([outbox_row(seq, "commit") for seq in (1, 2, 3)])  # before it runs
    async with running(publisher):
        payloads = await published(redis, key, 3)
        assert payloads == [outbox_row(seq).payload for seq in (1, 2, 3)]


async def _stream_cut_back_to(redis: aioredis.Redis, key: str, keep: int) -> None:
    """The stream as Redis restarted from an older snapshot would have it: its first `keep`
    entries only (and their top)."""
    entries = await read_stream(redis, key)
    await redis.delete(key)
    for entry_id, fields in entries[:keep]:
        await redis.xadd(key, fields, id=entry_id)  # type: ignore[arg-type]


async def stream_seqs(redis: aioredis.Redis, key: str) -> list[int]:
    return [int(entry_id.decode().split("-")[0]) for entry_id, _ in await read_stream(redis, key)]


@asynccontextmanager
async def ten_published(
    parts: tuple[Database, aioredis.Redis], database_url: str, key: str, **overrides: Any
) -> AsyncIterator[Publisher]:
    """A running publisher that has published seqs 1..10 to `key` and gone idle."""
    await insert_outbox(database_url, [outbox_row(seq) for seq in range(1, 11)])
    publisher = make_publisher(parts, key, **overrides)
    async with running(publisher):
        await published(parts[1], key, 10)
        await asyncio.sleep(IDLE_SETTLE)
        yield publisher


async def test_entries_redis_lost_are_published_again_from_the_outbox(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """Redis back with an older copy of the stream (ending at 5 while 10 were published):
    the next publication fills 6..10 again from the outbox, so the stream has no hole."""
    _, redis = publisher_parts
    key = unique_key("lost")
    async with ten_published(publisher_parts, database_url, key) as publisher:
        await _stream_cut_back_to(redis, key, 5)
        await insert_outbox(database_url, [outbox_row(seq) for seq in (11, 12)])
        publisher.wake()
        await published(redis, key, 12)
        assert await stream_seqs(redis, key) == list(range(1, 13))


async def test_a_stream_redis_lost_entirely_is_filled_again_from_the_outbox(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """Redis back without the stream at all (restarted without persistence, or the key
    deleted): the outbox's rows go out again, so the stream starts with no hole."""
    _, redis = publisher_parts
    key = unique_key("lost-whole")
    async with ten_published(publisher_parts, database_url, key) as publisher:
        await redis.delete(key)
        await insert_outbox(database_url, [outbox_row(seq) for seq in (11, 12)])
        publisher.wake()

        async def refilled() -> bool:
            return len(await stream_seqs(redis, key)) >= 12

        await eventually(refilled, within=10, what="the stream filled again")
        assert await stream_seqs(redis, key) == list(range(1, 13))


@pytest.mark.parametrize("keep", [0, 5], ids=["lost-whole", "lost-newest"])
async def test_a_stream_that_lost_entries_is_filled_again_while_idle(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str, keep: int
) -> None:
    """Redis back without its newest entries while no block comes: the publisher notices on
    its idle check and writes them again at once, not at the next event, which may be hours
    away (until then broadcasters cannot tell the stream from a new one)."""
    _, redis = publisher_parts
    key = unique_key("lost-idle")
    await insert_outbox(database_url, [outbox_row(seq) for seq in range(1, 11)])
    publisher = make_publisher(publisher_parts, key, ping_every=0.2)
    async with running(publisher):
        await published(redis, key, 10)
        await asyncio.sleep(IDLE_SETTLE)

        async def refilled() -> bool:
            return len(await stream_seqs(redis, key)) >= 10

        for _ in range(2):  # and again, should Redis lose them once more
            await _stream_cut_back_to(redis, key, keep)
            await eventually(refilled, within=10, what="the stream filled again")
            assert await stream_seqs(redis, key) == list(range(1, 11))


@pytest.mark.parametrize("keep", [0, 5], ids=["lost-whole", "lost-newest"])
async def test_entries_written_again_are_not_published_again_on_pubsub(
    publisher_parts: tuple[Database, aioredis.Redis],
    database_url: str,
    keep: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pub/Sub is a live channel: the entries Redis lost went out on it when they were new, so
    writing them again to the stream publishes none of them there again, in however many
    batches (here of 3; past the first, they all went out again); the events never
    published before still go out on both."""
    monkeypatch.setattr(publisher_module, "BATCH_SIZE", 3)
    _, redis = publisher_parts
    key = unique_key("pubsub-once")
    seqs: list[int] = []
    async with (
        ten_published(publisher_parts, database_url, key) as publisher,
        redis.pubsub() as pubsub,
    ):
        await pubsub.subscribe("events:test")
        await _stream_cut_back_to(redis, key, keep)
        await insert_outbox(database_url, [outbox_row(seq) for seq in (11, 12)])
        publisher.wake()
        async with asyncio.timeout(10):
            while 12 not in seqs:  # in order: any seq published again comes before it
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    seqs.append(orjson.loads(message["data"])["seq"])
        assert await stream_seqs(redis, key) == list(range(1, 13))
    assert seqs == [11, 12]


async def test_a_hole_found_while_idle_is_reported_once(
    publisher_parts: tuple[Database, aioredis.Redis],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With OUTBOX_KEEP=0 nothing published can be written again: a stream Redis lost while
    idle leaves a hole, reported once, not at every idle check until the next event."""
    _, redis = publisher_parts
    key = unique_key("hole-idle")
    await insert_outbox(database_url, [outbox_row(seq) for seq in range(1, 6)])
    monkeypatch.setattr(publisher_module, "IDLE_POLL", 0.1)  # idle turns come often
    stream_reads = 0  # XINFO STREAM: what each idle check asks Redis
    xinfo_stream = redis.xinfo_stream

    async def counted_xinfo_stream(name: str) -> Any:
        nonlocal stream_reads
        stream_reads += 1
        return await xinfo_stream(name)

    monkeypatch.setattr(redis, "xinfo_stream", counted_xinfo_stream)
    publisher = make_publisher(publisher_parts, key, outbox_keep=0, ping_every=0.1, prune_every=0)
    with structlog.testing.capture_logs() as logs:
        async with running(publisher):
            await published(redis, key, 5)

            async def pruned() -> bool:
                async with connected(database_url) as conn:
                    return bool(await conn.fetchval("SELECT count(*) FROM outbox") == 0)

            await eventually(pruned, within=10, what="the outbox pruned")
            await redis.delete(key)

            def holes() -> list[MutableMapping[str, Any]]:
                return [e for e in logs if e["event"].startswith("the stream keeps a hole")]

            async def reported() -> bool:
                return bool(holes())

            await eventually(reported, within=10, what="the hole reported")
            reads_at_report = stream_reads

            async def checked_again() -> bool:
                return stream_reads >= reads_at_report + 3

            # Idle checks that find the same hole, with the chance to report it again.
            await eventually(checked_again, within=10, what="three more idle checks")
    assert len(holes()) == 1


async def test_entries_lost_beyond_the_outbox_leave_a_hole_and_publishing_goes_on(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """When the outbox no longer holds what Redis lost, the hole stays (said in the log) and
    the publications after it still go out."""
    _, redis = publisher_parts
    key = unique_key("lost-for-good")
    async with ten_published(publisher_parts, database_url, key) as publisher:
        async with connected(database_url) as conn:
            await conn.execute("DELETE FROM outbox WHERE seq <= 8")  # pruned meanwhile
        await _stream_cut_back_to(redis, key, 5)
        await insert_outbox(database_url, [outbox_row(seq) for seq in (11, 12)])
        publisher.wake()
        await published(redis, key, 9)
        assert await stream_seqs(redis, key) == [1, 2, 3, 4, 5, 9, 10, 11, 12]


async def test_seqs_missing_from_the_outbox_are_reported_and_the_rest_published(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """Outbox seqs have no gaps, but an operator may delete a row by hand. A seq missing right
    after the stream's top, or inside a batch, is said in the log (and counted) once, and
    what follows is published: the publisher neither stalls on it nor skips it silently."""
    _, redis = publisher_parts
    key = unique_key("outbox-gap")
    metrics = Metrics()
    with structlog.testing.capture_logs() as logs:
        async with ten_published(publisher_parts, database_url, key, metrics=metrics) as publisher:
            await insert_outbox(database_url, [outbox_row(seq) for seq in (12, 13, 15)])
            publisher.wake()
            await published(redis, key, 13)
            await asyncio.sleep(IDLE_SETTLE)
            assert await stream_seqs(redis, key) == [*range(1, 11), 12, 13, 15]
            assert publisher.published == 15
    missing = [e for e in logs if e["event"].startswith("the outbox misses seqs")]
    assert [(e["missing_from"], e["missing_to"]) for e in missing] == [(11, 11), (14, 14)]
    assert not [e for e in logs if e["event"].startswith("the stream lost its newest")]
    assert stream_missing(metrics) == 2


async def test_nothing_is_published_while_the_lease_is_not_known_held(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """A process paused past LEASE_TTL (SIGSTOP, a frozen VM) may have been replaced by a
    standby meanwhile: its publisher writes nothing to Redis until the lease is renewed (a
    renewal that fails stops the service instead), then publishes what waited."""
    _, redis = publisher_parts
    key = unique_key("lease")
    await insert_outbox(database_url, [outbox_row(seq) for seq in (1, 2, 3)])
    term = LeaseTerm(ttl=3600.0)
    term.renewed(term.now() - 3601.0)  # last renewed before a pause longer than its TTL
    publisher = make_publisher(publisher_parts, key, term=term)

    def waiting() -> list[MutableMapping[str, Any]]:
        return [e for e in logs if e["event"].startswith("publishing waits for the write lease")]

    async def said() -> bool:
        return bool(waiting())

    with structlog.testing.capture_logs() as logs:
        async with running(publisher):
            await eventually(said, within=10, what="publishing held back")
            assert await redis.exists(key) == 0
            term.renewed(term.now())
            await published_up_to(publisher, 3)
    assert await stream_seqs(redis, key) == [1, 2, 3]
    assert len(waiting()) == 1


async def test_at_start_up_publishing_waits_for_the_first_renewal_without_a_warning(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """The publisher starts with the lease's renewals: a backlog found before the first
    renewal is answered waits for it, and is no sign of a pause past LEASE_TTL."""
    _, redis = publisher_parts
    key = unique_key("first-renewal")
    await insert_outbox(database_url, [outbox_row(seq) for seq in (1, 2, 3)])
    term = LeaseTerm(ttl=3600.0)  # not renewed yet
    publisher = make_publisher(publisher_parts, key, term=term)
    with structlog.testing.capture_logs() as logs:
        async with running(publisher):
            await asyncio.sleep(IDLE_SETTLE)
            assert await redis.exists(key) == 0
            term.renewed(term.now())
            await published_up_to(publisher, 3)
    assert await stream_seqs(redis, key) == [1, 2, 3]
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]


async def test_rows_another_publisher_recorded_and_pruned_are_no_hole(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """A leader paused past LEASE_TTL resumes after the standby that took over published,
    recorded it and pruned the outbox: the outbox then starts past this publisher's position.
    It reads the recorded position again and goes on from there: no "missing" error, nothing
    counted (which would fire KektechIndexerStreamMissingEvents)."""
    _, redis = publisher_parts
    key = unique_key("taken-over")
    metrics = Metrics()
    with structlog.testing.capture_logs() as logs:
        async with ten_published(publisher_parts, database_url, key, metrics=metrics) as paused:
            await published_elsewhere(redis, database_url, key, range(11, 21))
            await insert_outbox(database_url, [outbox_row(seq) for seq in (21, 22)])
            paused.wake()
            await published_up_to(paused, 22)
    assert await stream_seqs(redis, key) == list(range(1, 23))
    assert not [e for e in logs if e["event"].startswith("the outbox misses seqs")]
    assert stream_missing(metrics) == 0


async def published_elsewhere(
    redis: aioredis.Redis, database_url: str, key: str, seqs: range
) -> None:
    """What another publisher (a new leader) does with these rows: commit them, write them to
    the stream, record them as published and prune the outbox down to nothing."""
    rows = [outbox_row(seq) for seq in seqs]
    await insert_outbox(database_url, rows)
    for row in rows:
        fields = {"seq": str(row.seq), "channels": row.channels, "event": row.payload}
        await redis.xadd(key, fields, id=f"{row.seq}-0")  # type: ignore[arg-type]
    async with connected(database_url) as conn:
        await conn.execute("UPDATE publisher_state SET published_seq = $1", seqs[-1])
        await conn.execute("DELETE FROM outbox WHERE seq <= $1", seqs[-1])


async def test_a_restarted_publisher_reports_the_recorded_position_before_publishing(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """kektech_indexer_published_seq says where publishing stands from the start: it read 0
    after every restart until something new was published, so the alert on a broadcaster
    behind the indexer could not fire meanwhile."""
    db, redis = publisher_parts
    key = unique_key("restart")
    await published_elsewhere(redis, database_url, key, range(1, 6))
    recorded = await published_seq(db)
    metrics = Metrics()
    publisher = make_publisher(publisher_parts, key, metrics=metrics)
    async with running(publisher):

        async def reported() -> bool:
            value = metrics.registry.get_sample_value("kektech_indexer_published_seq")
            return value == recorded

        await eventually(reported, within=10, what=f"published_seq {recorded} reported")


async def test_a_missing_seq_is_reported_once_across_failed_publications(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """Publications that fail (here: the key is not a stream yet) are retried with the same
    rows; the seq missing among them is still reported and counted once."""
    _, redis = publisher_parts
    key = unique_key("gap-retried")
    await redis.set(key, "not a stream")
    await insert_outbox(database_url, [outbox_row(seq) for seq in (1, 2, 4)])
    metrics = Metrics()
    publisher = make_publisher(publisher_parts, key, metrics=metrics)
    with structlog.testing.capture_logs() as logs:
        async with running(publisher):

            async def retried() -> bool:
                failed = [e for e in logs if e["event"] == "redis publish failed, will retry"]
                return len(failed) >= 2

            await eventually(retried, within=10, what="two failed publications")
            await redis.delete(key)
            await published_up_to(publisher, 4)
    assert await stream_seqs(redis, key) == [1, 2, 4]
    missing = [e for e in logs if e["event"].startswith("the outbox misses seqs")]
    assert [(e["missing_from"], e["missing_to"]) for e in missing] == [(3, 3)]
    assert stream_missing(metrics) == 1


async def test_a_redis_user_without_xrange_still_publishes_rows_it_skips(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str, redis_server: Redis
) -> None:
    """The check of skipped seqs reads the stream (XRANGE). A Redis user not yet given
    `+xrange` (provision.sh not re-run after the update that needs it) must not stall the
    publisher on a retry after a crash: the rows go out unchecked, and the log says why."""
    db, redis = publisher_parts
    key = unique_key("no-xrange")
    await crashed_after_writing(redis, database_url, key)
    allowed = ["+evalsha", "+script|load", "+xinfo|stream", "+xadd", "+publish", "+ping"]
    async with redis_user(redis, redis_server, "no-xrange", allowed) as limited:
        publisher = make_publisher((db, limited), key)
        with structlog.testing.capture_logs() as logs:
            async with running(publisher):
                await published_up_to(publisher, 7)
    assert await stream_seqs(redis, key) == list(range(1, 8))
    unchecked = [e for e in logs if e["event"].startswith("cannot check the seqs")]
    assert len(unchecked) == 1


async def test_rows_whose_seqs_another_writer_took_in_the_stream_are_reported(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """The stream gets entries the publisher did not write (another deployment on the same
    REDIS_STREAM_KEY) while it runs: rows whose seqs are then at or below its top cannot be
    written. That is an error in the log and a count, not a silent "already there"."""
    _, redis = publisher_parts
    key = unique_key("taken")
    metrics = Metrics()
    with structlog.testing.capture_logs() as logs:
        async with ten_published(publisher_parts, database_url, key, metrics=metrics) as publisher:
            await redis.xadd(key, {"seq": "100", "event": "{}"}, id="100-0")
            await insert_outbox(database_url, [outbox_row(seq) for seq in (11, 12, 13)])
            publisher.wake()
            await published_up_to(publisher, 13)
    taken = [e for e in logs if e["event"].startswith("the stream holds other entries")]
    assert [(e["first_seq"], e["last_seq"], e["count"]) for e in taken] == [(11, 13, 3)]
    assert stream_missing(metrics) == 3


async def crashed_after_writing(redis: aioredis.Redis, database_url: str, key: str) -> None:
    """Outbox rows 1..7, of which 1..5 are in the stream but not marked published: what a
    publisher that died between its stream write and recording it leaves behind."""
    rows = [outbox_row(seq) for seq in range(1, 8)]
    await insert_outbox(database_url, rows)
    for row in rows[:5]:
        fields = {"seq": str(row.seq), "channels": row.channels, "event": row.payload}
        await redis.xadd(key, fields, id=f"{row.seq}-0")  # type: ignore[arg-type]


async def test_rows_already_in_the_stream_after_a_crash_are_skipped_quietly(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """A crash between the stream write and recording it leaves rows that are in the stream
    but not marked published: the next publisher skips them as what they are, its own
    entries, with no warning (an operator told of a foreign stream might delete it), no
    error and nothing counted as missing."""
    _, redis = publisher_parts
    key = unique_key("crashed")
    await crashed_after_writing(redis, database_url, key)
    metrics = Metrics()
    publisher = make_publisher(publisher_parts, key, metrics=metrics)
    with structlog.testing.capture_logs() as logs:
        async with running(publisher):
            await published_up_to(publisher, 7)
    assert await stream_seqs(redis, key) == list(range(1, 8))
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]
    assert [e["stream_top"] for e in logs if e["event"].startswith("resuming after")] == [5]
    assert stream_missing(metrics) == 0


async def test_a_stream_ahead_of_the_database_is_reported(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str
) -> None:
    """A stream already holding seqs this database never published (another deployment's,
    or a database rebuilt) is said in the log at start: those seqs are skipped as present."""
    _, redis = publisher_parts
    key = unique_key("ahead")
    for seq in range(1, 6):
        await redis.xadd(key, {"seq": str(seq), "event": "{}"}, id=f"{seq}-0")
    await insert_outbox(database_url, [outbox_row(seq) for seq in (1, 2)])

    def ahead() -> list[MutableMapping[str, Any]]:
        return [e for e in logs if e["event"].startswith("the stream already holds seqs")]

    async def said() -> bool:
        return bool(ahead())

    with structlog.testing.capture_logs() as logs:
        async with running(make_publisher(publisher_parts, key)):
            await eventually(said, within=10, what="the stream ahead reported")
            await asyncio.sleep(IDLE_SETTLE)  # a while to say it again, which it must not
    assert [(e["stream_top"], e["published"]) for e in ahead()] == [(5, 0)]


async def test_a_stream_the_redis_user_may_not_inspect_is_an_error_not_a_lost_stream(
    publisher_parts: tuple[Database, aioredis.Redis], database_url: str, redis_server: Redis
) -> None:
    """A Redis user refused XINFO (an ACL without `+xinfo|stream`) cannot see the stream's
    top. That is an error to report and retry, not a stream Redis lost: the publisher must
    not rewind and publish the outbox again over entries that are there."""
    db, redis = publisher_parts
    key = unique_key("no-xinfo")
    await insert_outbox(database_url, [outbox_row(seq) for seq in range(1, 8)])
    for seq in range(1, 6):  # published before: in the stream and recorded as published
        row = outbox_row(seq)
        await redis.xadd(key, {"seq": str(seq), "event": row.payload}, id=f"{seq}-0")
    await mark_published(db, 5)
    allowed = ["+evalsha", "+eval", "+script|load", "+xadd", "+publish", "+ping"]
    async with redis_user(redis, redis_server, "no-xinfo", allowed) as limited:
        publisher = make_publisher((db, limited), key)

        def failures() -> list[MutableMapping[str, Any]]:
            return [e for e in logs if e["event"] == "redis publish failed, will retry"]

        async def retried() -> bool:
            return len(failures()) >= 2

        with structlog.testing.capture_logs() as logs:
            async with running(publisher):
                # Refused, and refused again after the retry: by then a publisher that took
                # the refusal for a lost stream has rewound.
                await eventually(retried, within=10, what="a publication refused twice")
    assert not [e for e in logs if e["event"].startswith("the stream lost its newest entries")]
    # The refusal itself, in Redis's words ("NOPERM", "can't run this command").
    refusal = failures()[0]["error"]
    assert any(words in refusal for words in ("NOPERM", "can't run this command"))
    assert await stream_seqs(redis, key) == [1, 2, 3, 4, 5]
    assert await published_seq(db) == 5
