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


def test_address_budgets_outlive_connections_until_refilled() -> None:
    """An address's budget is the same bucket for each of its connections, and is forgotten
    only once refilled (when `prune_at` addresses are held), so that memory stays bounded
    while no reconnect ever finds a fresh budget."""
    budgets = AddressBudgets(rate=1.0, burst=10.0, prune_at=100)
    spent = budgets.of("spender", 0.0)
    spent.spend(1000, 0.0)  # a resume reads past the balance: it goes below zero
    assert budgets.of("spender", 1.0) is spent
    idle = [budgets.of(f"idle-{index}", 1.0) for index in range(99)]
    assert len(budgets) == 100
    budgets.of("newcomer", 2.0)  # prunes the refilled ones first
    assert len(budgets) == 2
    assert budgets.of("spender", 2.0) is spent
    assert not spent.available(2.0)
    assert budgets.of("idle-0", 2.0) is not idle[0]  # forgotten: a new, full one
    assert budgets.of("idle-0", 2.0).full(2.0)


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
