"""deploy/monitoring/alerts.yml: valid rules (promtool's own check, and the fields this
project requires) over metrics a running indexer and broadcaster really export."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from devnet.anvil_node import Anvil
from devnet.chain import Deployment, DevChain
from devnet.driver import ActivityDriver
from devnet.redis_server import Redis
from tests.broadcaster.support import running, settings_for
from tests.support.indexer_process import IndexerProcess, indexer_env
from tests.support.prometheus import RULES, promtool

SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
# Prometheus's own per-target metric, and node_exporter's meminfo names (its documentation:
# node_memory_<field>_bytes for each /proc/meminfo field).
EXTERNAL = {"up", "node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count")}


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    assert isinstance(document, dict)
    assert set(document) == {"groups"}
    rules = []
    for group in document["groups"]:
        assert set(group) == {"name", "rules"}, group
        assert group["rules"], group["name"]
        rules += group["rules"]
    return rules


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    names = re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", text)
    return {name for name in names if name not in PROMQL_WORDS}


def exported_names(exposition: str) -> set[str]:
    """Every series name the exposition offers, including labelled metrics not yet observed."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name, *(name + suffix for suffix in SUFFIXES.get(kind, ()))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def fetch(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.text()


def test_promtool_accepts_the_rules() -> None:
    """`promtool check rules` (what Prometheus itself runs on loading them) finds no error."""
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_every_rule_has_the_required_fields() -> None:
    """Each rule has a unique CamelCase name, an expression, a severity, summary and text."""
    rules = load_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"Kektech[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
        assert isinstance(rule["expr"], str), rule["alert"]
        assert rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        if "for" in rule:
            assert DURATION.match(rule["for"]), rule["alert"]


async def test_rules_use_only_metrics_the_services_export(
    anvil: Anvil,
    dev_chain: DevChain,
    deployment: Deployment,
    database_url: str,
    redis_server: Redis,
    tmp_path: Path,
) -> None:
    """Every kektech_* name in an expression is in a running indexer's or broadcaster's /metrics."""
    stream_key = f"test:{os.getpid()}:rules"
    await ActivityDriver(dev_chain, deployment, seed=72, txs_per_block=3).run(blocks=2)
    env = indexer_env(
        database_url=database_url,
        redis_url=redis_server.url,
        rpc_url=anvil.rpc_url,
        deployment=deployment,
        stream_key=stream_key,
    )
    async with running(settings_for(redis_server.url, stream_key)) as broadcaster:
        with IndexerProcess(env, log_dir=tmp_path) as indexer:
            await indexer.wait_ready()
            exposition = await fetch(indexer.http_url + "/metrics")
        exposition += await fetch(broadcaster.http + "/metrics")
    exported = exported_names(exposition)
    assert "kektech_indexer_lag_blocks" in exported  # the parsing works at all
    used: set[str] = set()
    for rule in load_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = names - exported - EXTERNAL
        assert not unknown, f"{rule['alert']} uses {unknown}, not exported"
        used |= names
    # The rules cover both services (and the extraction found what it should).
    assert {"kektech_indexer_publish_backlog", "kektech_broadcaster_connections"} <= used
    assert "kektech_broadcaster_event_lag_seconds_bucket" in used
