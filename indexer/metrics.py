"""Prometheus metrics of the indexer, in a registry of its own (one per service instance)."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from indexer.batch import StoredEvent
    from indexer.rpc import RpcStats


# Up to the default REORG_WINDOW (64) and past it, for a raised window.
REORG_DEPTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf"))


class Metrics:
    """Every metric the indexer exports on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.head = Gauge("kektech_indexer_head_block", "Newest block the RPC reports", registry=r)
        self.head_age = Gauge(
            "kektech_indexer_head_age_seconds",
            "Seconds since the chain head was last read (since start before the first read):"
            " head_block and lag_blocks are that old",
            registry=r,
        )
        self.head_read_at = time.monotonic()  # the service's start until a head is read
        self.head_age.set_function(lambda: time.monotonic() - self.head_read_at)
        self.cursor = Gauge(
            "kektech_indexer_cursor_block", "Last block whose logs are all stored", registry=r
        )
        self.lag = Gauge(
            "kektech_indexer_lag_blocks", "Blocks between the cursor and the target", registry=r
        )
        self.events = Counter("kektech_indexer_events", "Events stored", ["event"], registry=r)
        self.unknown_logs = Counter(
            "kektech_indexer_unknown_logs", "Logs from tracked contracts stored raw", registry=r
        )
        self.reorgs = Counter("kektech_indexer_reorgs", "Reorgs rolled back", registry=r)
        self.reorg_depth = Histogram(
            "kektech_indexer_reorg_depth_blocks",
            "Blocks rolled back per reorg",
            buckets=REORG_DEPTH_BUCKETS,
            registry=r,
        )
        self.fetch_retries = Counter(
            "kektech_indexer_fetch_retries",
            "Ranges fetched again after the chain moved",
            registry=r,
        )
        self.bloom_accepted = Counter(
            "kektech_indexer_bloom_accepted_blocks",
            "Tip blocks stored without logs after the grace although their bloom named a"
            " tracked contract and event",
            registry=r,
        )
        self.batch_seconds = Histogram(
            "kektech_indexer_batch_commit_seconds", "Time to commit one batch", registry=r
        )
        self.rpc = RpcCounters()
        r.register(self.rpc)
        self.publish_backlog = Gauge(
            "kektech_indexer_publish_backlog", "Outbox rows not yet in Redis", registry=r
        )
        self.published_seq = Gauge(
            "kektech_indexer_published_seq", "Last seq published to Redis", registry=r
        )
        self.redis_up = Gauge(
            "kektech_indexer_redis_up",
            "1 when Redis answers and takes the publisher's commands",
            registry=r,
        )
        self.stream_missing = Counter(
            "kektech_indexer_stream_missing",
            "Published seqs the stream lacks: gone from the outbox, or taken by another writer",
            registry=r,
        )
        self.leader = Gauge(
            "kektech_indexer_leader", "1 when this instance holds the write lease", registry=r
        )

    def record_batch(self, *, last: int, fresh: Sequence[StoredEvent], target: int) -> None:
        """Account for one committed batch."""
        self.cursor.set(last)
        self.lag.set(max(0, target - last))
        counts = collections.Counter(e.decoded.spec.name if e.decoded else "unknown" for e in fresh)
        for name, count in counts.items():
            self.events.labels(event=name).inc(count)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class RpcCounters:
    """kektech_indexer_rpc_requests and _rpc_errors (by kind): the RPC clients' counts since
    the service started, read at each scrape. Start-up makes a client per attempt: those of
    the clients before the current one are kept, so an outage at start shows too."""

    def __init__(self) -> None:
        self._stats: RpcStats | None = None
        self._attempts_before = 0
        self._errors_before: collections.Counter[str] = collections.Counter()

    def watch(self, stats: RpcStats) -> None:
        """Count a new client's stats from now on, after those of the clients before it."""
        if self._stats is not None:
            self._attempts_before += self._stats.attempts
            self._errors_before.update(self._stats.errors)
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        attempts = self._attempts_before
        errors = collections.Counter(self._errors_before)
        if self._stats is not None:
            attempts += self._stats.attempts
            errors.update(self._stats.errors)
        yield GaugeMetricFamily(
            "kektech_indexer_rpc_requests", "RPC HTTP requests since start", value=attempts
        )
        by_kind = GaugeMetricFamily(
            "kektech_indexer_rpc_errors", "RPC errors by kind since start", labels=["kind"]
        )
        for kind, count in sorted(errors.items()):
            by_kind.add_metric([kind], count)
        yield by_kind
