"""deploy/monitoring/alerts.yml under `promtool test rules`: a healthy hour of an indexer, two
broadcasters and node_exporter fires nothing, and each fault fires its rule. The series are
scraped from the services' own Metrics objects (tests/support/prometheus.py), so their names
and labels are exactly those of /metrics (`le="16.0"`, a labelled child only once created)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from broadcaster.metrics import Metrics as BroadcasterMetrics
from indexer.metrics import Metrics as IndexerMetrics
from indexer.rpc import RpcStats
from tests.support.prometheus import RULES, Scrapes, Target, firing, quiet, run_rule_tests

# The scrape config of docs/operations.md, and node_exporter on its default port.
INDEXER = Target("kektech-indexer", "127.0.0.1:9464")
BROADCASTERS = (
    Target("kektech-broadcaster", "127.0.0.1:9465"),
    Target("kektech-broadcaster", "127.0.0.1:9466"),
)
NODE = Target("node", "127.0.0.1:9100")
MINUTES = 60  # scraped from minute 0 to 60, the alerts judged at 60
FAULT_FROM = 30  # a lasting fault from here: longer than every `for:` and changes() window
BURST_AT = 55  # a one-off fault here: inside every increase() window (10m at least)
MEMORY_TOTAL = 2 * 1024**3


def published(minute: int) -> int:
    """The indexer's last published seq: 100 events a minute."""
    return 1000 + 100 * minute


@dataclass
class Deployment:
    """What the scrape config sees, healthy: each value on the healthy side of its rule, at the
    threshold itself where the rule has one."""

    indexer: IndexerMetrics = field(default_factory=IndexerMetrics)
    broadcasters: tuple[BroadcasterMetrics, BroadcasterMetrics] = field(
        default_factory=lambda: (BroadcasterMetrics(), BroadcasterMetrics())
    )
    rpc: RpcStats = field(default_factory=RpcStats)
    down: set[Target] = field(default_factory=set)
    memory_available: float = 0.25 * MEMORY_TOTAL  # alert above 80% in use

    def __post_init__(self) -> None:
        self.indexer.rpc.watch(self.rpc)  # as the service watches its RPC client's
        self.indexer.head_age.set_function(lambda: 1.0)  # a clock's, read at each scrape

    def run(self, minute: int) -> None:
        """One healthy minute."""
        indexer = self.indexer
        indexer.leader.set(1)
        indexer.head.set(1000 + minute)
        indexer.lag.set(100)  # alert above 100
        self.rpc.attempts += 100
        self.rpc.errors["timeout"] += 15  # alert above 20%
        indexer.redis_up.set(1)
        indexer.publish_backlog.set(400 + 10 * minute)  # growing to 1000: alert above
        indexer.published_seq.set(published(minute))
        for broadcaster in self.broadcasters:
            broadcaster.connections.set(6000)  # alert above 6000
            broadcaster.redis_up.set(1)
            broadcaster.last_seq.set(published(minute) - 1000)  # alert above 1000 behind
            for _ in range(10):
                broadcaster.lag.observe(25.0)  # p99 29.8 s: alert above 30 s
            broadcaster.slow_consumers.inc(4)  # 40 in 10 minutes: alert above 50
            broadcaster.rejected.labels(reason="path").inc(3)  # refusals, none for being full

    def scrape(self, scrapes: Scrapes, minute: int) -> None:
        registries = [self.indexer.registry, *(b.registry for b in self.broadcasters)]
        for target, registry in zip((INDEXER, *BROADCASTERS), registries, strict=True):
            scrapes.scrape(minute, target, None if target in self.down else registry.collect())
        node = (
            f"node_memory_MemAvailable_bytes {self.memory_available}\n"
            f"node_memory_MemTotal_bytes {MEMORY_TOTAL}\n"
        )
        scrapes.scrape(minute, NODE, text_string_to_metric_families(node))


def reorg(deployment: Deployment, depth: int) -> None:
    """As the indexer's follower records a reorg it rolled back."""
    deployment.indexer.reorgs.inc()
    deployment.indexer.reorg_depth.observe(depth)


def more_rpc_errors(deployment: Deployment, minute: int) -> None:
    deployment.rpc.errors["timeout"] += 15  # 30% of the requests


def standby_without_redis(deployment: Deployment, minute: int) -> None:
    deployment.indexer.leader.set(0)
    deployment.indexer.redis_up.set(0)


