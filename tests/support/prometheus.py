"""promtool's rule unit tests, fed with what Prometheus would store from scraping the services'
own Metrics objects once a minute: series named and labelled exactly as /metrics renders them."""

from __future__ import annotations

import collections
import json
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from devnet.process import REPO_ROOT

PROMTOOL = REPO_ROOT / ".venv" / "bin" / "promtool"  # scripts/install.sh puts it there
RULES = REPO_ROOT / "deploy" / "monitoring" / "alerts.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL.exists(), f"{PROMTOOL} is missing: run scripts/install.sh"
    return subprocess.run(
        [str(PROMTOOL), *args], capture_output=True, text=True, timeout=60, check=False
    )


@dataclass(frozen=True)
class Target:
    """A scrape target: the labels Prometheus adds to everything scraped from it."""

    job: str
    instance: str

    @property
    def labels(self) -> dict[str, str]:
        return {"job": self.job, "instance": self.instance}


def series(name: str, labels: dict[str, str]) -> str:
    """A series in promtool's notation (the label values here need no escaping)."""
    assert all('"' not in value and "\\" not in value for value in labels.values()), labels
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}"


class Scrapes:
    """The samples of one scrape a minute, by series and minute."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[int, float]] = collections.defaultdict(dict)

    def add(self, minute: int, name: str, labels: dict[str, str], value: float) -> None:
        self.samples[series(name, labels)][minute] = value

    def scrape(self, minute: int, target: Target, families: Iterable[Metric] | None) -> None:
        """`up` of a target, and every sample it exposes unless it did not answer.

        A service's families are its registry's collect(): the samples that generate_latest()
        formats for /metrics, without the cost of formatting and parsing them a minute at a
        time."""
        self.add(minute, "up", target.labels, 0.0 if families is None else 1.0)
        for family in families or ():
            for sample in family.samples:
                self.add(minute, sample.name, {**sample.labels, **target.labels}, sample.value)

    def input_series(self, minutes: int) -> list[dict[str, str]]:
        """promtool's input_series from minute 0 to `minutes`: `_` where there was no sample
        (a series that did not exist yet, or a target down)."""
        return [
            {
                "series": name,
                "values": " ".join(
                    "_" if minute not in values else repr(values[minute])
                    for minute in range(minutes + 1)
                ),
            }
            for name, values in sorted(self.samples.items())
        ]


def firing(alert: str, labels: dict[str, str], *, at: int) -> dict[str, Any]:
    """A promql_expr_test: exactly one `alert` firing at minute `at`, with these labels.

    Through the ALERTS series rather than alert_rule_test, which would compare the
    annotations too: their text is not what these tests are about."""
    return {
        "expr": f'ALERTS{{alertname="{alert}",alertstate="firing"}}',
        "eval_time": f"{at}m",
        "exp_samples": [
            {"labels": series("ALERTS", {**labels, "alertname": alert, "alertstate": "firing"}),
             "value": 1},
        ],
    }  # fmt: skip


def quiet(alert: str, *, at: int) -> dict[str, Any]:
    """A promql_expr_test: `alert` neither firing nor pending at minute `at`."""
    return {"expr": f'ALERTS{{alertname="{alert}"}}', "eval_time": f"{at}m", "exp_samples": []}


def run_rule_tests(
    directory: Path, scrapes: Scrapes, *, minutes: int, checks: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` of deploy/monitoring/alerts.yml over these scrapes."""
    document = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": scrapes.input_series(minutes),
                "promql_expr_test": checks,
            }
        ],
    }
    path = directory / "alerts.test.yml"
    path.write_text(json.dumps(document, indent=1))  # YAML, as JSON is: 10 times faster to write
    return promtool("test", "rules", str(path))
