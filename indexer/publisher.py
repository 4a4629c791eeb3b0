"""Drain the Postgres outbox to Redis, in seq order, at least once (docs/protocol.md).

Each outbox row becomes one Stream entry with the explicit ID `<seq>-0`, then one PUBLISH per
channel. A batch is one Lua script call: atomic, one round trip and one reply, so the cost per
event stays a few microseconds on our side. Stream IDs must grow, so the script skips a seq
that is already in the stream, which makes a retry after a crash or an outage exact for the
stream and at-least-once for Pub/Sub. Progress (`published_seq`) lives in Postgres and only moves
after Redis acknowledged, so nothing is lost while Redis is down: rows wait in the outbox and
drain in order when it returns. A commit (a live block, a catch-up batch) also hands its rows
over in memory (`wake(rows)`): published without being read back, one round trip less per
block; the outbox stays the record, read whenever the rows handed over do not continue what was
published.

Entries Redis lost are written to the stream again but not PUBLISHed again: they went out on
Pub/Sub, a live channel, when they were new. Only the lease holder publishes: nothing goes to
Redis while this process does not know its lease held (indexer/lease.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Sequence

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from indexer import outbox
from indexer.batch_commit import HANDOFF_MAX
from indexer.database import Database
from indexer.lease import LeaseTerm
from indexer.metrics import Metrics
from indexer.outbox import OutboxRow

log = structlog.get_logger()

BATCH_SIZE = 1000
# The bound of one publish call (a half-open socket never answers). Applied here with
# asyncio.timeout rather than redis-py's socket_timeout, which goes through asyncio.wait_for.
REDIS_CALL_TIMEOUT = 5.0
IDLE_POLL = 1.0  # outbox rows may also come from another process (backfill, reindex)
BACKOFF_BASE = 0.2
BACKOFF_MAX = 5.0
PRUNE_EVERY = 60.0
# Rows deleted per pruning statement: the publisher prunes while idle, one chunk per idle
# turn, so a large backlog of published rows never holds up the next publication for long.
PRUNE_CHUNK = 5000
# While idle, the stream's top is read this often: kektech_indexer_redis_up then means "Redis
# answers" at all times, not only when there is something to publish, and entries Redis lost
# (restarted empty or from an older snapshot) are written again at once, not at the next event.
PING_EVERY = 5.0
# KEYS[1]: the stream. ARGV[1]: MAXLEN (approximate). ARGV[2]: the seq the batch must follow
# on from, to refuse it when the stream ends before that (it returns {-1, top, {}, 0} and
# writes nothing: Redis lost entries), or 0 to write it anyway; a missing stream has top 0 (Redis
# restarted empty, or the key deleted), while any other XINFO error (an ACL refusing it)
# fails the call rather than reading as one. ARGV[3]: the seq recorded as published (0 for
# none): an event at or below it is written to the stream (when missing there) but not
# PUBLISHed, since it went out on Pub/Sub, a live channel, when it was new.
# Then one argument per event: "<seq> <channels>\n<envelope>" (fewer arguments cost redis-py
# less to pack: measured). An event whose seq is not above the top is not
# written: normally it is there already (written before a crash, or before a reply was lost),
# which is checked, so that another writer's entry in its place is reported (`foreign`);
# a user that may not XRANGE leaves it `unchecked` rather than failing the batch.
# Returns {added, top, foreign seqs, unchecked count}.
PUBLISH_SCRIPT = """
local key = KEYS[1]
local top = 0
local ok, info = pcall(redis.call, 'XINFO', 'STREAM', key)
if ok then
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      top = tonumber(string.match(info[i + 1], '^(%d+)'))
    end
  end
else
  local message = type(info) == 'table' and info.err or tostring(info)
  if not string.find(string.lower(message), 'no such key', 1, true) then
    return redis.error_reply(message)
  end
end
if tonumber(ARGV[2]) > top + 1 then
  return {-1, top, {}, 0}
