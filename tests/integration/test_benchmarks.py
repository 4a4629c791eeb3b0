"""The benchmarks still run end to end and measure what they say (tiny chains and client
counts, no timing asserted: figures belong to the benchmarks, not to the tests), and stop
everything they started however they are stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bench.broadcaster.publisher import market_address
from bench.broadcaster.run import LoadGen, Row, Scenario, ServerOptions, render, run_scenario
from devnet.process import free_port
from tests.support.processes import descendants, kill_all, running, wait_ended
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 300
LIVE_SAMPLES = 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("confirmations", [0, 2])
def test_indexer_benchmark_runs_on_a_small_chain(tmp_path: Path, confirmations: int) -> None:
    """Every phase runs on real services; its counts agree with the chain it generated.
    With CONFIRMATIONS=2 (an indexer that stays 2 blocks behind the head) as well."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.indexer.run",
            "--events", str(EVENTS), "--txs-per-block", "5", "--live-samples", str(LIVE_SAMPLES),
            "--floor-repeats", "1", "--postgres", "fast", "--out", str(out),
            "--indexer-env", f"CONFIRMATIONS={confirmations}",
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
    assert live["confirmations"] == confirmations
    assert len(live["latencies_ms"]) == LIVE_SAMPLES
    assert all(latency > 0 for latency in live["latencies_ms"])
    assert live["settle_seconds"] is not None
    assert result["memory_after_live_kb"]["VmRSS"] > 0
    assert result["indexer_exit_code"] == 0
    assert len(result["goals"]) == 5
    assert "written to" in done.stdout.decode()


@contextlib.asynccontextmanager
async def subscribing_server() -> AsyncIterator[str]:
    """A WebSocket server that confirms every subscription and sends nothing else; its URL."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):  # the generator's clients just go away
            async for raw in ws:
                message = json.loads(raw)
                if message.get("type") == "subscribe":
                    channel = message["channel"]
                    await ws.send(json.dumps({"type": "subscribed", "channel": channel}))

    port = free_port()
    async with serve(handler, "127.0.0.1", port):
        yield f"ws://127.0.0.1:{port}/ws"


async def test_the_load_generator_exits_when_its_stdin_closes() -> None:
    """Its commands come on stdin: once that closes (run.py exited, even killed) it exits,
    rather than holding its clients open."""
    async with subscribing_server() as url:
        gen = await LoadGen.start(url, Scenario("stdin", 5, 0))
        try:
            assert (await gen.line())["subscribed"] == 5
            assert gen.proc.stdin is not None
            gen.proc.stdin.close()
            async with asyncio.timeout(10):
                assert await gen.proc.wait() == 0
        finally:
            if gen.proc.returncode is None:
                gen.proc.kill()
                await gen.proc.wait()


# `python -m bench.broadcaster.run` on a scenario of 20 clients at 20 events/s for a minute.
TINY_BROADCASTER_BENCH = """
import sys
from bench.broadcaster import run
run.SCENARIOS["tiny"] = run.Scenario("tiny", 20, 20)
sys.argv = [
    "run", "--server", "broadcaster", "--scenario", "tiny", "--duration", "60",
    "--warmup", "0.5", "--logdir", sys.argv[1],
]
sys.exit(run.main())
"""


async def running_broadcaster_bench(
    tmp_path: Path,
) -> tuple[asyncio.subprocess.Process, dict[int, str]]:
    """The broadcaster benchmark in its measured window; returns it and what it started."""
    bench = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TINY_BROADCASTER_BENCH, str(tmp_path / "logs"),
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip

    async def publishing() -> bool:
        return "bench.broadcaster.publisher" in " ".join(running(descendants(bench.pid)).values())

    try:
        await eventually(publishing, within=60, what="the benchmark's publisher running")
    except BaseException:
        bench.kill()
        await bench.wait()
        raise
    started = descendants(bench.pid)
    commands = " ".join(running(started).values())
    for name in ("redis-server", "-m broadcaster", "loadgen.mjs", "bench.broadcaster.publisher"):
        assert name in commands, commands
    return bench, started


@pytest.mark.timeout(120)
async def test_sigterm_stops_the_broadcaster_benchmark_and_what_it_started(
    tmp_path: Path,
) -> None:
    """SIGTERM stops the benchmark as Ctrl-C does (exit code 130): the server, the load
    generator, the publisher and Redis end with it, and Redis's temp dir is removed."""
    bench, started = await running_broadcaster_bench(tmp_path)
    try:
        bench.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await bench.wait() == 130
        assert await wait_ended(started, within=5) == {}
        assert sorted(os.listdir(tmp_path)) == ["logs"]
    finally:
        kill_all(started)


