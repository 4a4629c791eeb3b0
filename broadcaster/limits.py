"""Per-client limits as plain data: token buckets, connections per IP, the client's real IP."""

from __future__ import annotations

import functools
import heapq
import ipaddress
import math
from collections.abc import Iterable, Sequence

__all__ = [
    "AddressBudgets",
    "ConnectionCounter",
    "PatternShares",
    "TokenBucket",
    "client_ip",
    "connection_ceiling",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Open files a broadcaster keeps for itself, whatever its clients take: its Redis connections
# (reader, health monitor, 8 for resumes), listeners, metrics scrapes, the event loop's own.
FILES_RESERVED = 64
# Client addresses with a budget of their own (AddressBudgets): some 300 bytes each. Far above
# the addresses one instance serves at once in normal use (a few thousand); past it, only
# clients cycling through addresses, which share one overflow budget.
MAX_ADDRESSES = 16_384
# Stale entries AddressBudgets' heap of refill times may hold beyond one per address before
# it is built again without them.
STALE_REFILLS = 64


class TokenBucket:
    """Allows `burst` actions at once and `rate` per second on average; time is passed in."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def available(self, now: float) -> bool:
        """Whether at least one token is left (nothing is spent)."""
        self._refill(now)
        return self._tokens >= 1

    def spend(self, amount: float, now: float) -> None:
        """Spend `amount` tokens after the fact; the balance may go below zero."""
        self._refill(now)
        self._tokens -= amount

    def refund(self, amount: float, now: float) -> None:
        """Give back `amount` tokens spent ahead but not used (never above the burst)."""
        self._refill(now)
        self._tokens = min(self._burst, self._tokens + amount)

    def full(self, now: float) -> bool:
        """Whether the bucket is back to its burst (forgetting it would change nothing)."""
        self._refill(now)
        return self._tokens >= self._burst

    def full_at(self, now: float) -> float:
        """When the bucket will be back to its burst if nothing more is spent (`now` if it
        is; infinity if it never refills, at a rate of 0)."""
        self._refill(now)
        missing = self._burst - self._tokens
        if missing <= 0:
            return now
        if self._rate <= 0:
            return math.inf
        return now + missing / self._rate

    def _refill(self, now: float) -> None:
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._stamp = now


class AddressBudgets:
    """A TokenBucket per client address, shared by all its connections.

    A budget outlives the address's connections until it has refilled: forgetting it when
    the last one closes would hand the next connection a full one. Refilled budgets are
    dropped as new addresses come, found through a heap of the times the budgets held will
    be full again (a budget spent since its time was pushed is pushed again for its new
    time when that one comes up; one that a refund makes full is pushed again for now), so
    a lookup costs O(log n) amortized, however many are held. So a budget is looked up each
    time it is used, and kept no longer than a resume's spend and its refund: one kept past
    its drop would be a second budget of its address, beside the new one its other
    connections get.

    At most `max_held` addresses have budgets of their own. Past that (clients cycling many
    addresses, each spending a little, which IPv6 makes cheap), new addresses share one
    overflow budget until some refill: under such load they are limited together, never
    unlimited, and the memory stays bounded.
    """

    __slots__ = ("_buckets", "_burst", "_due", "_max_held", "_overflow", "_rate", "_refills")

    def __init__(self, rate: float, burst: float, *, max_held: int = MAX_ADDRESSES) -> None:
        self._rate = rate
        self._burst = burst
        self._max_held = max_held
        self._buckets: dict[str, TokenBucket] = {}
        # (when the address's budget will be full again, the address): for each held address
        # the entry of the time in _due; a time may be past due for a budget spent since it
        # was pushed. Other entries are stale (pushed before a refund made the budget full,
        # or for a budget forgotten since) and are skipped.
        self._refills: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._overflow = TokenBucket(rate, burst, 0.0)

    def __len__(self) -> int:
        """Addresses holding a budget of their own."""
        return len(self._buckets)

    def of(self, address: str, now: float) -> TokenBucket:
        """The budget of address (a full one for an address not seen lately, the shared
        overflow budget while `max_held` others are held)."""
        bucket = self._buckets.get(address)
        if bucket is None:
            self._forget_refilled(now)
            if len(self._buckets) >= self._max_held:
                return self._overflow
            bucket = self._buckets[address] = TokenBucket(self._rate, self._burst, now)
            self._due[address] = now
            heapq.heappush(self._refills, (now, address))
        return bucket

    def refund(self, address: str, bucket: TokenBucket, *, amount: float, now: float) -> None:
        """Give back to `bucket`, the budget of() gave address, tokens spent ahead but not
        used. One this makes full is due to be forgotten now: left at its old time (a history
        budget's, up to 4 minutes away), it would count against `max_held` meanwhile and
        send new addresses to the overflow budget."""
        bucket.refund(amount, now)
        if self._buckets.get(address) is not bucket or self._due[address] <= now:
            return  # the overflow budget, one forgotten already, or due already
        if bucket.full(now):
            self._due[address] = now
            heapq.heappush(self._refills, (now, address))
            if len(self._refills) > 2 * len(self._due) + STALE_REFILLS:
                # Mostly stale entries: the heap is built again from the current ones (each
                # such rebuild follows as many refunds as it costs entries).
                self._refills = [(due, held) for held, due in self._due.items()]
                heapq.heapify(self._refills)

    def _forget_refilled(self, now: float) -> None:
        refills, buckets, due = self._refills, self._buckets, self._due
        while refills and refills[0][0] <= now:
            when, address = heapq.heappop(refills)
            if due.get(address) != when:
                continue  # stale
            full_at = buckets[address].full_at(now)
            if full_at <= now:  # full, or so nearly that pushed back it would come up again
                del buckets[address], due[address]
            else:  # spent again since: looked at again when it will be full
                due[address] = full_at
                heapq.heappush(refills, (full_at, address))


class PatternShares:
    """Which client address brought each pattern into a server-wide pool, and how many each
    brought: at most `share` per address, so that a few addresses cannot fill the pool.

    A pattern counts against the address that first subscribed to it for as long as anyone
    holds it: handing it over to another holder would let an address bring its share again
    and again, each time another of its addresses took over the last ones.
    """

    __slots__ = ("_brought", "_by", "_share")

    def __init__(self, share: int) -> None:
        self._share = share
        self._by: dict[str, str] = {}  # pattern -> the address that brought it
        self._brought: dict[str, int] = {}  # address -> patterns it brought still held

    @property
    def share(self) -> int:
        return self._share

    def may_bring(self, address: str) -> bool:
        """Whether address may bring one more pattern into the pool."""
        return self._brought.get(address, 0) < self._share

    def bring(self, pattern: str, address: str) -> None:
        """pattern enters the pool, brought by address."""
        assert pattern not in self._by, pattern
        self._by[pattern] = address
        self._brought[address] = self._brought.get(address, 0) + 1

    def leave(self, pattern: str) -> None:
        """pattern left the pool (no one holds it any more)."""
        address = self._by.pop(pattern)
        left = self._brought[address] - 1
        if left:
            self._brought[address] = left
        else:
            del self._brought[address]


def connection_ceiling(configured: int, open_files: int) -> int:
    """The connections to hold at most: WS_MAX_CONNECTIONS, lowered so that FILES_RESERVED of
    the process's open files stay free (at the limit, a reconnect to Redis would fail).
    `open_files` is the soft limit; resource.RLIM_INFINITY (-1) means none."""
    if open_files < 0:
        return configured
    return max(1, min(configured, open_files - FILES_RESERVED))


class ConnectionCounter:
    """Open connections per client IP, with a ceiling."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._counts: dict[str, int] = {}

    def count(self, ip: str) -> int:
        return self._counts.get(ip, 0)

    def acquire(self, ip: str) -> bool:
        """Take a slot for ip, or return False when it has `limit` connections already."""
        current = self._counts.get(ip, 0)
        if current >= self._limit:
            return False
        self._counts[ip] = current + 1
        return True

    def release(self, ip: str) -> None:
        current = self._counts.get(ip, 0)
        if current <= 1:
            self._counts.pop(ip, None)
        else:
            self._counts[ip] = current - 1


def client_ip(
    peer: str | None,
    *,
    forwarded_for: Iterable[str],
    real_ip: str | None,
    trusted: Sequence[Network],
    local: bool = False,
) -> str:
    """The address of the client behind the proxies we trust.

    Headers are believed only when the TCP peer is a trusted proxy, or the connection came
    through the Unix socket (`local`: only a local proxy can reach it). X-Forwarded-For is
    read from the right (each proxy appends the address it saw) skipping trusted proxies, so
    a client cannot choose its address by sending the header itself; X-Real-IP, set by Nginx
    to $remote_addr, is the fallback.
    """
    peer_ip = _parse(peer)
    if peer_ip is None and not local:
        return peer or "unknown"
    if peer_ip is not None and not _is_trusted(peer_ip, trusted):
        return _text(peer_ip)
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:
            break  # garbage from the client side of the chain: trust nothing before it
        if not _is_trusted(address, trusted):
            return _text(address)
    if real_ip is not None:
        address = _parse(real_ip.strip())
        if address is not None:
            return _text(address)
    return _text(peer_ip) if peer_ip is not None else "local"


@functools.lru_cache(maxsize=4096)
def per_ip_key(ip: str) -> str:
    """What WS_MAX_CONNECTIONS_PER_IP counts by: an IPv4 address, or an IPv6 /64 (what one
    subscriber line or host is given: counting single IPv6 addresses, one client could take
    as many slots as it has addresses). Anything else (a Unix peer name) is its own key."""
    address = _parse(ip)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return ip


# Parsing an address costs more than the rest of a handshake's checks, and the peers of a
# connect storm are few (behind Nginx, one): each address is parsed and formatted once
# (bounded caches).
@functools.lru_cache(maxsize=4096)
def _parse(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return str(address)


def _is_trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: Sequence[Network]
) -> bool:
    return any(address.version == net.version and address in net for net in trusted)
