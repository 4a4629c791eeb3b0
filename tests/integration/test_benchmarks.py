"""The indexer benchmark still runs end to end and measures what it says (tiny chain, no timing
asserted: figures belong to the benchmark, not to the tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 300
LIVE_SAMPLES = 3


@pytest.mark.timeout(300)
def test_indexer_benchmark_runs_on_a_small_chain(tmp_path: Path) -> None:
    """Every phase runs on real services; its counts agree with the chain it generated."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.indexer.run",
            "--events", str(EVENTS), "--txs-per-block", "5", "--live-samples", str(LIVE_SAMPLES),
            "--floor-repeats", "1", "--postgres", "fast", "--out", str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=280,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    result = orjson.loads(out.read_bytes())
    chain, floor, catch_up, live = (result[k] for k in ("chain", "floor", "catch_up", "live"))

    assert chain["driver_events"] >= EVENTS
    # The floor fetched every tracked log; the indexer stored and published each of them.
    assert floor["logs"] == chain["driver_events"]
    assert catch_up["events"] == floor["logs"]
    assert catch_up["blocks"] == chain["blocks"]
    assert 0 < catch_up["startup_seconds"] < catch_up["cursor_seconds"] <= catch_up["seconds"]
    seconds, cursor, published, rss_kb = catch_up["timeline"][-1]
    assert (cursor, published) == (chain["head"], catch_up["events"])
    assert rss_kb > 0
    assert seconds == pytest.approx(catch_up["seconds"], abs=1e-3)

    assert live["missing"] == 0
    assert len(live["latencies_ms"]) == LIVE_SAMPLES
    assert all(latency > 0 for latency in live["latencies_ms"])
    assert live["settle_seconds"] is not None
    assert result["memory_after_live_kb"]["VmRSS"] > 0
    assert result["indexer_exit_code"] == 0
    assert len(result["goals"]) == 5
    assert "written to" in done.stdout.decode()
