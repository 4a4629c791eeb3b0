"""The fan-out core: who is subscribed to what, and every event delivered once, in order.

No I/O of its own: connections come in as `Peer`s (connection.py) and the stream, for resumes
that memory cannot answer, as a `Source` (stream.py). The follower feeds `dispatch()` with
consecutive stream entries; each event is routed once (routing.Registry), framed once per
channel (events.Event) and written to every recipient's socket buffer synchronously — never
awaiting a client, so one slow client cannot delay the others. A client whose buffer holds
more than WS_SEND_BUFFER_BYTES is dropped from routing at once and closed with 4008.

Delivery rules (docs/broadcaster.md, "Resume"):
- every subscription has a `from` seq; an event reaches a connection if some subscription
  matches one of its channels and the event's seq is above that subscription's `from`;
- a connection gets each event at most once: live delivery is strictly increasing in seq
  (`Client.last_seq`), and a replay skips what an older subscription already covered;
- a subscribe with `since` is replay.py's: it holds the connection's live events back
  (`Client.pending`, filled by dispatch) while it replays.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import structlog

from broadcaster import messages
from broadcaster.admission import Admission
from broadcaster.events import Event, History
from broadcaster.limits import AddressBudgets, TokenBucket
from broadcaster.metrics import Metrics
from broadcaster.routing import Registry, kind_of

__all__ = ["Client", "Hub", "Peer", "Source"]

log = structlog.get_logger()

SLOW_REASON = "slow consumer: reconnect and resume with since"
# History one client address's resumes may read: four times WS_REPLAY_LIMIT entries at once,
# then that limit's worth per minute. A resume costs the entries it reads even when it sends
# nothing (each is tested against the connection's subscriptions), so without this bound one
# client repeating cheap messages could keep the server busy for everyone. Past it, a resume
# reads nothing and is answered recovered: false (no error: the client reloads, as for a
# miss).
REPLAY_BURST_LIMITS = 4
REPLAY_REFILL_SECONDS = 60.0
# What the resumes of all addresses together may read from the Redis Stream: the address
# budgets bound each address, not how many addresses read at once (each read costs the
# server tens of us per entry, starving live delivery). WS_REPLAY_STREAM_BUDGET entries at
# once, then refilled over this long; replay.py charges it, reads from memory are free.
REPLAY_STREAM_REFILL_SECONDS = 60.0


class Peer(Protocol):
    """What the hub needs from one client connection (connection.Connection provides it).

    The fan-out writes to every routed client without asking whether its connection is
    still open: a connection that stops being open must be disconnected from the hub at
    once (server.Edge.closing does it), before it writes anything else.
    """

    def write(self, frame: bytes) -> None: ...
    def buffered(self) -> int: ...
    def is_open(self) -> bool: ...
    async def drain(self) -> None: ...
    def close(self, code: int, reason: str) -> None: ...


class Source(Protocol):
    """The stream's history, for resumes reaching back further than memory."""

    async def top(self) -> int: ...
    async def entries(self, after: int, upto: int, count: int) -> list[tuple[int, Event | None]]:
        """Entries with after < seq <= upto, oldest first, at most count (None: invalid)."""
        ...


class Client:
    """One connection's subscriptions and delivery state."""

    __slots__ = (
        "address",
        "buffered",
        "dropped",
        "id",
        "is_open",
        "last_seq",
        "peer",
        "pending",
        "pending_bytes",
        "spilled",
        "subs",
        "write",
    )

    def __init__(self, client_id: str, peer: Peer, address: str = "") -> None:
        self.id = client_id
        self.peer = peer
        self.address = address  # its per-IP key (limits.per_ip_key), for per-address shares
        # Bound methods, looked up once: the fan-out loop calls them per recipient.
        self.write: Callable[[bytes], None] = peer.write
        self.buffered: Callable[[], int] = peer.buffered
        self.is_open: Callable[[], bool] = peer.is_open
        self.subs: dict[str, int] = {}  # subscription -> from seq
        self.last_seq = 0  # newest seq delivered live
        self.pending: list[Event] | None = None  # live events held back during a replay
        self.pending_bytes = 0
        # Held-back events were let go, more than WS_SEND_BUFFER_BYTES of them: the replay
        # sends them from the history instead (replay.py).
        self.spilled = False
        self.dropped = False


