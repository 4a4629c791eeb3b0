"""Which subscriptions a connection may add: WS_MAX_SUBSCRIPTIONS per connection, and the
wildcard patterns (compiled, so dearer than channels) per client address and server-wide."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from broadcaster.errors import ClientError
from broadcaster.limits import AddressBudgets, PatternShares
from broadcaster.routing import Registry, kind_of

__all__ = ["Admission"]

# Wildcard patterns no subscription holds yet, which subscribing compiles (some 0.6 ms for a
# long one, against microseconds for a message), per client address: a burst as large as the
# default WS_MAX_GLOB_PATTERNS_PER_IP, then one a second. Churning distinct patterns
# (subscribe, unsubscribe, the next) would otherwise cost the server a compile per message.
NEW_GLOBS_BURST = 16.0
NEW_GLOBS_PER_SECOND = 1.0
# Of the WS_MAX_GLOB_PATTERNS distinct wildcard patterns all clients may hold, one client
# address may bring at most one in this many (at least one) that no one held before: with
# WS_MAX_GLOB_PATTERNS_PER_IP (subscriptions) alone, 16 addresses at 16 each took the whole
# pool and no one else could subscribe to a new pattern. One already held costs no share.
GLOB_POOL_SHARES = 64


class Admission:
    """The subscription limits, over the routing they guard (`registry`: which patterns are
    held). The hub counts each glob subscription in (before routing it) and out (after)."""

    def __init__(
        self,
        registry: Registry[Any],
        *,
        max_subscriptions: int,
        max_glob_patterns: int,
        max_glob_patterns_per_ip: int,
    ) -> None:
        self._registry = registry
        self._max_subscriptions = max_subscriptions
        self._max_globs = max_glob_patterns
        self._max_globs_per_address = max_glob_patterns_per_ip
        self._globs_by_address: dict[str, int] = {}  # glob subscriptions held per address
        self._glob_shares = PatternShares(max(1, max_glob_patterns // GLOB_POOL_SHARES))
        self._new_glob_budgets = AddressBudgets(NEW_GLOBS_PER_SECOND, NEW_GLOBS_BURST)

    def check(self, subs: Collection[str], address: str, channel: str) -> None:
        """Refuse (ClientError) `channel` as a new subscription of a connection holding `subs`
        from client `address`, past the limits; one it holds already passes."""
        if channel in subs:
            return
        if len(subs) >= self._max_subscriptions:
            raise ClientError(
                "too_many_subscriptions",
                f"at most {self._max_subscriptions} subscriptions per connection",
                channel=channel,
            )
        if kind_of(channel) != "glob":
            return
        if self._globs_by_address.get(address, 0) >= self._max_globs_per_address:
            raise ClientError(
                "too_many_patterns",
                f"at most {self._max_globs_per_address} wildcard patterns other than a "
                "trailing * per client address; subscribe to a channel or a pattern ending "
                "in * such as events:*",
                channel=channel,
            )
        if self._registry.has_glob(channel):
            return  # compiled already: routing it costs no more than a channel
        if self._registry.glob_count >= self._max_globs:
            raise ClientError(
                "too_many_patterns",
                "the server holds too many distinct wildcard patterns; subscribe to a channel "
                "or a pattern ending in * such as events:*",
                channel=channel,
            )
        if not self._glob_shares.may_bring(address):
            raise ClientError(
                "too_many_patterns",
                f"this client address brought {self._glob_shares.share} wildcard patterns "
                "other than a trailing * still in use, the most it may; subscribe to a "
                "channel or a pattern ending in * such as events:*",
                channel=channel,
            )
        now = time.monotonic()
        if not self._new_glob_budgets.of(address, now).take(now):
            raise ClientError(
                "rate_limited",
                f"more than {NEW_GLOBS_PER_SECOND:g} new wildcard patterns per second per "
                "client address",
                channel=channel,
            )

    def count_glob(self, address: str, channel: str, delta: int) -> None:
        """Count a glob subscription added (before it is routed) or removed (after): whether
        routing holds the pattern then says whether it enters or leaves the pool."""
        held = self._globs_by_address.get(address, 0) + delta
        if held:
            self._globs_by_address[address] = held
        else:
            del self._globs_by_address[address]
        if not self._registry.has_glob(channel):
            if delta > 0:
                self._glob_shares.bring(channel, address)
            else:
                self._glob_shares.leave(channel)