def late_events(deployment: Deployment, minute: int) -> None:
    for _ in range(10):
        deployment.broadcasters[0].lag.observe(45.0)


def stream_gap(deployment: Deployment) -> None:
    deployment.broadcasters[1].gaps.inc()
    deployment.broadcasters[1].gap_entries.inc(10)


@dataclass(frozen=True)
class Fault:
    """A fault in the healthy hour, and the alerts it must fire (by the labels of each one's
    single alert) or must not."""

    fires: dict[str, dict[str, str]]
    quiet: tuple[str, ...] = ()
    lasting: Callable[[Deployment, int], None] | None = None  # every minute from FAULT_FROM
    once: dict[int, Callable[[Deployment], None]] = field(default_factory=dict)  # by minute


def alert(target: Target, severity: str, **labels: str) -> dict[str, str]:
    """The labels of an alert on one target's series."""
    return {**target.labels, "severity": severity, **labels}


def per_instance(target: Target, severity: str) -> dict[str, str]:
    """The labels of an alert summed `by (instance)`."""
    return {"instance": target.instance, "severity": severity}


FAULTS = {
    "indexer down": Fault(
        fires={"KektechIndexerDown": alert(INDEXER, "critical")},
        lasting=lambda d, m: d.down.add(INDEXER),
    ),
    "no indexer leading": Fault(
        fires={"KektechIndexerNotLeading": {"severity": "critical"}},
        lasting=lambda d, m: d.indexer.leader.set(0),
    ),
    "indexer lagging": Fault(
        fires={"KektechIndexerLagHigh": alert(INDEXER, "warning")},
        lasting=lambda d, m: d.indexer.lag.set(101),
    ),
    "chain head stalled": Fault(
        fires={"KektechIndexerHeadStalled": alert(INDEXER, "warning")},
        lasting=lambda d, m: d.indexer.head.set(1000 + FAULT_FROM),
    ),
    "rpc errors": Fault(
        fires={"KektechIndexerRpcErrors": per_instance(INDEXER, "warning")},
        lasting=more_rpc_errors,
    ),
    "indexer without redis": Fault(
        fires={"KektechIndexerRedisDown": alert(INDEXER, "critical")},
        lasting=lambda d, m: d.indexer.redis_up.set(0),
    ),
    "standby without redis": Fault(  # only the leader publishes
        fires={"KektechIndexerNotLeading": {"severity": "critical"}},
        quiet=("KektechIndexerRedisDown",),
        lasting=standby_without_redis,
    ),
    "publish backlog growing": Fault(
        fires={"KektechIndexerPublishBacklogGrowing": alert(INDEXER, "warning")},
        lasting=lambda d, m: d.indexer.publish_backlog.set(1001 + 50 * (m - FAULT_FROM)),
    ),
    "stream missing events": Fault(
        fires={"KektechIndexerStreamMissingEvents": alert(INDEXER, "critical")},
        once={BURST_AT: lambda d: d.indexer.stream_missing.inc(3)},
    ),
    "three shallow reorgs": Fault(
        fires={"KektechIndexerReorg": alert(INDEXER, "info")},
        quiet=("KektechIndexerDeepReorg", "KektechIndexerReorgsFrequent"),
        once={minute: lambda d: reorg(d, 5) for minute in (35, 45, BURST_AT)},
    ),
    "deep reorg": Fault(
        fires={
            "KektechIndexerReorg": alert(INDEXER, "info"),
            "KektechIndexerDeepReorg": alert(INDEXER, "warning"),
        },
        quiet=("KektechIndexerReorgsFrequent",),
        once={BURST_AT: lambda d: reorg(d, 20)},
    ),
    "four reorgs in an hour": Fault(
        fires={
            "KektechIndexerReorg": alert(INDEXER, "info"),
            "KektechIndexerReorgsFrequent": alert(INDEXER, "warning"),
        },
        quiet=("KektechIndexerDeepReorg",),
        once={minute: lambda d: reorg(d, 1) for minute in (30, 40, 50, BURST_AT)},
    ),
    "broadcaster down": Fault(
        fires={"KektechBroadcasterDown": alert(BROADCASTERS[1], "critical")},
        lasting=lambda d, m: d.down.add(BROADCASTERS[1]),
    ),
    "broadcaster not reading redis": Fault(
        fires={"KektechBroadcasterRedisDisconnected": alert(BROADCASTERS[0], "critical")},
        lasting=lambda d, m: d.broadcasters[0].redis_up.set(0),
    ),
    "events relayed late": Fault(
        fires={"KektechBroadcasterEventLagHigh": per_instance(BROADCASTERS[0], "warning")},
        lasting=late_events,
    ),
    "broadcaster behind": Fault(
        fires={"KektechBroadcasterBehindIndexer": {"severity": "warning"}},
        lasting=lambda d, m: d.broadcasters[1].last_seq.set(published(FAULT_FROM) - 1000),
    ),
    "stream gap": Fault(
        fires={"KektechBroadcasterStreamGaps": alert(BROADCASTERS[1], "warning")},
        once={BURST_AT: stream_gap},
    ),
    "slow consumers closed": Fault(
        fires={
            "KektechBroadcasterSlowConsumerClosesSpike": per_instance(BROADCASTERS[0], "warning")
        },
        lasting=lambda d, m: d.broadcasters[0].slow_consumers.inc(20),
    ),
    "resumes refused the stream": Fault(
        fires={"KektechBroadcasterResumesRefused": per_instance(BROADCASTERS[1], "warning")},
        lasting=lambda d, m: d.broadcasters[1].replay_stream_refusals.inc(20),
    ),
    "connections near the limit": Fault(
        fires={"KektechBroadcasterConnectionsNearLimit": alert(BROADCASTERS[1], "warning")},
        lasting=lambda d, m: d.broadcasters[1].connections.set(6001),
    ),
    "broadcaster full": Fault(  # a single burst of refusals, the first since start
        fires={"KektechBroadcasterFull": alert(BROADCASTERS[0], "warning", reason="full")},
        once={BURST_AT: lambda d: d.broadcasters[0].rejected.labels(reason="full").inc(40)},
    ),
    "memory high": Fault(
        fires={"KektechNodeMemoryHigh": alert(NODE, "warning")},
        lasting=lambda d, m: setattr(d, "memory_available", 0.19 * MEMORY_TOTAL),
    ),
}


