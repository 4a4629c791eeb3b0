"""Channel names that events are published on, and the patterns browsers may subscribe with."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from shared.envelope import ContractKind
from shared.errors import ChannelError
from shared.evm import is_address, normalize_address

__all__ = [
    "EVENTS_PREFIX",
    "MARKET_PREFIX",
    "MAX_CHANNEL_LENGTH",
    "channels_for",
    "compile_pattern",
    "event_channel",
    "is_pattern",
    "market_channel",
    "pattern_matches",
    "snake_case",
    "validate_channel",
]

EVENTS_PREFIX = "events:"
MARKET_PREFIX = "market:"
MAX_CHANNEL_LENGTH = 128
# The frontend listens for approvals on this name, while the factory emits MarketApproved.
PROPOSAL_APPROVED_CHANNEL = EVENTS_PREFIX + "proposal_approved"

_ALLOWED = re.compile(r"[A-Za-z0-9_:*?.-]+")
_STAR_RUNS = re.compile(r"\*{2,}")
_EVENT_SUFFIX = re.compile(r"[a-z0-9_*?]+")
_ADDRESS_GLOB = re.compile(r"[0-9a-fx*?]{1,42}")
# The literal text before a market glob's first wildcard must be a prefix of "0x<hex>".
_ADDRESS_GLOB_HEAD = re.compile(r"(?:0(?:x[0-9a-f]*)?)?")
_ACRONYM_BOUNDARY = re.compile(r"([A-Z]+)([A-Z][a-z])")
_WORD_BOUNDARY = re.compile(r"([a-z0-9])([A-Z])")


def snake_case(event_name: str) -> str:
    """Return the snake_case form of a PascalCase event name: BetPlaced -> bet_placed."""
    spaced = _WORD_BOUNDARY.sub(r"\1_\2", _ACRONYM_BOUNDARY.sub(r"\1_\2", event_name))
    return spaced.lower()


# Cached: a few dozen event names, asked for on every event the indexer publishes.
@functools.lru_cache(maxsize=1024)
def event_channel(event_name: str) -> str:
    """Return the channel every event of this name is published on: events:<snake_case>."""
    return EVENTS_PREFIX + snake_case(event_name)


# Not cached: the indexer, which publishes every market event, appends MARKET_PREFIX to the
# address it decoded itself (indexer/batch.py), and the broadcaster asks only for a stream
# entry without channels. A cache keyed by market evicted on nearly every event of a
# catch-up over more markets than it held.
def market_channel(address: str) -> str:
    """Return the channel of one market: market:<lowercase address>; raise ChannelError."""
    try:
        return MARKET_PREFIX + normalize_address(address)
    except ValueError as exc:
        raise ChannelError(f"market address: {exc}") from None


def channels_for(
    event_name: str, contract_kind: ContractKind, market_address: str | None
) -> tuple[str, ...]:
    """Return, in a fixed order and without duplicates, every channel an event goes to."""
    channels = [event_channel(event_name)]
    if contract_kind == "factory" and event_name == "MarketApproved":
        channels.append(PROPOSAL_APPROVED_CHANNEL)
    if market_address is not None:
        channels.append(market_channel(market_address))
    return tuple(dict.fromkeys(channels))


def is_pattern(channel: str) -> bool:
    """Return whether a subscription is a glob pattern rather than one channel."""
    return "*" in channel or "?" in channel


def validate_channel(channel: object) -> str:
    """Return a browser's subscription in normal form (lowercase address), or raise ChannelError.

    Accepts "*" (everything), "events:<snake_case name or glob>", and "market:" followed by a
    full address or a glob over addresses such as "market:0xab*".
    """
    # Messages never echo the input: it comes from an untrusted client and goes into logs.
    if not isinstance(channel, str):
        raise ChannelError("channel must be a string")
    if not channel:
        raise ChannelError("channel must not be empty")
    if len(channel) > MAX_CHANNEL_LENGTH:
        raise ChannelError(f"channel is longer than {MAX_CHANNEL_LENGTH} characters")
    if not _ALLOWED.fullmatch(channel):
        raise ChannelError("channel may only contain letters, digits and _ : * ? . -")
    if "**" in channel:  # the same pattern: one subscription, not two sharing a route
        channel = _STAR_RUNS.sub("*", channel)
    if channel == "*":
        return channel
    if channel.startswith(EVENTS_PREFIX):
        if not _EVENT_SUFFIX.fullmatch(channel.removeprefix(EVENTS_PREFIX)):
            raise ChannelError("expected events:<snake_case event name>, e.g. events:bet_placed")
        return channel
    if channel.startswith(MARKET_PREFIX):
        target = channel.removeprefix(MARKET_PREFIX).lower()
        if is_address(target) or _is_address_glob(target):
            return MARKET_PREFIX + target
        raise ChannelError("expected market:<0x address of 40 hex digits> or a glob like 0xab*")
    raise ChannelError('channel must start with "events:" or "market:", or be "*"')


def pattern_matches(pattern: str, channel: str) -> bool:
    """Return whether channel matches a Redis-style glob (* and ? only), ignoring case."""
    return compile_pattern(pattern)(channel)


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """Return a matcher for a Redis-style glob: * is any run, ? one character, all else literal.

    Runs in O(len(pattern) * len(channel)): each middle segment between stars is matched at
    its leftmost position in an atomic group, so a hostile pattern such as "*a*a*a*a*b" cannot
    make the regex engine backtrack exponentially (Redis itself had this bug, CVE-2022-36021).
    """
    parts = [_segment_regex(s) for s in _STAR_RUNS.sub("*", pattern.lower()).split("*")]
    if len(parts) == 1:
        regex = parts[0]
    else:
        middle = "".join(f"(?>.*?{part})" for part in parts[1:-1])
        regex = f"{parts[0]}{middle}.*{parts[-1]}"
    fullmatch = re.compile(regex, re.DOTALL).fullmatch

    def matches(channel: str) -> bool:
        return fullmatch(channel.lower()) is not None

    return matches


def _segment_regex(segment: str) -> str:
    """Translate a star-free glob segment: ? is any one character, everything else literal."""
    return "".join("." if char == "?" else re.escape(char) for char in segment)


def _is_address_glob(target: str) -> bool:
    """Return whether a lowercase market: suffix is a glob that could match some address."""
    if not is_pattern(target) or not _ADDRESS_GLOB.fullmatch(target):
        return False
    literal_head = re.split(r"[*?]", target, maxsplit=1)[0]
    return _ADDRESS_GLOB_HEAD.fullmatch(literal_head) is not None
