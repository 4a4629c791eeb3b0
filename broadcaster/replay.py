"""Resume: a subscribe with `since` replays what the client missed, then goes live.

The subscription is added to routing at once, with the connection's live events held back
(`Client.pending`, filled by Hub.dispatch); the history in (since, boundary] — boundary being
the newest seq relayed at that moment — is replayed from memory (events.History) or the
stream (hub.Source, XRANGE in pages), skipping what an older subscription of the connection
already covered; then the caller sends the ack and calls go_live(), which sends the held
events. So nothing falls between replay and live, and nothing is sent twice.

Live events held back past WS_SEND_BUFFER_BYTES are let go (Hub._hold): a client reading a
long replay while events keep coming is not closed for them. After the replay, _catch_up
sends what came since the boundary from the history, in rounds, the held events let go again
whenever they pile up, until a round ends with what is held small enough to send at once; the
boundary moves to the last round's end. A client not live after CATCH_UP_WITHIN of rounds
(it reads slower than events come) is closed with 4008.

A stream that ends before the boundary while the stream reader waits for the indexer to write
lost entries again (Hub.refill_awaited) is waited for too, then read on from where it ended.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import structlog

from broadcaster.errors import StreamUnavailable
from broadcaster.events import Event
from broadcaster.hub import Client, Hub
from broadcaster.routing import kind_of, matcher

__all__ = ["Coverage", "Reading", "Resume", "go_live", "most_read", "resume"]

log = structlog.get_logger()

REPLAY_PAGE = 500
# Entries a replay scans between two turns of the event loop: ~1-3 ms of work, even when each
# is tested against a hundred subscriptions.
REPLAY_YIELD_EVERY = 256
# A replaying client that reads nothing for this long is dropped as a slow consumer.
REPLAY_DRAIN_TIMEOUT = 30.0
# How long a resume waits for this instance to reach a `since` another instance already sent.
CATCH_UP_TIMEOUT = 5.0
# How long a resume may take sending what came during its replay (_catch_up) before the client
# is live: one that reads slower than events come never gets there, and is closed with 4008.
CATCH_UP_WITHIN = REPLAY_DRAIN_TIMEOUT
# How long a resume that finds the stream short of what was relayed (Redis lost entries) waits
# for the indexer to write them again: as long as the stream reader's grace for a stream that
# grows no more (stream.REFILL_GRACE). The reader may wait longer (a refill still growing,
# Redis away meanwhile); the client is then told to reload rather than kept waiting.
REFILL_WAIT = 15.0
# What asking Redis for the stream's top (a `since` past this instance's position) costs the
# address's history budget: as much as reading a page of history, so that repeating such
# resumes cannot keep Redis busy for free. The server-wide budget (WS_REPLAY_STREAM_BUDGET)
# is charged what the query reads, one entry: charged a page there too, six addresses
# asking 80 times each, a round trip apiece, spent all of it and refused everyone's resumes.
TOP_QUERY_COST = REPLAY_PAGE
TOP_QUERY_READS = 1
# What reading an entry of memory (Hub.history) costs the address's history budget, against
# 1 for an entry of the Redis Stream: measured in a resume that sends nothing, about 1 us of
# CPU an entry against 25-43 us (the round trips, parsing and validating each entry). Charged
# as Redis reads, a reconnect resuming each of its 26 channels over 2,000 missed events
# (52,000 entries, all in memory) spent the 40,000 of the budget and five were told to reload.
MEMORY_READ_COST = 1 / 16


@dataclass(frozen=True, slots=True)
class Resume:
    """The outcome of a subscribe with since, for the ack."""

    seq: int | None
    recovered: bool
    replayed: int


@dataclass(slots=True)
class Reading:
    """A resume's reading of the history: whether it may read any, and what it read so far.

    `scanned` counts the history entries read (those of memory at MEMORY_READ_COST), or
    their worth (TOP_QUERY_COST), sent or not: the resume's cost to its address's budget. It
    is counted as they are read, so that a resume cancelled midway (its connection closed) is
    charged what it read.
    """

    may_read: bool = True
    scanned: float = 0


def most_read(hub: Hub, since: int) -> int:
    """The most a resume from since that starts now may read (Reading.scanned at its end):
    at memory's price when memory holds it all, as _replay then reads it from there.

    The same cases as _replay's, for the same boundary: the position, as long as no await
    comes between this and resume().
    """
    boundary = hub.position
    if boundary is None or (hub.reset_at is not None and since <= hub.reset_at):
        return 0
    if since >= boundary:
        return TOP_QUERY_COST if since > boundary else 0
    if boundary - since > hub.replay_limit:
        return 0
    if hub.history.covers(since, boundary):  # as _replay decides, with no await between
        return math.ceil((boundary - since) * MEMORY_READ_COST)
    return boundary - since


async def resume(hub: Hub, client: Client, channel: str, since: int, *, reading: Reading) -> Resume:
    """Subscribe and replay what came after since; live events wait for go_live().

    `reading.may_read` False (the connection's address read all the history it may for
    now): neither history nor the stream's top is read, so a since other than the position
    gets recovered: false.
    The caller sends the ack, then calls go_live(). If this raises (the connection is being
    closed), Hub.disconnect() forgets the held events.
    """
    if not hub.serves(client):  # closed before this began
        return Resume(seq=hub.position, recovered=False, replayed=0)
    hub.admit(client, channel)
    older = {sub: start for sub, start in client.subs.items()}
    boundary = hub.position
    if channel not in client.subs:
        channel = hub.route(client, channel)
    client.subs[channel] = min(since, older.get(channel, since))
    client.pending = []
    client.pending_bytes = 0
    if reading.may_read or boundary is None or since == boundary:
        outcome = await _replay(hub, client, channel, since, boundary, older, reading)
    else:
        outcome = _Replayed(False, 0, boundary)
    recovered, replayed, covered = outcome
    if boundary is not None and hub.serves(client):
        boundary, caught_up = await _catch_up(hub, client, boundary, reading)
        replayed += caught_up
    if client.dropped or client not in hub.clients:
        # Closed meanwhile: its subscriptions are gone and must stay so (and uncounted).
        return Resume(seq=boundary, recovered=False, replayed=replayed)
    # A later resume of an overlapping channel skips what this one covers, so it must claim
    # only what it delivered: from the last gap in its replay (the start of a trimmed stream),
    # or from the boundary if the replay was refused or cut short (then some may come twice,
    # to a client told to reload anyway).
    client.subs[channel] = min(covered, older.get(channel, covered))
    hub.metrics.replays.labels(recovered=str(recovered).lower()).inc()
    hub.metrics.replay_size.observe(replayed)
    return Resume(seq=boundary, recovered=recovered, replayed=replayed)


class _Replayed(NamedTuple):
    complete: bool  # every matching event in (since, boundary] was sent
    sent: int
    covered: int  # the seq after which every matching event up to the boundary was delivered


def go_live(hub: Hub, client: Client) -> None:
    """Send the live events held during a replay, then deliver live as usual."""
    pending, client.pending, client.pending_bytes = client.pending, None, 0
    if not pending or client.dropped:
        return
    covering = Coverage(client.subs)
    now_ms = hub.now_ms()
    sent = 0
    for event in pending:
        if event.seq <= client.last_seq:
            continue
        channel = covering.first(event)
        if channel is None:
            continue
        if not client.is_open():
            break
        client.write(event.frame(channel, now_ms))
        client.last_seq = event.seq
        sent += 1
    # Held back from Hub.dispatch, which counted them neither: counted here, once.
    hub.metrics.deliveries.inc(sent)
    if client.is_open() and client.buffered() > hub.send_buffer_bytes:
        hub.cut_slow(client)


async def _replay(
    hub: Hub,
    client: Client,
    channel: str,
    since: int,
    boundary: int | None,
    older: dict[str, int],
    reading: Reading,
) -> _Replayed:
    """Send the history of channel in (since, boundary]; what it reads is counted in
    `reading` (most_read() follows these cases)."""
    if boundary is None:
        # Not reading the stream yet (Redis unreachable since boot); Hub.start() moves the
        # subscription's start to where following begins.
        return _Replayed(False, 0, since)
    if hub.reset_at is not None and since <= hub.reset_at:
        return _Replayed(False, 0, boundary)  # an old stream's seq: nothing continues it
    if since >= boundary:
        if since > boundary:
            reading.scanned += TOP_QUERY_COST
        complete = await _await_since(hub, since, boundary)
        return _Replayed(complete, 0, since if complete else boundary)
    if boundary - since > hub.replay_limit:
        return _Replayed(False, 0, boundary)
    covered = Coverage(older)
    wanted = matcher(channel)
    entries = _from_memory(hub, since, boundary, reading)
    if entries is not None:
        sent = await _send(hub, client, entries, _adds(wanted, covered))
        return _Replayed(True, sent, since)
    if hub.source is None:
        return _Replayed(False, 0, boundary)
    return await _replay_stream(hub, client, since, boundary, wanted, covered, reading)


async def _replay_stream(
    hub: Hub,
    client: Client,
    since: int,
    boundary: int,
    wanted: Callable[[str], bool],
    covered: Coverage,
    reading: Reading,
) -> _Replayed:
    """_replay's reading of the Redis Stream (XRANGE in pages), memory lacking (since,
    boundary]; each page is charged to the server-wide budget as it is read."""
    assert hub.source is not None
    sent, after, contiguous_from = 0, since, since
    refill = _RefillWait(hub)
    while after < boundary:
        awaited = hub.refill_awaited  # before the read: a refill may end during it
        page = await _read_page(hub, after, boundary)
        if page is None:
            return _Replayed(False, sent, boundary)
        if not page:
            # The stream ends before the boundary: trimmed past it, or Redis lost entries
            # that the reader waits for the indexer to write again; then read on from here.
            lost = awaited or hub.refill_awaited or await _lost_relayed(hub, boundary)
            if lost and await refill.ended() and hub.serves(client):
                continue
            break
        for seq, _ in page:
            if seq != after + 1:  # trimmed or missing: nothing before it is delivered whole
                contiguous_from = seq - 1
            after = seq
        reading.scanned += len(page)
        sent += await _send(hub, client, page, _adds(wanted, covered))
    if after < boundary:
        return _Replayed(False, sent, boundary)
    return _Replayed(contiguous_from == since, sent, contiguous_from)


async def _await_since(hub: Hub, since: int, boundary: int) -> bool:
    """since is at or past our position: the client saw it through a faster instance.

    False for a since the stream never had (it was recreated) or that this instance cannot
    reach: the subscription goes live from here and the client is told to reload. While Redis
    lacks entries the reader waits for, the stream's top is asked again once they are back.
    """
    if since == boundary:
        return True
    awaited = hub.refill_awaited
    top = await _top(hub)
    if top is not None and top < since and (awaited or hub.refill_awaited or top < boundary):
        # Redis lost entries: the stream's top says nothing until they are written again.
        hub.refill_awaited = True  # for the reader to confirm, if it has not noticed yet
        top = await _top(hub) if await _RefillWait(hub).ended() else None
    return top is not None and since <= top and await hub.reached(since, CATCH_UP_TIMEOUT)


async def _lost_relayed(hub: Hub, boundary: int) -> bool:
    """Whether the stream's top is below the boundary: Redis lost entries this instance
    relayed (a trimmed stream keeps its top). Found by a resume before the stream reader
    noticed (it was in a blocking read, or in its back-off after a Redis restart), it is
    flagged for the reader, whose next look at the stream confirms it or clears it."""
    top = await _top(hub)
    if top is None or top >= boundary:
        return False
    hub.refill_awaited = True
    return True


async def _top(hub: Hub) -> int | None:
    """The stream's top, None if it cannot be read (WS_REPLAY_STREAM_BUDGET spent too)."""
    if hub.source is None or not hub.reserve_stream_reads(TOP_QUERY_READS):
        return None
    try:
        return await hub.source.top()
    except StreamUnavailable:
        return None


