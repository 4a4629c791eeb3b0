"""Catch-up: a real indexer subprocess on an empty database, timed until all is published.

Done means both halves of the pipeline finished: the cursor (from /healthz) reached the head
and the Redis stream's last ID (the last published seq) reached the number of events. The
clock starts before the process is spawned, so interpreter start-up, migrations and the lease
are included; the start-up share is reported separately.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bench.indexer.proc import CpuMeter, process_cpu_seconds, read_memory
from tests.support.indexer_process import IndexerProcess

# Short enough that detection adds little to a run of seconds, long enough to cost the
# indexer nothing measurable (one /healthz request per poll).
POLL = 0.02
METRICS_OF_INTEREST = (
    "kektech_indexer_batch_commit_seconds_sum",
    "kektech_indexer_batch_commit_seconds_count",
    "kektech_indexer_events_total",
    "kektech_indexer_unknown_logs_total",
    "kektech_indexer_fetch_retries_total",
    "kektech_indexer_reorgs_total",
    "kektech_indexer_rpc_requests",
    "kektech_indexer_published_seq",
)


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Timings of one catch-up, in seconds from spawning the indexer."""

    seconds: float  # everything stored and published
    startup_seconds: float  # /healthz first shows a cursor: migrated, leader, chain checked
    cursor_seconds: float  # cursor at the head: everything stored
    events: int
    blocks: int
    memory_kb: dict[str, int]
    startup_memory_kb: dict[str, int]  # when the cursor was loaded, before any batch
    # CPU seconds from spawn to the end, per process tree: "indexer", the services, this
    # "benchmark", "others" (anything else on the machine, e.g. another test run) and the
    # "machine" total; the machine has os.cpu_count() times the wall time to give.
    cpu_seconds: dict[str, float]
    startup_cpu_seconds: float  # the indexer's, before the cursor was loaded
    metrics: dict[str, float]
    # (seconds, cursor, published seq, VmRSS in kB) whenever cursor or seq changed
    timeline: list[tuple[float, int | None, int, int]] = field(repr=False)

    @property
    def indexing_seconds(self) -> float:
        return self.seconds - self.startup_seconds

    @property
    def indexing_cpu_seconds(self) -> float:
        return self.cpu_seconds["indexer"] - self.startup_cpu_seconds


async def stream_top(redis: aioredis.Redis, key: str) -> int:
    """The seq of the newest entry ever added to the stream (0 if it does not exist)."""
    try:
        info = await redis.xinfo_stream(key)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return 0
        raise
    last = info["last-generated-id"]
    text = last.decode() if isinstance(last, bytes) else str(last)
    return int(text.split("-", 1)[0])


async def scrape_metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Selected values of /metrics, summed over labels."""
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        if name in METRICS_OF_INTEREST:
            values[name] = values.get(name, 0.0) + float(value)
    return values


async def _cursor(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with http.get(url + "/healthz") as response:
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, OSError):
        return None  # not listening yet
    cursor = body.get("cursor")
    return cursor if isinstance(cursor, int) else None


class PySpy:
    """`py-spy record` attached to a process until stopped (SIGINT makes it write the file)."""

    def __init__(self, binary: str, output: Path, *, rate: int = 100) -> None:
        self.binary = binary
        self.output = output
        self.rate = rate
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, pid: int) -> None:
        # --nonblocking: samples are read without stopping the indexer each time, which
        # otherwise slows it down on top of py-spy's own CPU.
        argv = [self.binary, "record", "--nonblocking", "--idle", "--format", "raw"]
        argv += ["-r", str(self.rate)]
        argv += ["-o", str(self.output), "-p", str(pid)]
        log = self.output.with_suffix(".log").open("wb")
        with log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


async def measure_catch_up(
    indexer: IndexerProcess,
    redis: aioredis.Redis,
    *,
    stream_key: str,
    first_block: int,
    head: int,
    expected_events: int,
    within: float,
    services: dict[str, int],
    profiler: PySpy | None = None,
) -> CatchUp:
    """Spawn the indexer and wait until every block is stored and every event published.

    `head`: the last block the indexer is to take, i.e. the chain's head minus the
    indexer's CONFIRMATIONS (it never goes further).
    """
    timeline: list[tuple[float, int | None, int, int]] = []
    startup = cursor_done = None
    startup_cpu = 0.0
    startup_memory: dict[str, int] = {}
    expected = expected_events
    started = time.perf_counter()
    indexer.start()
    assert indexer.proc is not None
    pid = indexer.proc.pid
    meter = CpuMeter({"indexer": pid, **services})
    if profiler is not None:
        profiler.start(pid)
    try:
        async with aiohttp.ClientSession() as http:
            while True:
                if not indexer.running:
                    raise RuntimeError(
                        f"indexer exited; last (seconds, cursor, published, rss): {timeline[-3:]}\n"
                        f"{indexer.log_text()[-4000:]}"
                    )
                cursor = await _cursor(http, indexer.http_url)
                published = await stream_top(redis, stream_key)
                now = time.perf_counter() - started
                if not timeline or timeline[-1][1:3] != (cursor, published):
                    rss = read_memory(pid).get("VmRSS", 0)
                    timeline.append((round(now, 4), cursor, published, rss))
                if cursor is not None and startup is None:
                    startup = now
                    startup_cpu = process_cpu_seconds(pid)
                    startup_memory = read_memory(pid)
                if cursor is not None and cursor >= head and cursor_done is None:
                    cursor_done = now
                    # A log the catalogue does not know is stored raw and never published.
                    unknown = await scrape_metrics(http, indexer.http_url)
                    expected -= int(unknown.get("kektech_indexer_unknown_logs_total", 0))
                if cursor_done is not None and published >= expected:
                    break
                if now > within:
                    raise TimeoutError(
                        f"catch-up not done after {within:.0f}s (cursor {cursor} of {head},"
                        f" published {published} of {expected}):\n{indexer.log_text()[-4000:]}"
                    )
                await asyncio.sleep(POLL)
            cpu = meter.spent()
            memory = read_memory(pid)
            metrics = await scrape_metrics(http, indexer.http_url)
    finally:
        if profiler is not None:
            profiler.stop()
    assert startup is not None
    return CatchUp(
        seconds=now,
        startup_seconds=startup,
        cursor_seconds=cursor_done,
        events=published,
        blocks=head - first_block + 1,
        memory_kb=memory,
        startup_memory_kb=startup_memory,
        cpu_seconds=cpu,
        startup_cpu_seconds=startup_cpu,
        metrics=metrics,
        timeline=timeline,
    )