@pytest.mark.timeout(120)
async def test_a_killed_broadcaster_benchmark_takes_its_processes_with_it(
    tmp_path: Path,
) -> None:
    """SIGKILL leaves no chance to clean up, but the server, the load generator, the
    publisher and Redis get a parent-death signal and stop."""
    bench, started = await running_broadcaster_bench(tmp_path)
    try:
        bench.kill()
        await bench.wait()
        assert await wait_ended(started, within=10) == {}
    finally:
        kill_all(started)


@pytest.mark.timeout(300)
async def test_sigterm_stops_the_indexer_benchmark_and_what_it_started(
    tmp_path: Path, services_tmpdir: Path
) -> None:
    """SIGTERM in the live phase stops the benchmark as Ctrl-C does (exit code 130): the
    indexer, Postgres, Redis and anvil end with it and their temp dirs are removed; only the
    indexer's log is kept, as the benchmark says."""
    bench = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.indexer.run",
        "--events", str(EVENTS), "--txs-per-block", "5", "--live-samples", "500",
        "--floor-repeats", "1", "--postgres", "fast", "--out", str(tmp_path / "bench.json"),
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(services_tmpdir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert bench.stderr is not None
    started: dict[int, str] = {}
    try:
        async with asyncio.timeout(240):
            while not (line := await bench.stderr.readline()).startswith(b"live ..."):
                assert line, "the benchmark ended before its live phase"
        started = descendants(bench.pid)
        commands = " ".join(running(started).values())
        for name in ("postgres", "redis-server", "anvil", "-m indexer"):
            assert name in commands, commands
        bench.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            rest = (await bench.stderr.read()).decode(errors="replace")
            assert await bench.wait() == 130, rest
        assert "indexer log kept at" in rest
        assert await wait_ended(started, within=5) == {}
        left = os.listdir(services_tmpdir)
        assert [name for name in left if not name.startswith("kektech-indexer-")] == [], left
    finally:
        if bench.returncode is None:
            bench.kill()
            await bench.wait()
        kill_all(started)


async def with_all_then_half_taken(
    scenario: Callable[[str], Scenario], logdir: Path, *, warmup: float
) -> list[Row]:
    """The rows of a 20-client scenario against a server that takes them all
    (WS_MAX_CONNECTIONS 20), then against one that takes 10."""
    rows = []
    for limit in ("20", "10"):
        rows.append(
            await run_scenario(
                "broadcaster",
                scenario(limit),
                transport="tcp",
                duration=1,
                warmup=warmup,
                tick=0.002,
                logdir=logdir,
                options=ServerOptions(env={"WS_MAX_CONNECTIONS": limit}),
            )
        )
    return rows


async def test_the_broadcaster_benchmark_counts_clients_that_never_subscribed(
    tmp_path: Path,
) -> None:
    """With a server that takes 10 of 20 clients, the row says 10/20 subscribed, has no "all
    connected" time and an error; each refused client is counted once, by its reason."""
    rows = await with_all_then_half_taken(
        lambda limit: Scenario(f"storm-{limit}", 20, 0), tmp_path, warmup=0
    )
    full, half = (row.values for row in rows)
    assert full["connected"] == 20
    assert full["all_connected_s"] > 0
    assert full["connect_closes"] == {}
    assert "error" not in full
    assert half["connected"] == 10
    assert half["all_connected_s"] is None
    assert half["connect_closes"] == {"http 503": 10}
    assert "10 of 20 clients subscribed" in half["error"]
    table = render(rows).splitlines()
    assert "subscribed" in table[0]
    assert " 20/20 " in table[1]
    assert " 10/20 " in table[2]


def test_the_broadcaster_benchmark_exits_with_1_when_a_row_failed(tmp_path: Path) -> None:
    """A run with a row that failed says so after the table, and its exit code is 1."""
    script = TINY_BROADCASTER_BENCH.replace(
        'run.Scenario("tiny", 20, 20)', 'run.Scenario("tiny", 20, 0)'
    ).replace(
        '"--logdir", sys.argv[1],',
        '"--logdir", sys.argv[1], "--server-env", "WS_MAX_CONNECTIONS=10",',
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = done.stdout.decode()
    assert done.returncode == 1, output + done.stderr.decode()[-3000:]
    assert "broadcaster/tiny: 10 of 20 clients subscribed" in output


@contextlib.asynccontextmanager
async def event_server(
    seqs: range, lost: set[int], go: asyncio.Event, *, markets: int
) -> AsyncIterator[str]:
    """A WebSocket server that, once `go` is set, sends each subscriber the events of `seqs`
    its channel gets (event seq s is for market s % markets, as the publisher assigns them),
    except those in `lost`; its URL."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            channel = json.loads(await ws.recv())["channel"]
            await ws.send(json.dumps({"type": "subscribed", "channel": channel}))
            await go.wait()
            for seq in seqs:
                wanted = channel in ("events:*", f"market:{market_address(seq % markets)}")
                if wanted and seq not in lost:
                    data = {"seq": seq, "args": {"sentAt": "0"}}
                    event = {"type": "event", "seq": seq, "data": data}
                    await ws.send(json.dumps(event, separators=(",", ":")))
            await ws.wait_closed()

    port = free_port()
    async with serve(handler, "127.0.0.1", port):
        yield f"ws://127.0.0.1:{port}/ws"


@pytest.mark.parametrize("mode", ["events", "markets"])
async def test_the_load_generator_counts_gaps_and_missing_deliveries(mode: str) -> None:
    """Each client checks that its seqs follow each other (by 1 on events:*, by the number
    of markets on a market channel) and the generator tells, for a range of seqs, how many
    deliveries its clients should have had and how many never came."""
    markets, clients = 3, 6
    # Recipients of each event: every client on events:*, or the 2 on its market.
    recipients = clients if mode == "events" else clients // markets
    go = asyncio.Event()
    async with event_server(range(1, 31), {10, 11, 12}, go, markets=markets) as url:
        gen = await LoadGen.start(url, Scenario("gaps", clients, 30, mode=mode, markets=markets))
        try:
            assert (await gen.line())["subscribed"] == clients
            await gen.command("start")
            go.set()

            async def all_in() -> bool:
                report = await gen.command("report")
                return bool(report["received"] == 27 * recipients)

            await eventually(all_in, within=10, what="every event sent received")
            report = await gen.command("report")
            tally = await gen.command("tally 0 30")
        finally:
            await gen.stop()
    # Each client misses 3 events in a row (events:*) or one (a market's): one gap each.
    assert (report["gaps"], report["duplicates"]) == (clients, 0)
    assert tally["expected"] == 30 * recipients
    assert tally["delivered"] == 27 * recipients
    assert tally["missing"] == 3 * recipients
    assert tally["eventsShort"] == 3


async def test_the_broadcaster_benchmark_compares_deliveries_with_what_was_published(
    tmp_path: Path,
) -> None:
    """Deliveries are checked against every event published in the window times its
    recipients: all arrive from the broadcaster; with half the clients refused, the
    shortfall fails the row."""
    rows = await with_all_then_half_taken(
        lambda limit: Scenario(f"markets-{limit}", 20, 50, mode="markets", markets=5),
        tmp_path,
        warmup=0.5,
    )
    full, half = (row.values for row in rows)
    assert "error" not in full, full["error"]
    assert full["published"] > full["window_events"] > 0
    assert full["expected_deliveries"] == 4 * full["window_events"]  # 20 clients, 5 markets
    assert (full["missing_deliveries"], full["gaps"], full["duplicates"]) == (0, 0, 0)
    assert half["missing_deliveries"] > 0
    assert "deliveries of the" in half["error"]
    assert "had not arrived" in half["error"]
