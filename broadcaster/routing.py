"""Which subscribers want an event: exact channels, prefix patterns and other globs.

Subscriptions come in normal form from shared.channels.validate_channel (lowercase market
addresses; event names are lowercase by rule), and so do event channels, so plain dict
lookups match case-insensitively. Per event channel the cost is one dict lookup for exact
subscriptions, one per distinct prefix length for patterns ending in a single `*` (`events:*`,
`market:0xab*`, `*`: the frontend's kind), and one match per distinct other glob
(`events:*_placed`, `market:0x??...`) — never one per subscriber, so events cost nothing for
clients they do not concern. Other globs are few by rule (WS_MAX_GLOB_PATTERNS).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, Literal, TypeVar

from shared.channels import compile_pattern, is_pattern

__all__ = ["Registry", "kind_of", "matcher", "matches"]

S = TypeVar("S", bound=Hashable)
Kind = Literal["exact", "prefix", "glob"]
_STARS = re.compile(r"\*+")


@functools.lru_cache(maxsize=4096)  # every (un)subscribe asks: most ask about the same few
def kind_of(subscription: str) -> Kind:
    """Classify a normalized subscription by how it is matched."""
    if not is_pattern(subscription):
        return "exact"
    collapsed = _STARS.sub("*", subscription)
    if collapsed.endswith("*") and "*" not in collapsed[:-1] and "?" not in collapsed:
        return "prefix"
    return "glob"


@functools.lru_cache(maxsize=1024)  # a resume asks for its connection's globs each time
def _glob_matcher(subscription: str) -> Callable[[str], bool]:
    return compile_pattern(subscription)


def matcher(subscription: str) -> Callable[[str], bool]:
    """A fast predicate telling whether a normalized channel matches a normalized subscription."""
    kind = kind_of(subscription)
    if kind == "exact":
        return subscription.__eq__
    if kind == "prefix":
        prefix = _STARS.sub("*", subscription)[:-1]
        return lambda channel: channel.startswith(prefix)
    return _glob_matcher(subscription)


def matches(subscription: str, channel: str) -> bool:
    """Whether a normalized subscription matches one normalized channel."""
    return matcher(subscription)(channel)


class _Subscribers(set[S]):
    """The subscribers of one subscription, and its name: the string of it its first
    subscriber brought, which every later one is given to keep (Registry.add)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class Registry(Generic[S]):
    """Subscriptions by channel or pattern; route() answers who gets an event."""

    def __init__(self) -> None:
        self._exact: dict[str, _Subscribers[S]] = {}
        self._prefixes: dict[str, _Subscribers[S]] = {}
        self._prefix_lengths: Counter[int] = Counter()
        self._lengths: tuple[int, ...] = ()
        self._globs: dict[str, tuple[Callable[[str], bool], _Subscribers[S]]] = {}

    @property
    def glob_count(self) -> int:
        """Distinct globs that are not a prefix pattern (each costs a match per event)."""
        return len(self._globs)

    def has_glob(self, subscription: str) -> bool:
        return subscription in self._globs

    def add(self, subscription: str, subscriber: S) -> str:
        """Route subscription to subscriber; return the subscription's name for the
        subscriber to keep in its place: one string for all its subscribers (10,000
        connections on one market hold one copy of its name, not one each), which routing
        keeps no longer than the last of them (it goes with their set)."""
        kind = kind_of(subscription)
        if kind == "exact":
            subscribers = self._exact.get(subscription)
            if subscribers is None:
                subscribers = self._exact[subscription] = _Subscribers(subscription)
        elif kind == "prefix":
            # Subscriptions come in normal form: one prefix is one pattern's (runs of *
            # collapsed), so its subscribers are that pattern's.
            prefix = _STARS.sub("*", subscription)[:-1]
            subscribers = self._prefixes.get(prefix)
            if subscribers is None:
                subscribers = self._prefixes[prefix] = _Subscribers(subscription)
                self._prefix_lengths[len(prefix)] += 1
                self._lengths = tuple(sorted(self._prefix_lengths))
        else:
            entry = self._globs.get(subscription)
            if entry is None:
                compiled = _glob_matcher(subscription)
                entry = self._globs[subscription] = (compiled, _Subscribers(subscription))
            subscribers = entry[1]
        subscribers.add(subscriber)
        return subscribers.name

    def remove(self, subscription: str, subscriber: S) -> None:
        kind = kind_of(subscription)
        if kind == "exact":
            _discard(self._exact, subscription, subscriber)
        elif kind == "prefix":
            prefix = _STARS.sub("*", subscription)[:-1]
            if _discard(self._prefixes, prefix, subscriber):
                self._prefix_lengths[len(prefix)] -= 1
                if not self._prefix_lengths[len(prefix)]:
                    del self._prefix_lengths[len(prefix)]
                self._lengths = tuple(sorted(self._prefix_lengths))
        else:
            entry = self._globs.get(subscription)
            if entry is not None:
                entry[1].discard(subscriber)
                if not entry[1]:
                    del self._globs[subscription]

    def route(self, channels: Iterable[str]) -> list[tuple[str, set[S]]]:
        """Return (channel, subscribers) groups in channel order; a subscriber may recur.

        The caller delivers once per subscriber, taking the first group that names it, so the
        channel it sees is the first of the event's channels that it subscribed to.
        """
        groups: list[tuple[str, set[S]]] = []
        exact, prefixes, lengths, globs = self._exact, self._prefixes, self._lengths, self._globs
        for channel in channels:
            found = exact.get(channel)
            if found:
                groups.append((channel, found))
            for length in lengths:
                if length > len(channel):
                    break
                found = prefixes.get(channel[:length])
                if found:
                    groups.append((channel, found))
            for matcher, subscribers in globs.values():
                if matcher(channel):
                    groups.append((channel, subscribers))
        return groups


def _discard(table: dict[str, _Subscribers[S]], key: str, subscriber: S) -> bool:
    """Remove subscriber under key; return True when that emptied and removed the key."""
    subscribers = table.get(key)
    if subscribers is None:
        return False
    subscribers.discard(subscriber)
    if subscribers:
        return False
    del table[key]
    return True