class _RefillWait:
    """A resume's waits for the stream reader's refill: REFILL_WAIT from the first, in all."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._deadline: float | None = None

    async def ended(self) -> bool:
        """Wait until the refill is no longer awaited (done, or the stream taken as a new
        one); False once the resume has waited REFILL_WAIT."""
        now = asyncio.get_running_loop().time()
        if self._deadline is None:
            self._deadline = now + REFILL_WAIT
        return await self._hub.refilled(max(0.0, self._deadline - now))


async def _catch_up(hub: Hub, client: Client, boundary: int, reading: Reading) -> tuple[int, int]:
    """After a replay up to boundary: while the live events held back meanwhile were let go
    (Client.spilled), or are too many to send at once, send those after boundary from the
    history instead (every subscription's), the held ones forgotten, and look again. Returns
    the new boundary, which the ack names, and the events sent.

    Each round sends what came during the one before, so a client reading faster than events
    come gets nearer; one that is not live within CATCH_UP_WITHIN reads slower than they come
    (or Redis is too far for its buffer) and is closed with 4008, as a client whose held
    events filled its buffer was before; so is one whose round the history cannot give.
    """
    sent = 0
    deadline = asyncio.get_running_loop().time() + CATCH_UP_WITHIN
    while hub.serves(client):
        if client.buffered() > hub.send_buffer_bytes // 2 and not await _drained(hub, client):
            break
        if not client.spilled and (
            client.pending_bytes + client.buffered() <= hub.send_buffer_bytes
        ):
            break
        upto = hub.position
        assert upto is not None
        # Held from here on: what comes while the round reads the stream is after upto.
        client.pending = []
        client.pending_bytes = 0
        client.spilled = False
        try:
            async with asyncio.timeout_at(deadline):
                round_sent = await _send_round(hub, client, boundary, upto, reading)
        except TimeoutError:
            round_sent = None
        if round_sent is None:
            hub.cut_slow(client)
            break
        sent += round_sent
        boundary = upto
    return boundary, sent


async def _send_round(
    hub: Hub, client: Client, after: int, upto: int, reading: Reading
) -> int | None:
    """Send the events in (after, upto] that the connection's subscriptions cover, from
    memory or the stream (page by page); the number sent, or None when the history no longer
    holds them all (the stream trimmed or unreachable, its budget spent)."""
    covering = Coverage(client.subs)
    entries = _from_memory(hub, after, upto, reading)
    if entries is not None:
        return await _send(hub, client, entries, covering.first, live=True)
    if hub.source is None:
        return None
    sent = 0
    while after < upto:
        page = await _read_page(hub, after, upto)
        if page is None:
            return None
        reading.scanned += len(page)
        if not page or page[0][0] != after + 1 or page[-1][0] != after + len(page):
            return None  # a hole: trimmed, or entries Redis lost
        sent += await _send(hub, client, page, covering.first, live=True)
        after = page[-1][0]
    return sent


def _from_memory(
    hub: Hub, after: int, upto: int, reading: Reading
) -> list[tuple[int, Event | None]] | None:
    """The entries in (after, upto] if memory holds them all (charged at memory's price),
    else None."""
    if not hub.history.covers(after, upto):
        return None
    entries = hub.history.between(after, upto)
    reading.scanned += len(entries) * MEMORY_READ_COST
    return entries


async def _read_page(hub: Hub, after: int, upto: int) -> list[tuple[int, Event | None]] | None:
    """A page of the stream's entries in (after, upto]; None when the server-wide budget is
    spent or the stream cannot be read.

    Charged the most the page may hold before the read, so that resumes reading at once
    count against each other, and what it did not hold refunded after (also when cancelled).
    Page by page, not the whole resume up front: a resume that stalls on a client reading
    nothing (for up to REPLAY_DRAIN_TIMEOUT) then holds the page it read, not all it may
    read (20 such connections held all of 200,000 for 30 s).
    """
    assert hub.source is not None
    most = min(REPLAY_PAGE, upto - after)
    if not hub.reserve_stream_reads(most):
        return None
    page: list[tuple[int, Event | None]] = []
    try:
        page = await hub.source.entries(after, upto, REPLAY_PAGE)
    except StreamUnavailable as exc:
        log.warning("resume could not read the stream", error=str(exc))
        return None
    finally:
        hub.return_stream_reads(most - len(page))
    return page


async def _send(
    hub: Hub,
    client: Client,
    entries: Iterable[tuple[int, Event | None]],
    channel_of: Callable[[Event], str | None],
    *,
    live: bool = False,
) -> int:
    """Write the events of entries that channel_of gives a channel, on it; pace on the
    client's reading. `live`: events after the boundary (_catch_up), which then count as
    delivered live (Client.last_seq), so that go_live() skips them when held too."""
    sent = 0
    now_ms = hub.now_ms()
    try:
        for scanned, (_, event) in enumerate(entries, start=1):
            if scanned % REPLAY_YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a long replay must not hold up everyone else's events
            if event is None or (live and event.seq <= client.last_seq):
                continue
            channel = channel_of(event)
            if channel is None:
                continue
            if not client.is_open() or client.dropped:
                break
            client.write(event.frame(channel, now_ms))
            if live:
                client.last_seq = event.seq
            sent += 1
            if client.buffered() > hub.send_buffer_bytes // 2 and not await _drained(hub, client):
                break
    finally:
        # Once per page, also for a replay cut short by its connection's end (cancelled).
        hub.metrics.deliveries.inc(sent)
    return sent


async def _drained(hub: Hub, client: Client) -> bool:
    """Wait for the client to read what was sent down to the connection's low mark; closed
    with 4008 (False) if it does not within REPLAY_DRAIN_TIMEOUT."""
    try:
        async with asyncio.timeout(REPLAY_DRAIN_TIMEOUT):
            await client.peer.drain()
    except TimeoutError:
        hub.cut_slow(client)
        return False
    return True


def _adds(wanted: Callable[[str], bool], covered: Coverage) -> Callable[[Event], str | None]:
    """For a replay: the first channel of an event that the new subscription matches (None
    when none does, or another subscription of the connection covered the event)."""

    def channel_of(event: Event) -> str | None:
        if covered.first(event) is not None:
            return None
        return next((c for c in event.channels if wanted(c)), None)

    return channel_of


class Coverage:
    """What a client's subscriptions cover: each (its channel or pattern) every event after
    its start seq. Channels are looked up, patterns matched: a resume checks every event it
    reads against the client's other subscriptions, which may be hundreds of markets."""

    __slots__ = ("_exact", "_patterns")

    def __init__(self, subs: Mapping[str, int]) -> None:
        self._exact: dict[str, int] = {}
        self._patterns: list[tuple[Callable[[str], bool], int]] = []
        for sub, start in subs.items():
            if kind_of(sub) == "exact":
                self._exact[sub] = start
            else:
                self._patterns.append((matcher(sub), start))

    def first(self, event: Event) -> str | None:
        """The first channel of event that a subscription covers (matches, seq above start)."""
        seq = event.seq
        for channel in event.channels:
            start = self._exact.get(channel)
            if start is not None and seq > start:
                return channel
            for matches, start in self._patterns:
                if seq > start and matches(channel):
                    return channel
        return None
