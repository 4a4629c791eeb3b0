"""One client's conversation: the greeting, answers to its messages, and its limits.

Transport-agnostic: replies are written as frames through the hub's Client, and a decision
to hang up is raised as CloseConnection for the connection to carry out. A message is
answered at once, except a resume, which is returned as work for the connection to run; the
connection holds its later messages until that work is done, so a replay never interleaves
with another of the same connection's requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from broadcaster import messages, replay
from broadcaster.errors import ClientError, CloseConnection
from broadcaster.hub import Client, Hub
from broadcaster.limits import TokenBucket

__all__ = ["Session"]

# Invalid messages tolerated: a burst of 10, then one per 10 s; past that the client is closed.
ERROR_BURST = 10.0
ERROR_RATE = 0.1
# How long the allowance for the messages a resume held back lasts once it ended: they are
# parsed as soon as reading resumes, within a few turns of the event loop.
HELD_ALLOWANCE_FOR = 1.0


class Session:
    """Answers one connection's messages; raises CloseConnection to end it."""

    # Messages allowed beyond the rate, until a time: what the client sent at its rate while
    # a resume held its messages back (excuse). Class defaults: set on a session only then.
    _held_allowance = 0.0
    _held_allowance_until = 0.0

    def __init__(
        self,
        hub: Hub,
        client: Client,
        *,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hub = hub
        self.client = client
        self._rate = rate
        self._clock = clock
        now = clock()
        self._messages = TokenBucket(rate, burst, now)
        self._errors = TokenBucket(ERROR_RATE, ERROR_BURST, now)

    def greeting(self) -> bytes:
        """The frame that opens the conversation (the connection sends it with the 101)."""
        payload = messages.connected(self.client.id, self.hub.now_ms(), self.hub.position)
        return messages.text_frame(payload)

    def handle(self, message: str | bytes) -> Coroutine[Any, Any, None] | None:
        """Answer one message from the client; a resume is returned as work to run next."""
        if isinstance(message, bytes):
            raise CloseConnection(
                messages.CLOSE_UNSUPPORTED_DATA, "binary messages are not supported"
            )
        if not self._take_message(self._clock()):
            self._refuse(
                ClientError("rate_limited", f"more than {self._rate:g} messages per second"),
                flood=True,
            )
            return None
        try:
            request = messages.parse_client_message(message)
        except ClientError as problem:
            self._refuse(problem)
            return None
        if isinstance(request, messages.Ping):
            self._reply(messages.pong(self.hub.now_ms()))
        elif isinstance(request, messages.Unsubscribe):
            self.hub.unsubscribe(self.client, request.channel)
            self._reply(messages.unsubscribed(request.channel, self.hub.now_ms()))
        elif request.since is None:
            try:
                seq = self.hub.subscribe(self.client, request.channel)
            except ClientError as problem:
                self._refuse(problem)
                return None
            self._reply(
                messages.subscribed(
                    request.channel, self.hub.now_ms(), seq=seq, recovered=None, replayed=None
                )
            )
        else:
            return self._resume(request.channel, request.since)
        return None

    def charge(self, kind: str) -> None:
        """A frame that is not a message to answer (a ping, which the protocol answers by
        itself, a pong that answers nothing, a message's fragment, a message read while the
        server's close waits for the client's) costs a message like any other; past the
        rate it counts as an invalid one, and a flood ends the connection."""
        now = self._clock()
        if not self._take_message(now) and not self._errors.take(now):
            raise CloseConnection(messages.CLOSE_POLICY_VIOLATION, f"{kind} rate limit exceeded")

    def excuse(self, held: float) -> None:
        """A resume held the client's messages back for `held` seconds: what it sent
        meanwhile within the rate is parsed at once now. Allowed beyond the burst, for a
        moment (HELD_ALLOWANCE_FOR): the client is charged for its own pace, not for the
        server's wait; a flood meanwhile still goes past it."""
        now = self._clock()
        left = self._held_allowance if now <= self._held_allowance_until else 0.0
        self._held_allowance = left + held * self._rate
        self._held_allowance_until = now + HELD_ALLOWANCE_FOR

    def _take_message(self, now: float) -> bool:
        """Spend a message of the rate, or of the allowance a resume's hold left."""
        if self._messages.take(now):
            return True
        if self._held_allowance >= 1 and now <= self._held_allowance_until:
            self._held_allowance -= 1
            return True
        return False

    async def _resume(self, channel: str, since: int) -> None:
        now = self._clock()
        # Looked up for each resume, not kept for the connection's life: the hub forgets a
        # refilled budget as other addresses come, and hands the address's next connection a new
        # one; a kept one would then be a second budget for the same address.
        budget = self.hub.history_budget(self.client.address, now)
        reading = replay.Reading(may_read=budget.available(now))
        # Charged before reading, the unread part refunded after: resumes from Redis await
        # the network, and those of the address in flight at once must each see what the
        # others are reading, or all would pass the check before any was charged.
        reserved = replay.most_read(self.hub, since) if reading.may_read else 0
        budget.spend(reserved, now)
        try:
            resume = await replay.resume(self.hub, self.client, channel, since, reading=reading)
        except ClientError as problem:  # raised before anything changed
            self._refuse(problem)
            return
        finally:  # cancelled too (the connection closed): it pays for what it read
            self.hub.refund_history(
                self.client.address, budget, amount=reserved - reading.scanned, now=self._clock()
            )
        # The ack separates the replay from the live events held back meanwhile.
        self._reply(
            messages.subscribed(
                channel,
                self.hub.now_ms(),
                seq=resume.seq,
                recovered=resume.recovered,
                replayed=resume.replayed,
            )
        )
        replay.go_live(self.hub, self.client)

    def _refuse(self, problem: ClientError, *, flood: bool = False) -> None:
        self.hub.metrics.client_errors.labels(code=problem.code).inc()
        self._reply(messages.error(problem, self.hub.now_ms()))
        if not self._errors.take(self._clock()):
            reason = "message rate limit exceeded" if flood else "too many invalid messages"
            raise CloseConnection(messages.CLOSE_POLICY_VIOLATION, reason)

    def _reply(self, payload: bytes) -> None:
        if self.client.is_open():
            self.client.write(messages.text_frame(payload))