def rule_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def scrape_hour(fault: Fault | None) -> Scrapes:
    """A deployment scraped every minute for MINUTES minutes, the fault injected."""
    deployment, scrapes = Deployment(), Scrapes()
    for minute in range(MINUTES + 1):
        deployment.run(minute)
        if fault is not None:
            if fault.lasting is not None and minute >= FAULT_FROM:
                fault.lasting(deployment, minute)
            if minute in fault.once:
                fault.once[minute](deployment)
        deployment.scrape(scrapes, minute)
    return scrapes


def test_the_samples_scraped_are_those_metrics_renders() -> None:
    """A service's registry.collect(), which the scenarios scrape, holds the very series and
    values of its rendered /metrics text."""
    deployment = Deployment()
    deployment.run(0)
    reorg(deployment, 20)
    names: list[str] = []
    for metrics in (deployment.indexer, *deployment.broadcasters):
        collected, rendered = Scrapes(), Scrapes()
        collected.scrape(0, INDEXER, metrics.registry.collect())
        rendered.scrape(0, INDEXER, text_string_to_metric_families(metrics.render().decode()))
        assert collected.samples == rendered.samples
        names += collected.samples
    bucket = 'kektech_indexer_reorg_depth_blocks_bucket{instance="127.0.0.1:9464",'
    assert bucket + 'job="kektech-indexer",le="16.0"}' in names  # as the deep reorg rule has it


def test_every_rule_has_a_fault_that_fires_it() -> None:
    """The faults below cover alerts.yml: no rule is left untested."""
    assert {alert for fault in FAULTS.values() for alert in fault.fires} == set(rule_names())


def test_a_healthy_hour_fires_no_alert(tmp_path: Path) -> None:
    """With every value at or under its threshold for an hour, no rule fires or is pending."""
    checks = [quiet(name, at=MINUTES) for name in rule_names()]
    result = run_rule_tests(tmp_path, scrape_hour(None), minutes=MINUTES, checks=checks)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", FAULTS)
def test_a_fault_fires_its_alert(name: str, tmp_path: Path) -> None:
    """A fault in the healthy hour fires its rules' alerts, one each with the labels
    Alertmanager routes on, and not the rules it must leave alone."""
    fault = FAULTS[name]
    checks = [firing(alert, labels, at=MINUTES) for alert, labels in fault.fires.items()]
    checks += [quiet(alert, at=MINUTES) for alert in fault.quiet]
    result = run_rule_tests(tmp_path, scrape_hour(fault), minutes=MINUTES, checks=checks)
    assert result.returncode == 0, result.stdout + result.stderr
