"""Prometheus metrics of the indexer, in a registry of its own (one per service instance)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.rpc_errors = Gauge(
            "kektech_indexer_rpc_errors", "RPC errors by kind since start", ["kind"], registry=r
        )
        self.rpc_requests = Gauge(
            "kektech_indexer_rpc_requests", "RPC HTTP requests since start", registry=r
        )
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

    def record_rpc(self, stats: RpcStats) -> None:
        """Copy the RPC client's counters."""
        self.rpc_requests.set(stats.attempts)
        for kind, count in stats.errors.items():
            self.rpc_errors.labels(kind=kind).set(count)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