end
local added = 0
local foreign = {}
local unchecked = 0
local recorded = tonumber(ARGV[3])
for i = 4, #ARGV do
  local seq, channels, event = string.match(ARGV[i], '^(%d+) ([^\\n]*)\\n(.*)$')
  if tonumber(seq) > top then
    redis.call('XADD', key, 'MAXLEN', '~', ARGV[1], seq .. '-0',
               'seq', seq, 'channels', channels, 'event', event)
    added = added + 1
  else
    local read, found = pcall(redis.call, 'XRANGE', key, seq .. '-0', seq .. '-0')
    if not read then
      unchecked = unchecked + 1
    else
      local same = false
      if found[1] then
        local fields = found[1][2]
        for j = 1, #fields, 2 do
          if fields[j] == 'event' then same = fields[j + 1] == event end
        end
      end
      if not same then foreign[#foreign + 1] = seq end
    end
  end
  if tonumber(seq) > recorded then
    for channel in string.gmatch(channels, '%S+') do
      redis.call('PUBLISH', channel, event)
    end
  end
end
return {added, top, foreign, unchecked}
"""


def script_event(seq: int, channels: str, payload: bytes) -> bytes:
    """One event as PUBLISH_SCRIPT takes it: "<seq> <channels>\\n<envelope>"."""
    return b"%d %s\n%s" % (seq, channels.encode(), payload)


class Publisher:
    """Moves outbox rows to the Redis Stream and channels; one per indexer leader."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        db: Database,
        term: LeaseTerm,
        stream_key: str,
        stream_maxlen: int,
        outbox_keep: int,
        metrics: Metrics,
        prune_every: float = PRUNE_EVERY,
        prune_chunk: int = PRUNE_CHUNK,
        ping_every: float = PING_EVERY,
        handoff_max: int = HANDOFF_MAX,
    ) -> None:
        self._redis = redis
        self._db = db
        self._term = term
        self._stream_key = stream_key
        self._maxlen = stream_maxlen
        self._outbox_keep = outbox_keep
        self._metrics = metrics
        self._prune_every = prune_every
        self._prune_chunk = prune_chunk
        self._ping_every = ping_every
        self._handoff_max = handoff_max
        self._wake = asyncio.Event()
        self._handed: deque[OutboxRow] = deque()
        self._published = 0
        # published_seq as this process last recorded or read it; above _published while
        # entries Redis lost are written again.
        self._recorded = 0
        self._reported_missing = 0  # the last seq reported missing from the outbox
        self._told_unchecked = False
        self._idle_redis_down = False  # the idle check found Redis not answering; logged once
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        # redis-py loads the script again by itself after a Redis restart (NOSCRIPT).
        self._script = redis.register_script(PUBLISH_SCRIPT)

    def wake(self, rows: Sequence[OutboxRow] = ()) -> None:
        """Tell the publisher new rows were committed (called by the follower).

        `rows`, when given, are the committed rows themselves, all of them in seq order: the
        publisher then need not read them back, one round trip less between a block's commit
        and its publication. They are kept only while they continue the ones kept before.
        """
        handed = self._handed
        if rows:
            if handed and handed[-1].seq + 1 != rows[0].seq:
                handed.clear()
            if len(handed) + len(rows) > self._handoff_max:
                handed.clear()  # Redis is behind: the outbox has them
            else:
                handed.extend(rows)
        self._wake.set()

    def _take_handed(self) -> list[OutboxRow]:
        """The next rows to publish if the hand-overs hold them, else []."""
        handed = self._handed
        while handed and handed[0].seq <= self._published:
            handed.popleft()  # published meanwhile from the outbox
        if not handed or handed[0].seq != self._published + 1:
            return []  # a gap (rows from another process, a rollback): read the outbox
        return [handed.popleft() for _ in range(min(len(handed), BATCH_SIZE))]

    @property
    def published(self) -> int:
        return self._published

    async def publish_forever(self) -> None:
        """Drain the outbox, then wait for more. Safe to cancel: progress is only recorded
        after Redis acknowledged a whole batch."""
        self._published = self._recorded = await outbox.published_seq(self._db)
        self._metrics.published_seq.set(self._published)  # not 0 until the first publish
        await self._note_stream_ahead()
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + self._prune_every
        next_ping = loop.time()
        failures = 0
        accept_hole = False  # the stream lost entries the outbox cannot give again
        reported_top: int | None = None  # a short stream's top, already acted on while idle
        while True:
            # Cleared before looking, so a commit landing during the query still wakes us.
            self._wake.clear()
            rows = self._take_handed() or await outbox.outbox_after(
                self._db, self._published, BATCH_SIZE
            )
            if not rows:
                self._metrics.publish_backlog.set(0)
                if loop.time() >= next_ping:
                    top = await self._stream_top()
                    next_ping = loop.time() + self._ping_every
                    if top is not None and top < self._published and top != reported_top:
                        reported_top = top  # once: with nothing to write again, it stays short
                        accept_hole = await self._rewind_to(top, self._published + 1)
                        continue
                if loop.time() >= next_prune:
                    pruned = await outbox.prune_outbox(
                        self._db, self._outbox_keep, self._prune_chunk
                    )
                    if pruned == self._prune_chunk:
                        continue  # more to prune: at the next idle turn, after new rows if any
                    next_prune = loop.time() + self._prune_every
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation
                # that arrives in the same loop turn as the wake-up, and the stop is lost.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_POLL):
                        await self._wake.wait()
                continue
            if not self._term.held():
                await self._wait_for_lease()
            if missing := _missing_seqs(self._published + 1, rows):
                # Reported once; before that, the recorded position is read again.
                if missing[-1][1] > self._reported_missing and await self._recorded_elsewhere():
                    continue
                self._report_missing(missing)
            follows = 0 if accept_hole else self._published + 1
            try:
                async with asyncio.timeout(REDIS_CALL_TIMEOUT):
                    top = await self._publish(rows, follows=follows)
            except (RedisError, TimeoutError) as exc:
                failures += 1
                last_seq = await outbox.last_seq(self._db)
                self._metrics.publish_backlog.set(max(0, last_seq - self._published))
                self._metrics.redis_up.set(0)
                delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(failures, 16))
                delay *= 0.5 + self._rng.random() / 2
                log.warning(
                    "redis publish failed, will retry",
                    error=str(exc) or type(exc).__name__,
                    backlog=last_seq - self._published,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info("redis publishing resumed", after_failures=failures)
                failures = 0
            accept_hole = False
            if top is not None:
                accept_hole = await self._rewind_to(top, rows[0].seq)
                continue
            self._metrics.redis_up.set(1)
            self._published = rows[-1].seq
            reported_top = None
            # Never lowered by a stream filled again (_rewind_to): the rows up to it went out
            # on Pub/Sub when they were new, and the script publishes only those above it.
            if self._published > self._recorded:
                self._recorded = self._published
                await outbox.mark_published(self._db, self._published)
                self._metrics.published_seq.set(self._published)
            if len(rows) == BATCH_SIZE:  # still draining: worth a query to show how much is left
                last_seq = await outbox.last_seq(self._db)
                self._metrics.publish_backlog.set(max(0, last_seq - self._published))

    async def _wait_for_lease(self) -> None:
        """Hold publishing back until the lease is renewed: this process may have been paused
        past LEASE_TTL and replaced by a standby that publishes now. If the lease was taken,
        the renewal raises LeaseLost and the service stops, cancelling this wait. At start-up
        the first renewal is on its way (it starts with the publisher): no warning then."""
        if self._term.lapsed_for() is None:  # never renewed yet
            await self._term.wait_held()
            return
        log.warning(
            "publishing waits for the write lease's renewal: not renewed within LEASE_TTL "
            "(the process paused, or the database slow to answer)",
            published=self._published,
        )
        await self._term.wait_held()
        log.info("write lease renewed; publishing goes on", published=self._published)

    async def _recorded_elsewhere(self) -> bool:
        """Whether another publisher recorded progress past what this one knows (a leader that
        took over while this process was paused), which it then goes on from: the rows it
        would have reported missing were published, and pruned from the outbox since."""
        recorded = await outbox.published_seq(self._db)
        if recorded <= self._recorded:
            return False
        log.info(
            "another publisher recorded progress past this one's; going on from there",
            published=self._published,
            recorded=recorded,
        )
        self._recorded = recorded
        self._published = max(self._published, recorded)
        self._metrics.published_seq.set(self._published)
        return True

    async def _note_stream_ahead(self) -> None:
        """Say so when the stream already holds seqs this database has not published: they are
        taken as already there (the script skips them, checking each).

        Up to the last seq this database assigned, that is what a publisher stopped between
        its stream write and recording it leaves (a crash, a stop, a takeover): ordinary.
        Past it, the seqs were never this database's (docs/protocol.md, "Stream"): a
        database restored or rebuilt numbers its events again, not as before, so events
        would be skipped or repeated; the stream is to be deleted before it publishes.
        """
        top = await self._stream_top()
        if top is None or top <= self._published:
            return
        if top <= await outbox.last_seq(self._db):
            log.info(
                "resuming after a stop between publishing and recording it: the seqs "
                "already in the stream are checked, not written again",
                stream=self._stream_key,
                stream_top=top,
                published=self._published,
            )
        else:
            log.warning(
                "the stream already holds seqs this database never assigned; they are "
                "skipped as already there, so its events at those seqs are not in the "
                "stream. A database restored or rebuilt numbers its events anew: stop the "
                "indexer and delete the stream (DEL) before it publishes "
                "(docs/operations.md, 'Recovery'); for another deployment's stream, "
                "delete it or set REDIS_STREAM_KEY",
                stream=self._stream_key,
                stream_top=top,
                published=self._published,
            )

    async def _stream_top(self) -> int | None:
        """The seq of the stream's newest entry (0: no stream), None when Redis does not
        answer. Records whether Redis answers; publishing retries on its own, so no raise."""
        try:
            async with asyncio.timeout(REDIS_CALL_TIMEOUT):
                info = await self._redis.xinfo_stream(self._stream_key)
        except ResponseError as exc:
            if "no such key" not in str(exc).lower():
                self._metrics.redis_up.set(0)
                log.warning("redis refused XINFO STREAM", error=str(exc))
                return None
            top = 0
        except (RedisError, TimeoutError) as exc:
            self._metrics.redis_up.set(0)
            if not self._idle_redis_down:
                # Once, not every PING_EVERY: a wrong password or a Redis stopped while the
                # chain is quiet showed only in the metric, until the next event failed.
                self._idle_redis_down = True
                log.warning(
                    "redis does not answer; events wait in the outbox until it does",
                    error=str(exc) or type(exc).__name__,
                )
            return None
        else:
            top = seq_of_entry_id(info.get("last-generated-id"))
        if self._idle_redis_down:
            self._idle_redis_down = False
            log.info("redis answers again")
        self._metrics.redis_up.set(1)
        return top

    async def _rewind_to(self, top: int, first: int) -> bool:
        """The stream ends at top, below what was published: Redis lost its newest entries
        (restarted from an older snapshot, a replica promoted). Write them again from top as
        far as the outbox still reaches (to the stream only: `_recorded` stays, the script
        PUBLISHes nothing at or below it); returns whether a hole must be accepted all the
        same."""
        oldest = min(first, await outbox.oldest_outbox_seq(self._db) or first)
        restart = max(top, oldest - 1)
        log.warning(
            "the stream lost its newest entries; writing them again from the outbox",
            stream_top=top,
            published=self._published,
            again_from=restart + 1,
        )
        if restart > top:
            log.error(
                "the stream keeps a hole: the outbox no longer holds these seqs",
                missing_from=top + 1,
                missing_to=restart,
            )
            self._metrics.stream_missing.inc(restart - top)
        self._published = restart
        self._handed.clear()
        return restart > top

    def _report_missing(self, missing: Sequence[tuple[int, int]]) -> None:
        """Seqs absent from the outbox (deleted by hand: it has no gaps of its own) can never
        reach the stream; the broadcaster will see a gap there. Each run once, though a failed
        publication reads the same rows again."""
        for first, last in missing:
            if last <= self._reported_missing:
                continue
            self._reported_missing = last
            log.error(
                "the outbox misses seqs between the published ones: they are lost for the "
                "stream (was a row deleted by hand?)",
                missing_from=first,
                missing_to=last,
            )
            self._metrics.stream_missing.inc(last - first + 1)

    async def _publish(self, rows: list[OutboxRow], *, follows: int) -> int | None:
        """Write rows to the stream and channels (those above the recorded position only);
        returns the stream's top instead when it ends before seq `follows` (unless 0), having
        written nothing."""
        args: list[bytes | int] = [self._maxlen, follows, self._recorded]
        args += [script_event(row.seq, row.channels, row.payload) for row in rows]
        added, top, foreign_seqs, unchecked = await self._script(keys=[self._stream_key], args=args)
        if int(added) < 0:
            return int(top)
        if int(unchecked) and not self._told_unchecked:
            self._told_unchecked = True
            log.warning(
                "cannot check the seqs already in the stream that are skipped: the Redis user "
                "may not XRANGE. Re-run deploy/provision.sh to install the current ACL",
                stream=self._stream_key,
                unchecked=int(unchecked),
            )
        if foreign := [int(seq) for seq in foreign_seqs]:
            log.error(
                "the stream holds other entries at the seqs of these events, so they are not "
                "in it: another deployment writes to this stream? Give each its own "
                "REDIS_STREAM_KEY",
                stream=self._stream_key,
                stream_top=int(top),
                first_seq=foreign[0],
                last_seq=foreign[-1],
                count=len(foreign),
            )
            self._metrics.stream_missing.inc(len(foreign))
        return None


def _missing_seqs(expected: int, rows: Sequence[OutboxRow]) -> list[tuple[int, int]]:
    """The (first, last) runs of seqs from `expected` on that rows skip."""
    if rows[0].seq == expected and rows[-1].seq == expected + len(rows) - 1:
        return []  # the usual case: rows are distinct and ascending, so none is skipped
    missing = []
    for row in rows:
        if row.seq > expected:
            missing.append((expected, row.seq - 1))
        expected = row.seq + 1
    return missing


def seq_of_entry_id(last_id: object) -> int:
    """The seq of a stream entry ID as XINFO gives it (bytes or str, "<seq>-0")."""
    text = last_id.decode() if isinstance(last_id, bytes) else str(last_id or "0-0")
    return int(text.split("-")[0])