class Hub:
    """Subscriptions, the stream position, recent history, and the fan-out."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        send_buffer_bytes: int,
        history_size: int,
        replay_limit: int,
        replay_stream_budget: int,
        max_subscriptions: int,
        max_glob_patterns: int,
        max_glob_patterns_per_ip: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.registry: Registry[Client] = Registry()
        self.clients: set[Client] = set()
        self.history = History(history_size)
        self.source: Source | None = None
        self.position: int | None = None  # newest seq relayed; None until the stream is read
        # The top of the stream when it was last found recreated: a `since` at or below it was
        # the old stream's (or one this server never relayed), never a point to replay from.
        self.reset_at: int | None = None
        self.last_relay_time: float | None = None
        self.last_block_time: float | None = None
        self.subscription_count = 0
        self.send_buffer_bytes = send_buffer_bytes
        self._history_size = history_size
        self.replay_limit = replay_limit
        self.admission = Admission(
            self.registry,
            max_subscriptions=max_subscriptions,
            max_glob_patterns=max_glob_patterns,
            max_glob_patterns_per_ip=max_glob_patterns_per_ip,
        )
        self._history_budgets = AddressBudgets(
            replay_limit / REPLAY_REFILL_SECONDS, max(1, REPLAY_BURST_LIMITS * replay_limit)
        )
        self._stream_budget = TokenBucket(  # on time.monotonic(), as the address budgets
            replay_stream_budget / REPLAY_STREAM_REFILL_SECONDS,
            replay_stream_budget,
            time.monotonic(),
        )
        self._clock = clock
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Clear while the stream reader waits for the indexer to write again entries Redis
        # lost (stream.py): the stream then misses entries already relayed.
        self._stream_whole = asyncio.Event()
        self._stream_whole.set()
        # Read when scraped, not updated per connection, subscription or event: a connect
        # storm or a busy stream then costs no metric updates.
        metrics.connections.set_function(lambda: len(self.clients))
        metrics.subscriptions.set_function(lambda: self.subscription_count)
        metrics.last_seq.set_function(lambda: self.position or 0)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def history_budget(self, address: str, now: float) -> TokenBucket:
        """The history the resumes of one client address may read, all its connections
        together: a connection of its own would buy a fresh budget with every reconnect.
        (`now`: the sessions' clock.)"""
        return self._history_budgets.of(address, now)

    def refund_history(
        self, address: str, budget: TokenBucket, *, amount: float, now: float
    ) -> None:
        """Give back to `budget`, history_budget()'s for address, what a resume reserved
        but did not read (through the address budgets: one made full again is forgotten as
        new addresses come, not minutes later)."""
        self._history_budgets.refund(address, budget, amount=amount, now=now)

    def reserve_stream_reads(self, amount: int) -> bool:
        """Charge the server-wide budget of what resumes read from the Redis Stream
        (WS_REPLAY_STREAM_BUDGET) for a read about to be made; False, charging nothing, once it
        is spent (counted in replay_stream_refusals_total)."""
        now = time.monotonic()
        if not self._stream_budget.available(now):
            self.metrics.replay_stream_refusals.inc()
            return False
        self._stream_budget.spend(amount, now)
        return True

    def return_stream_reads(self, amount: int) -> None:
        """Give back what reserve_stream_reads charged for entries a read did not return."""
        self._stream_budget.refund(amount, time.monotonic())

    # Connections

    def connect(self, client_id: str, peer: Peer, address: str = "") -> Client:
        client = Client(client_id, peer, address)
        self.clients.add(client)
        return client

    def serves(self, client: Client) -> bool:
        """Whether the client is still connected: one disconnected or dropped is never routed
        again (its connection may not be written to any more)."""
        return not client.dropped and client in self.clients

    def disconnect(self, client: Client) -> None:
        """Forget a connection (idempotent)."""
        self._unroute(client)
        client.pending = None
        self.clients.discard(client)

    def drop(self, client: Client, code: int, reason: str) -> None:
        """Stop routing to a client now and have its connection closed with code."""
        if client.dropped:
            return
        client.dropped = True
        self._unroute(client)
        client.pending = None
        client.peer.close(code, reason)

    def cut_slow(self, client: Client) -> None:
        """Close a client that does not read what is sent to it (4008: resume with since)."""
        if not client.dropped:
            log.info("client too slow, closing", client=client.id, code=4008)
            self.metrics.slow_consumers.inc()
            self.drop(client, messages.CLOSE_SLOW_CONSUMER, SLOW_REASON)

    def drop_subscribed(self, code: int, reason: str) -> int:
        """Drop every client holding a subscription; return how many."""
        victims = [client for client in self.clients if client.subs and not client.dropped]
        for client in victims:
            self.drop(client, code, reason)
        return len(victims)

    # The stream

    def start(self, position: int) -> None:
        """Set where following the stream begins (its newest entry at boot)."""
        if self.position is None:
            self.position = position
            # Nothing was relayed before (Redis was away since start): what a subscription
            # made meanwhile covers begins here, whatever `since` it asked for (one past the
            # stream, from a Redis restored from an older copy, included).
            for client in self.clients:
                for channel in client.subs:
                    client.subs[channel] = position
            self._wake_waiters()

    def prefill(self, entries: Iterable[tuple[int, Event | None]]) -> None:
        """Remember entries read before following began (at boot), without relaying them."""
        for seq, event in entries:
            self.history.append(seq, event)

    def restart_at(self, position: int) -> None:
        """The stream was recreated: continue from position, closing subscribers."""
        log.error(
            "stream recreated; clients must reload",
            relayed=self.position,
            stream_top=position,
        )
        self.position = position
        self.reset_at = position
        self.history = History(self._history_size)
        self.drop_subscribed(messages.CLOSE_STREAM_GAP, "stream reset: reconnect and reload")
        for client in self.clients:
            client.last_seq = 0  # seqs start again: what they saw says nothing of the new ones

    def dispatch(self, entries: Sequence[tuple[int, Event | None]]) -> None:
        """Relay consecutive stream entries (None: an invalid entry, counted by the caller).

        Entries read together (a block's events, or a backlog after an outage) reach each
        client in one socket write: on loopback a write costs ~12 us of kernel time on the
        benchmark machine whatever its size up to many KiB, against ~1 us per event of ours.
        """
        now = self._clock()
        now_ms = int(now * 1000)
        overflow: list[Client] = []
        batch: dict[Client, list[bytes]] | None = {} if len(entries) > 1 else None
        relayed = delivered = 0
        started = time.perf_counter()
        for seq, event in entries:
            position = self.position
            if position is not None:
                if seq <= position:
                    continue  # defensive: never relay a seq twice
                if seq != position + 1:
                    self._gap(position, seq)
            self.position = seq
            self.history.append(seq, event)
            if event is None:
                continue
            relayed += 1
            delivered += self._deliver(event, now_ms, overflow, batch)
            self.metrics.lag.observe(max(0.0, now - event.block_time))
            self.last_block_time = event.block_time
        if batch:
            delivered += self._flush(batch, overflow)
        if relayed:
            self.last_relay_time = now
            self.metrics.events.inc(relayed)
            self.metrics.deliveries.inc(delivered)
            # Written together (a batch's writes are per client), so timed together: each
            # event of the read counts its share.
            share = (time.perf_counter() - started) / relayed
            for _ in range(relayed):
                self.metrics.fanout.observe(share)
        for client in overflow:
            self.cut_slow(client)
        self._wake_waiters()

    def _deliver(
        self,
        event: Event,
        now_ms: int,
        overflow: list[Client],
        batch: dict[Client, list[bytes]] | None,
    ) -> int:
        """Write one event to every client it concerns, or add it to batch; return how many
        were written (a batch's are counted by _flush)."""
        seq = event.seq
        limit = self.send_buffer_bytes
        count = 0
        for channel, subscribers in self.registry.route(event.channels):
            frame = event.frame(channel, now_ms)
            for client in subscribers:
                # last_seq also skips a client already served through an earlier group.
                if client.last_seq >= seq:
                    continue
                if client.pending is not None:
                    self._hold(client, event)
                elif batch is not None:
                    # Whether the socket takes it is asked once per client, in _flush.
                    if (frames := batch.get(client)) is None:
                        batch[client] = [frame]
                    else:
                        frames.append(frame)
                    client.last_seq = seq
                elif client.buffered() > limit:
                    overflow.append(client)
                else:
                    client.write(frame)
                    client.last_seq = seq
                    count += 1
        return count

    def _flush(self, batch: dict[Client, list[bytes]], overflow: list[Client]) -> int:
        """Write each client's frames of a batch at once; return how many were written."""
        limit = self.send_buffer_bytes
        count = 0
        for client, frames in batch.items():
            if client.dropped:
                continue
            if client.buffered() > limit:
                overflow.append(client)
            else:
                client.write(frames[0] if len(frames) == 1 else b"".join(frames))
                count += len(frames)
        return count

    def _hold(self, client: Client, event: Event) -> None:
        pending = client.pending
        assert pending is not None
        if pending and pending[-1].seq >= event.seq:
            return
        pending.append(event)
        client.pending_bytes += event.size
        if client.pending_bytes > self.send_buffer_bytes:
            # More came during the replay than the connection may buffer. Not a reason to
            # close a client that is reading its replay: they are let go, and the resume sends
            # them from the history once the replay is done (replay.py, _catch_up).
            pending.clear()
            client.pending_bytes = 0
            client.spilled = True

    def _gap(self, position: int, seq: int) -> None:
        missed = seq - position - 1
        log.warning(
            "stream gap: entries were trimmed before they were read; clients must reload",
            after=position,
            next=seq,
            missed=missed,
        )
        self.metrics.gaps.inc()
        self.metrics.gap_entries.inc(missed)
        self.drop_subscribed(messages.CLOSE_STREAM_GAP, "events were missed: resume with since")

    @property
    def refill_awaited(self) -> bool:
        """Whether the stream misses entries already relayed, which the reader waits for."""
        return not self._stream_whole.is_set()

    @refill_awaited.setter
    def refill_awaited(self, awaited: bool) -> None:
        if awaited:
            self._stream_whole.clear()
        else:
            self._stream_whole.set()
        self.metrics.refill_awaited.set(int(awaited))

    async def refilled(self, within: float) -> bool:
        """Wait until no refill is awaited; False on timeout. A stream found new meanwhile
        has had its subscribers dropped by the time this returns."""
        try:
            async with asyncio.timeout(within):
                await self._stream_whole.wait()
        except TimeoutError:
            return False
        return True

    async def reached(self, seq: int, within: float) -> bool:
        """Wait until the stream position is at least seq; False on timeout."""
        if self.position is not None and self.position >= seq:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (seq, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(within):
                await waiter
        except TimeoutError:
            return False
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        return True

    def _wake_waiters(self) -> None:
        if not self._waiters or self.position is None:
            return
        for seq, waiter in self._waiters:
            if seq <= self.position and not waiter.done():
                waiter.set_result(None)

    # Subscriptions

    def subscribe(self, client: Client, channel: str) -> int | None:
        """Subscribe from now on; return the seq after which events come."""
        if not self.serves(client):
            return self.position
        self.admit(client, channel)
        if channel not in client.subs:
            channel = self.route(client, channel)
            client.subs[channel] = self.position or 0
        return self.position

    def unsubscribe(self, client: Client, channel: str) -> None:
        if client.subs.pop(channel, None) is not None:
            self.registry.remove(channel, client)
            self._count_subscriptions(-1)
            if kind_of(channel) == "glob":
                self.admission.count_glob(client.address, channel, -1)

    def admit(self, client: Client, channel: str) -> None:
        """Refuse a new subscription past the limits (ClientError)."""
        self.admission.check(client.subs, client.address, channel)

    def route(self, client: Client, channel: str) -> str:
        """Add a subscription to routing; return its name, for the caller to key client.subs
        with: the connections subscribed to one channel then share one string, routing's."""
        if kind_of(channel) == "glob":
            # Before routing: it asks whether the pool holds the pattern yet.
            self.admission.count_glob(client.address, channel, 1)
        name = self.registry.add(channel, client)
        self._count_subscriptions(1)
        return name

    def _unroute(self, client: Client) -> None:
        for channel in client.subs:
            self.registry.remove(channel, client)
            if kind_of(channel) == "glob":
                self.admission.count_glob(client.address, channel, -1)
        self._count_subscriptions(-len(client.subs))
        client.subs = {}

    def _count_subscriptions(self, delta: int) -> None:
        self.subscription_count += delta
