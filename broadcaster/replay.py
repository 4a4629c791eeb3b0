"""Resume: a subscribe with `since` replays what the client missed, then goes live.

The subscription is added to routing at once, with the connection's live events held back
(`Client.pending`, filled by Hub.dispatch); the history in (since, boundary] — boundary being
the newest seq relayed at that moment — is replayed from memory (events.History) or the
stream (hub.Source, XRANGE in pages), skipping what an older subscription of the connection
already covered; then the caller sends the ack and calls go_live(), which sends the held
events. So nothing falls between replay and live, and nothing is sent twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from broadcaster.errors import StreamUnavailable
from broadcaster.events import Event
from broadcaster.hub import Client, Hub
from broadcaster.routing import matcher

__all__ = ["Resume", "first_covered", "go_live", "resume"]

log = structlog.get_logger()

REPLAY_PAGE = 500
# A replaying client that reads nothing for this long is dropped as a slow consumer.
REPLAY_DRAIN_TIMEOUT = 30.0
# How long a resume waits for this instance to reach a `since` another instance already sent.
CATCH_UP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Resume:
    """The outcome of a subscribe with since, for the ack."""

    seq: int | None
    recovered: bool
    replayed: int


async def resume(hub: Hub, client: Client, channel: str, since: int) -> Resume:
    """Subscribe and replay what came after since; live events wait for go_live().

    The caller sends the ack, then calls go_live(). If this raises (the connection is being
    closed), Hub.disconnect() forgets the held events.
    """
    hub.admit(client, channel)
    older = {sub: start for sub, start in client.subs.items()}
    boundary = hub.position
    if channel not in client.subs:
        hub.route(client, channel)
    client.subs[channel] = min(since, older.get(channel, since))
    client.pending = []
    client.pending_bytes = 0
    recovered, replayed = await _replay(hub, client, channel, since, boundary, older)
    hub.metrics.replays.labels(recovered=str(recovered).lower()).inc()
    hub.metrics.replay_size.observe(replayed)
    return Resume(seq=boundary, recovered=recovered, replayed=replayed)


def go_live(hub: Hub, client: Client) -> None:
    """Send the live events held during a replay, then deliver live as usual."""
    pending, client.pending, client.pending_bytes = client.pending, None, 0
    if not pending or client.dropped:
        return
    covering = [(matcher(sub), start) for sub, start in client.subs.items()]
    now_ms = hub.now_ms()
    for event in pending:
        if event.seq <= client.last_seq:
            continue
        channel = first_covered(event, covering)
        if channel is None:
            continue
        if not client.is_open():
            return
        client.write(event.frame(channel, now_ms))
        client.last_seq = event.seq
    if client.buffered() > hub.send_buffer_bytes:
        hub.cut_slow(client)


async def _replay(
    hub: Hub,
    client: Client,
    channel: str,
    since: int,
    boundary: int | None,
    older: dict[str, int],
) -> tuple[bool, int]:
    """Send the history of channel in (since, boundary]; return (complete, sent)."""
    if boundary is None:
        return False, 0  # not reading the stream yet (Redis unreachable since boot)
    if since >= boundary:
        return await _await_since(hub, client, channel, since, boundary, older)
    if boundary - since > hub.replay_limit:
        return False, 0
    covered = [(matcher(sub), start) for sub, start in older.items()]
    wanted = matcher(channel)
    if hub.history.covers(since, boundary):
        entries = hub.history.between(since, boundary)
        return True, await _send(hub, client, entries, wanted, covered)
    if hub.source is None:
        return False, 0
    recovered, sent, after = True, 0, since
    while after < boundary:
        try:
            page = await hub.source.entries(after, boundary, REPLAY_PAGE)
        except StreamUnavailable as exc:
            log.warning("resume could not read the stream", error=str(exc))
            return False, sent
        if not page:
            break
        for seq, _ in page:
            recovered = recovered and seq == after + 1
            after = seq
        sent += await _send(hub, client, page, wanted, covered)
    return recovered and after >= boundary, sent


async def _await_since(
    hub: Hub, client: Client, channel: str, since: int, boundary: int, older: dict[str, int]
) -> tuple[bool, int]:
    """since is at or past our position: the client saw it through a faster instance."""
    if since == boundary:
        return True, 0
    try:
        top = await hub.source.top() if hub.source is not None else None
    except StreamUnavailable:
        top = None
    if top is not None and since <= top and await hub.reached(since, CATCH_UP_TIMEOUT):
        return True, 0
    # A since the stream never had (it was recreated) or that we cannot reach: go live
    # from here; the client is told to reload.
    client.subs[channel] = min(boundary, older.get(channel, boundary))
    return False, 0


async def _send(
    hub: Hub,
    client: Client,
    entries: Iterable[tuple[int, Event | None]],
    wanted: Callable[[str], bool],
    covered: list[tuple[Callable[[str], bool], int]],
) -> int:
    """Write the replayed events the new subscription adds; pace on the client's reading."""
    sent = 0
    now_ms = hub.now_ms()
    for _, event in entries:
        if event is None:
            continue
        channel = next((c for c in event.channels if wanted(c)), None)
        if channel is None or first_covered(event, covered) is not None:
            continue
        if not client.is_open() or client.dropped:
            break
        client.write(event.frame(channel, now_ms))
        sent += 1
        if client.buffered() > hub.send_buffer_bytes // 2:
            try:
                async with asyncio.timeout(REPLAY_DRAIN_TIMEOUT):
                    await client.peer.drain()
            except TimeoutError:
                hub.cut_slow(client)
                break
    return sent


def first_covered(event: Event, covering: list[tuple[Callable[[str], bool], int]]) -> str | None:
    """The first channel of event that a subscription covers (matches, and seq above from)."""
    for channel in event.channels:
        for matches, start in covering:
            if event.seq > start and matches(channel):
                return channel
    return None
