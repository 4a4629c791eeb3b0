"""Tests of shared.channels: naming, routing, subscription validation and glob matching."""

from __future__ import annotations

import functools
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.channels import (
    MAX_CHANNEL_LENGTH,
    channels_for,
    compile_pattern,
    event_channel,
    is_pattern,
    market_channel,
    pattern_matches,
    snake_case,
    validate_channel,
)
from shared.envelope import ContractKind
from shared.errors import ChannelError

MARKET = "0xAbCdEf0123456789aBcDeF0123456789AbCdEf01"
MARKET_LOWER = MARKET.lower()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("MarketCreated", "market_created"),
        ("BetPlaced", "bet_placed"),
        ("DisputeBondTransferFailed", "dispute_bond_transfer_failed"),
        ("Transfer", "transfer"),
        ("NFTMinted", "nft_minted"),
        ("RewardsClaimedV2", "rewards_claimed_v2"),
        ("already_snake", "already_snake"),
    ],
)
def test_snake_case(name: str, expected: str) -> None:
    """PascalCase event names become snake_case, acronyms kept together."""
    assert snake_case(name) == expected


def test_event_and_market_channels() -> None:
    """event_channel prefixes events:, market_channel prefixes market: and lowercases."""
    assert event_channel("BetPlaced") == "events:bet_placed"
    assert market_channel(MARKET) == f"market:{MARKET_LOWER}"


def test_market_channel_rejects_non_addresses() -> None:
    """market_channel raises ChannelError for something that is not an address."""
    with pytest.raises(ChannelError, match="market address"):
        market_channel("0x1234")


@pytest.mark.parametrize(
    ("event", "kind", "market", "expected"),
    [
        ("BetPlaced", "market", MARKET, ("events:bet_placed", f"market:{MARKET_LOWER}")),
        ("MarketCreated", "factory", None, ("events:market_created",)),
        (
            "MarketApproved",
            "factory",
            MARKET,
            ("events:market_approved", "events:proposal_approved", f"market:{MARKET_LOWER}"),
        ),
        ("MarketApproved", "factory", None, ("events:market_approved", "events:proposal_approved")),
        ("MarketApproved", "market", None, ("events:market_approved",)),
        ("ProposalApproved", "factory", None, ("events:proposal_approved",)),
        ("RewardsClaimed", "reward_distributor", None, ("events:rewards_claimed",)),
    ],
)
def test_channels_for(
    event: str, kind: ContractKind, market: str | None, expected: tuple[str, ...]
) -> None:
    """Events go to events:<name>, approvals also to proposal_approved, markets to market:."""
    assert channels_for(event, kind, market) == expected


@pytest.mark.parametrize(
    ("channel", "normalized"),
    [
        ("*", "*"),
        ("events:bet_placed", "events:bet_placed"),
        ("events:*", "events:*"),
        ("events:bet_*", "events:bet_*"),
        ("events:market_?reated", "events:market_?reated"),
        (f"market:{MARKET}", f"market:{MARKET_LOWER}"),
        ("market:*", "market:*"),
        ("market:0xAB*", "market:0xab*"),
        ("market:0x*", "market:0x*"),
        ("market:0*", "market:0*"),
        ("market:*ef01", "market:*ef01"),
        ("market:0x" + "?" * 40, "market:0x" + "?" * 40),
        ("**", "*"),
        ("events:**", "events:*"),
        ("events:bet_**_x***", "events:bet_*_x*"),
        ("market:0xAB**", "market:0xab*"),
    ],
)
def test_validate_channel_accepts(channel: str, normalized: str) -> None:
    """Valid channels and patterns are accepted, market addresses lowercased."""
    assert validate_channel(channel) == normalized


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        (None, "must be a string"),
        (42, "must be a string"),
        (b"events:bet_placed", "must be a string"),
        ("", "must not be empty"),
        ("events:" + "a" * MAX_CHANNEL_LENGTH, "longer than 128"),
        ("events:bet placed", "may only contain"),
        ("events:bet_placed\n", "may only contain"),
        ("events:[ab]", "may only contain"),
        ("events:é", "may only contain"),
        ("bet_placed", "must start with"),
        ("EVENTS:bet_placed", "must start with"),
        ("ev*", "must start with"),
        ("events:", "snake_case"),
        ("events:BetPlaced", "snake_case"),
        ("events:bet.placed", "snake_case"),
        ("market:", "market:<0x address"),
        ("market:0x1234", "market:<0x address"),
        ("market:" + MARKET + "0", "market:<0x address"),
        ("market:0xzz*", "market:<0x address"),
        ("market:ab*", "market:<0x address"),
        ("market:x*", "market:<0x address"),
        ("market:0x" + "a" * 41 + "*", "market:<0x address"),
    ],
)
def test_validate_channel_rejects(channel: object, message: str) -> None:
    """Malformed subscriptions fail with a ChannelError that explains the rule."""
    with pytest.raises(ChannelError, match=message):
        validate_channel(channel)


