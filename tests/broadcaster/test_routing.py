"""Routing: exact channels, prefix patterns and globs, each subscriber once per event."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broadcaster.routing import Registry, kind_of, matcher
from shared.channels import pattern_matches

BET = ("events:bet_placed", "market:0x31d2bc49a6fd4a066f5f8ac61acd0e6c9105dd84")


def recipients(registry: Registry[str], channels: tuple[str, ...]) -> dict[str, str]:
    """Subscriber -> the channel it is served on (the first group naming it)."""
    served: dict[str, str] = {}
    for channel, subscribers in registry.route(channels):
        for subscriber in subscribers:
            served.setdefault(subscriber, channel)
    return served


@pytest.mark.parametrize(
    ("subscription", "kind"),
    [
        ("events:bet_placed", "exact"),
        ("events:*", "prefix"),
        ("*", "prefix"),
        ("market:0xab**", "prefix"),
        ("events:*_placed", "glob"),
        ("events:bet_?laced", "glob"),
        ("market:0x*ab*", "glob"),
    ],
)
def test_kinds(subscription: str, kind: str) -> None:
    """Subscriptions are classified as exact, prefix (one trailing *) or other glob."""
    assert kind_of(subscription) == kind


def test_route_exact_prefix_and_glob() -> None:
    """Every kind of subscription that matches gets the event, on its first matching channel."""
    registry: Registry[str] = Registry()
    registry.add("events:*", "all-events")
    registry.add("*", "everything")
    registry.add(BET[1], "market")
    registry.add("market:0x31d2*", "market-prefix")
    registry.add("events:*_placed", "glob")
    registry.add("events:market_created", "other")
    registry.add("market:0x7*", "other-prefix")
    assert recipients(registry, BET) == {
        "all-events": BET[0],
        "everything": BET[0],
        "market": BET[1],
        "market-prefix": BET[1],
        "glob": BET[0],
    }


def test_subscriber_with_several_matches_is_served_on_the_first_channel() -> None:
    """One subscriber matching both channels is listed under each, first one first."""
    registry: Registry[str] = Registry()
    registry.add(BET[1], "a")
    registry.add("events:*", "a")
    groups = registry.route(BET)
    assert [channel for channel, subs in groups if "a" in subs] == [BET[0], BET[1]]
    assert recipients(registry, BET) == {"a": BET[0]}


def test_remove_cleans_up() -> None:
    """Removing the last subscriber of a channel, prefix or glob removes it from routing."""
    registry: Registry[str] = Registry()
    for subscription in ("events:*", BET[1], "events:*_placed", "market:0x31*"):
        registry.add(subscription, "x")
        registry.remove(subscription, "x")
    registry.remove("events:never", "x")
    assert registry.route(BET) == []
    assert registry.glob_count == 0


def fresh(text: str) -> str:
    """An equal string that is another object (as each client's message parses to)."""
    return "".join(list(text))


@pytest.mark.parametrize("subscription", [BET[1], "events:*", "events:*_placed"])
def test_subscribers_of_one_subscription_share_one_name(subscription: str) -> None:
    """add() answers the name routing holds for a subscription, for its subscriber to keep:
    one string object for all the subscribers of a channel or pattern, however many bring
    copies of it. Once the last has left, routing keeps it no more: the next subscriber's
    own string is the name."""
    registry: Registry[str] = Registry()
    first = fresh(subscription)
    assert registry.add(first, "a") is first
    assert registry.add(fresh(subscription), "b") is first
    registry.remove(fresh(subscription), "a")
    assert registry.add(fresh(subscription), "c") is first
    registry.remove(fresh(subscription), "b")
    registry.remove(fresh(subscription), "c")
    later = fresh(subscription)
    assert registry.add(later, "d") is later


def test_distinct_globs_are_counted_once() -> None:
    """Many subscribers on one glob cost one match per event."""
    registry: Registry[int] = Registry()
    for subscriber in range(100):
        registry.add("events:*_placed", subscriber)
    assert registry.glob_count == 1
    groups = registry.route(BET)
    assert len(groups) == 1
    assert len(groups[0][1]) == 100


channel_names = st.one_of(
    st.from_regex(r"events:[a-z_]{1,12}", fullmatch=True),
    st.from_regex(r"market:0x[0-9a-f]{40}", fullmatch=True),
)
subscriptions = st.one_of(
    channel_names,
    st.from_regex(r"events:[a-z_*?]{0,8}\*", fullmatch=True),
    st.from_regex(r"(events|market):[a-z0-9_*?]{0,10}", fullmatch=True),
    st.just("*"),
)


@given(subscription=subscriptions, channel=channel_names)
def test_routing_agrees_with_the_reference_glob(subscription: str, channel: str) -> None:
    """Registry routing and matcher() agree with shared.channels.pattern_matches."""
    registry: Registry[str] = Registry()
    registry.add(subscription, "s")
    expected = pattern_matches(subscription, channel)
    assert bool(recipients(registry, (channel,))) == expected
    assert matcher(subscription)(channel) == expected
