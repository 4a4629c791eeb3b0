"""Per-client limits: token buckets, connections per IP, the real client IP."""

from __future__ import annotations

from ipaddress import ip_network

from broadcaster.limits import (
    FILES_RESERVED,
    AddressBudgets,
    ConnectionCounter,
    TokenBucket,
    client_ip,
    connection_ceiling,
    per_ip_key,
)

LOCAL = (ip_network("127.0.0.1"), ip_network("::1"))


def test_token_bucket_allows_burst_then_rate() -> None:
    """A burst passes at once, then one action per 1/rate seconds."""
    bucket = TokenBucket(rate=2, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)
    assert bucket.take(0.5)
    assert bucket.take(100.0)  # refills up to the burst only
    assert [bucket.take(100.0) for _ in range(3)] == [True, True, False]


def test_address_budgets_are_shared_by_an_address_connections() -> None:
    """An address's budget is the same bucket each time it is looked up, so that all its
    connections draw on one allowance."""
    budgets = AddressBudgets(rate=1.0, burst=10.0)
    spent = budgets.of("spender", 0.0)
    spent.spend(1000, 0.0)  # a resume reads past the balance: it goes below zero
    assert budgets.of("spender", 1.0) is spent
    assert not budgets.of("spender", 1.0).available(1.0)


def test_a_refilled_address_budget_is_dropped_and_a_new_connection_gets_a_full_one() -> None:
    """Once an address's budget has refilled, it is forgotten as new addresses come (it would
    change nothing), and the address's next connection gets a full one."""
    budgets = AddressBudgets(rate=1.0, burst=10.0)
    budgets.of("spender", 0.0).spend(5, 0.0)  # full again at 5.0
    budgets.of("other", 4.0).spend(10, 4.0)  # full again at 14.0
    budgets.of("newcomer", 6.0).spend(1, 6.0)
    assert len(budgets) == 2  # "other" and "newcomer"
    again = budgets.of("spender", 6.0)
    assert again.full(6.0)
    assert [again.take(6.0) for _ in range(11)] == [True] * 10 + [False]


def test_a_spent_address_budget_is_never_forgotten_before_it_refills() -> None:
    """However many addresses come meanwhile, a budget spent is kept until it has refilled,
    also one spent again after it was first due to be full: a reconnect never finds a fresh
    budget early."""
    budgets = AddressBudgets(rate=1.0, burst=10.0, max_held=100)
    budgets.of("spender", 0.0).spend(10, 0.0)  # full again at 10.0
    budgets.of("spender", 9.0).spend(10, 9.0)  # 9 back, 10 spent: full again at 20.0
    now = 9.0
    for index in range(1000):  # each refilled 1 s after it came, most of them forgotten
        now += 0.01
        budgets.of(f"passer-{index}", now).spend(1, now)
    assert 10.0 < now < 20.0
    spender = budgets.of("spender", now)
    assert not spender.full(now)  # about 9 tokens: the same bucket, not a new one
    assert spender.available(now)
    spender.spend(9, now)
    assert not budgets.of("spender", now).available(now)


def test_addresses_past_the_cap_share_the_overflow_budget() -> None:
    """While `max_held` addresses hold budgets that have not refilled, each further address
    draws on one shared overflow budget: limited together, never unlimited; once some of the
    held ones have refilled, new addresses get budgets of their own again."""
    budgets = AddressBudgets(rate=1.0, burst=10.0, max_held=3)
    for index in range(3):
        budgets.of(f"held-{index}", 0.0).spend(5, 0.0)  # full again at 5.0
    first, second = budgets.of("late-1", 1.0), budgets.of("late-2", 1.0)
    assert first is second
    assert [first.take(1.0) for _ in range(10)] == [True] * 10
    assert not budgets.of("late-3", 1.0).available(1.0)
    assert len(budgets) == 3
    own = budgets.of("late-4", 6.0)
    assert own is not first
    assert own.full(6.0)