def test_channel_error_does_not_echo_input() -> None:
    """The ChannelError message does not repeat what the client sent."""
    with pytest.raises(ChannelError) as caught:
        validate_channel("market:<script>")
    assert "script" not in str(caught.value)


@pytest.mark.parametrize(
    ("channel", "expected"),
    [("events:*", True), ("market:0x?", True), ("events:bet_placed", False), ("*", True)],
)
def test_is_pattern(channel: str, expected: bool) -> None:
    """A subscription is a pattern when it contains * or ?."""
    assert is_pattern(channel) is expected


@pytest.mark.parametrize(
    ("pattern", "channel", "expected"),
    [
        ("*", "events:bet_placed", True),
        ("*", "", True),
        ("events:*", "events:bet_placed", True),
        ("events:*", "events:", True),
        ("events:*", f"market:{MARKET_LOWER}", False),
        ("events:bet_*", "events:bet_placed", True),
        ("events:bet_*", "events:market_created", False),
        ("market:0xab*", f"market:{MARKET_LOWER}", True),
        ("market:0xAB*", f"market:{MARKET_LOWER}", True),
        ("market:0xab*", f"market:{MARKET}", True),
        ("market:0xac*", f"market:{MARKET_LOWER}", False),
        ("market:*ef01", f"market:{MARKET_LOWER}", True),
        ("events:bet_place?", "events:bet_placed", True),
        ("events:bet_place?", "events:bet_place", False),
        ("events:bet_place?", "events:bet_placedd", False),
        ("events:?et_*d", "events:bet_placed", True),
        ("events:*_*_*", "events:dispute_bond_transfer_failed", True),
        ("events:*_*_*", "events:bet_placed", False),
        ("a.c", "abc", False),
        ("a.c", "a.c", True),
        ("a+", "aa", False),
        ("a[b]c", "abc", False),
        ("a[b]c", "a[b]c", True),
        ("(a|b)", "a", False),
        ("^a$", "^a$", True),
        ("a\\*", "a\\bc", True),
        ("events:bet_placed", "events:bet_placed", True),
        ("events:bet_placed", "events:bet_placed_x", False),
    ],
)
def test_pattern_matches(pattern: str, channel: str, expected: bool) -> None:
    """* matches any run, ? one character, everything else (. [ ] regex syntax) literally."""
    assert pattern_matches(pattern, channel) is expected


def test_compile_pattern_is_cached() -> None:
    """Compiling the same pattern twice returns the same matcher."""
    assert compile_pattern("events:*") is compile_pattern("events:*")


def test_hostile_pattern_is_fast() -> None:
    """A pattern built to backtrack exponentially fails quickly on a long channel.

    The bound is no speed goal: the linear match takes microseconds, while a backtracking
    one does not end (without the atomic groups, "*a" * 4 + "*b" already takes a second,
    and each star more multiplies that), so 10 s leaves a loaded machine all the room."""
    matcher = compile_pattern("*a" * 30 + "*b")
    started = time.perf_counter()
    assert not matcher("a" * MAX_CHANNEL_LENGTH)
    assert time.perf_counter() - started < 10


@functools.cache
def reference_match(pattern: str, channel: str) -> bool:
    """Match a glob by plain recursion: slow but obviously right."""
    if not pattern:
        return not channel
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        return reference_match(rest, channel) or (
            bool(channel) and reference_match(pattern, channel[1:])
        )
    if not channel:
        return False
    return (head == "?" or head == channel[0]) and reference_match(rest, channel[1:])


GLOB_TEXT = st.text(alphabet="ab*?.[]\\:xX", max_size=12)


@given(pattern=GLOB_TEXT, channel=st.text(alphabet="abAB.[]\\:x*?", max_size=12))
def test_compile_pattern_agrees_with_reference(pattern: str, channel: str) -> None:
    """compile_pattern gives the same answer as a naive recursive glob matcher."""
    expected = reference_match(pattern.lower(), channel.lower())
    assert compile_pattern(pattern)(channel) is expected


@given(channel=st.one_of(st.text(max_size=200), st.binary(max_size=20), st.integers(), st.none()))
def test_validate_channel_only_raises_channel_error(channel: object) -> None:
    """On arbitrary input validate_channel returns a str or raises ChannelError, nothing else."""
    try:
        result = validate_channel(channel)
    except ChannelError:
        return
    assert isinstance(result, str)
    assert validate_channel(result) == result
