"""Tests of bench/indexer/report.py: the goals judge what was measured, and only that."""

from __future__ import annotations

from bench.indexer.catchup import CatchUp
from bench.indexer.floor import Floor
from bench.indexer.live import Live
from bench.indexer.report import Result, render

MEMORY_KB = {"VmRSS": 80_000, "VmHWM": 85_000, "RssAnon": 60_000, "RssFile": 20_000}


def result(live: Live) -> Result:
    catch_up = CatchUp(
        seconds=8,
        startup_seconds=1,
        cursor_seconds=7,
        events=50_000,
        blocks=946,
        memory_kb=MEMORY_KB,
        startup_memory_kb=MEMORY_KB,
        cpu_seconds={"indexer": 6.0},
        startup_cpu_seconds=0.5,
        metrics={},
        timeline=[],
    )
    return Result(
        config={"indexer_settings": "", "poll_interval": 0.25},
        environment={"commit": "abc", "dirty": False, "postgres": "fast", "cpus": 2, "python": ""},
        chain={"blocks": 946, "txs_per_block": 20, "generation_seconds": 1.0},
        floor=Floor((2.0,), 50_000, 946, 1609, 1605),
        catch_up=catch_up,
        live=live,
        memory_after_live_kb=MEMORY_KB,
        indexer_exit_code=0,
    )


def live_goals(live: Live) -> list[tuple[str, str, bool]]:
    return [goal for goal in result(live).goals() if goal[0].startswith("live")]


def test_live_goals_are_met_on_fast_blocks_that_all_arrived() -> None:
    """Every block published, latencies under both bounds: both live goals are met."""
    live = Live([40.0 + i / 5 for i in range(200)], missing=0, txs_per_block=1, messages=200,
                settle_seconds=0.1)  # fmt: skip
    assert [met for _, _, met in live_goals(live)] == [True, True]


def test_live_goals_are_missed_when_blocks_were_never_published() -> None:
    """Blocks that never reached Redis have no latency to rank: with any of them missing the
    percentiles of the others do not meet a goal, and the report says how many are missing."""
    live = Live([40.0 + i for i in range(50)], missing=150, txs_per_block=1, messages=50,
                settle_seconds=0.1)  # fmt: skip
    goals = live_goals(live)
    assert [met for _, _, met in goals] == [False, False]
    assert all("150 of 200 blocks never published" in measured for _, measured, _ in goals)
    assert "150 of 200 blocks never published" in render(result(live))
