"""Prometheus metrics of the broadcaster, in a registry of its own (one per service instance).

Hot paths count in plain integers and add to these per batch, never per delivery.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
FANOUT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
REPLAY_BUCKETS = (0, 1, 10, 100, 1000, 10_000, 100_000)
# Every reason server.py refuses a handshake for. Each is exported at 0 from the start: a
# series that appears only at its first refusal begins at that count, which increase() cannot
# see, so a single burst would never raise KektechBroadcasterFull.
REJECT_REASONS = ("path", "origin", "headers", "ip_limit", "full")


class Metrics:
    """Every metric the broadcaster exports on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "kektech_broadcaster_"
        self.connections = Gauge(p + "connections", "Open WebSocket connections", registry=r)
        self.connections_opened = Counter(
            p + "connections_opened", "WebSocket connections accepted", registry=r
        )
        self.rejected = Counter(
            p + "rejected",
            f"Handshakes refused, by reason ({', '.join(REJECT_REASONS)})",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        self.closes = Counter(
            p + "server_closes",
            "Connections the server closed (its close frame came first), by close code",
            ["code"],
            registry=r,
        )
        self.subscriptions = Gauge(
            p + "subscriptions", "Subscriptions held by all connections", registry=r
        )
        self.client_errors = Counter(
            p + "client_errors", "Client messages refused, by error code", ["code"], registry=r
        )
        self.events = Counter(p + "events", "Stream events relayed", registry=r)
        self.deliveries = Counter(
            p + "deliveries",
            "Event messages written to clients: live, replayed and held during a replay",
            registry=r,
        )
        self.slow_consumers = Counter(
            p + "slow_consumer_closes", "Clients closed for not reading (4008)", registry=r
        )
        self.invalid_entries = Counter(
            p + "invalid_entries", "Stream entries skipped as invalid", registry=r
        )
        self.gaps = Counter(
            p + "stream_gaps", "Jumps in seq while following the stream", registry=r
        )
        self.gap_entries = Counter(
            p + "stream_gap_entries", "Stream entries missed in those jumps", registry=r
        )
        self.replays = Counter(
            p + "replays", "Resumes answered, by recovered (true/false)", ["recovered"], registry=r
        )
        self.replay_stream_refusals = Counter(
            p + "replay_stream_refusals",
            "Resumes answered recovered: false without reading the Redis Stream, "
            "WS_REPLAY_STREAM_BUDGET being spent",
            registry=r,
        )
        self.replay_size = Histogram(
            p + "replay_events", "Events replayed per resume", buckets=REPLAY_BUCKETS, registry=r
        )
        self.lag = Histogram(
            p + "event_lag_seconds",
            "Block time to relay time of each event (block times are whole seconds)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.fanout = Histogram(
            p + "fanout_seconds",
            "Time to route and write one event to every recipient (events read together:"
            " each the read's time divided by its events)",
            buckets=FANOUT_BUCKETS,
            registry=r,
        )
        self.redis_up = Gauge(p + "redis_up", "1 while the stream is being read", registry=r)
        self.redis_reconnects = Counter(
            p + "redis_reconnects", "Redis connection failures followed by a retry", registry=r
        )
        self.last_seq = Gauge(p + "last_seq", "Seq of the last event relayed", registry=r)
        self.refill_awaited = Gauge(
            p + "stream_refill_awaited",
            "1 while the stream lacks entries already relayed (Redis lost them): nothing is"
            " relayed until the indexer writes them again",
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