def test_a_budget_a_refund_makes_full_again_gives_up_its_place_at_once() -> None:
    """A budget full again because a resume read less than it reserved stops counting
    against `max_held` then, not at the time it would have refilled without the refund: a
    new address gets a budget of its own meanwhile, not the shared overflow one. Spent again
    before a new address comes, it is kept until it refills, as any other."""
    budgets = AddressBudgets(rate=10_000 / 60, burst=40_000, max_held=1)
    held = budgets.of("A", 0.0)
    held.spend(10_000, 0.0)  # a resume reserves 10,000: full again at 60.0 if nothing comes back
    overflow = budgets.of("B", 0.1)
    budgets.refund("A", held, amount=10_000, now=0.2)  # it read nothing
    assert held.full(0.3)
    own = budgets.of("C", 0.3)
    assert own is not overflow
    assert own.full(0.3)
    assert len(budgets) == 1

    budgets = AddressBudgets(rate=10_000 / 60, burst=40_000, max_held=1)
    held = budgets.of("A", 0.0)
    held.spend(10_000, 0.0)
    budgets.refund("A", held, amount=10_000, now=0.2)
    held.spend(20_000, 0.3)  # full again at 120.3
    assert budgets.of("B", 0.4) is budgets.of("C", 0.4)  # both the overflow budget
    assert budgets.of("A", 0.4) is held


def test_the_addresses_held_stay_bounded() -> None:
    """Clients cycling through many addresses (IPv6 makes them cheap), each spending part of
    a budget that takes a minute to refill, leave at most `max_held` budgets held."""
    budgets = AddressBudgets(rate=1.0, burst=60.0, max_held=500)
    most = 0
    for index in range(5000):
        now = index * 0.01  # 100 new addresses a second: 6,000 would be unrefilled at once
        budgets.of(f"2001:db8:{index:x}::/64", now).spend(30, now)
        most = max(most, len(budgets))
    assert most == 500


def test_connection_counter() -> None:
    """At most `limit` slots per IP; releasing frees one."""
    counter = ConnectionCounter(2)
    assert counter.acquire("a")
    assert counter.acquire("a")
    assert not counter.acquire("a")
    assert counter.acquire("b")
    counter.release("a")
    assert counter.acquire("a")
    counter.release("b")
    assert counter.count("b") == 0


def test_connection_ceiling_leaves_open_files_for_the_process() -> None:
    """WS_MAX_CONNECTIONS is lowered to keep FILES_RESERVED descriptors free; an unlimited
    soft limit (RLIM_INFINITY, -1) lowers nothing; there is always room for one client."""
    assert connection_ceiling(20_000, 1_048_576) == 20_000
    assert connection_ceiling(20_000, 1024) == 1024 - FILES_RESERVED
    assert connection_ceiling(20_000, -1) == 20_000
    assert connection_ceiling(20_000, FILES_RESERVED) == 1


def test_headers_ignored_from_untrusted_peer() -> None:
    """A client that connects directly cannot claim another address."""
    assert (
        client_ip("203.0.113.9", forwarded_for=["1.2.3.4"], real_ip="5.6.7.8", trusted=LOCAL)
        == "203.0.113.9"
    )


def test_forwarded_for_read_from_the_right() -> None:
    """Behind the local Nginx, the last untrusted hop is the client; spoofed hops are ignored."""
    assert (
        client_ip("127.0.0.1", forwarded_for=["6.6.6.6, 203.0.113.9"], real_ip=None, trusted=LOCAL)
        == "203.0.113.9"
    )
    assert (
        client_ip(
            "127.0.0.1", forwarded_for=["203.0.113.9, 127.0.0.1"], real_ip=None, trusted=LOCAL
        )
        == "203.0.113.9"
    )


def test_real_ip_fallback_and_peer_fallback() -> None:
    """X-Real-IP is used without X-Forwarded-For; with neither, the proxy itself is the client."""
    assert client_ip("::1", forwarded_for=[], real_ip="2001:db8::1", trusted=LOCAL) == "2001:db8::1"
    assert (
        client_ip("127.0.0.1", forwarded_for=["garbage"], real_ip="bad", trusted=LOCAL)
        == "127.0.0.1"
    )
    assert (
        client_ip("::ffff:127.0.0.1", forwarded_for=["198.51.100.2"], real_ip=None, trusted=LOCAL)
        == "198.51.100.2"
    )


def test_nothing_trusted() -> None:
    """With no trusted proxies, headers are never believed."""
    assert (
        client_ip("127.0.0.1", forwarded_for=["1.2.3.4"], real_ip="1.2.3.4", trusted=())
        == "127.0.0.1"
    )


def test_ipv6_clients_are_counted_by_their_64() -> None:
    """An IPv6 client has a whole /64 to connect from: the per-IP limit counts the /64, and an
    IPv4 address as itself."""
    assert per_ip_key("2001:db8:1:2::1") == per_ip_key("2001:db8:1:2:ffff::9")
    assert per_ip_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert per_ip_key("2001:db8:1:3::1") != per_ip_key("2001:db8:1:2::1")
    assert per_ip_key("203.0.113.9") == "203.0.113.9"
    assert per_ip_key("local") == "local"
