"""`python -m bench.broadcaster.run`: the broadcaster benchmark of the issue, end to end.

For each scenario: a fresh Redis (devnet.redis_server.Redis), the server under test as a
subprocess (`python -m broadcaster`, or the naive websockets.broadcast() baseline), the Node
load generator (bench/broadcaster/loadgen.mjs, on node:net) opening N clients, and the
publisher (bench/broadcaster/publisher.py) writing stamped events at a rate. Measured:
publish-to-receive latency p50/p99 over the deliveries in the window to every
(clients/100)-th client (every delivery is counted and checked), server CPU per delivery
(/proc utime+stime), server RSS per idle connection, handshake times, and the CPU, event-loop
delay and longest GC pause of the generator itself (it shares the 2 cores with the server).
Prints a table; --json writes the rows.

    python -m bench.broadcaster.run                      # every scenario, both servers
    python -m bench.broadcaster.run --server broadcaster --scenario fanout-1k
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from bench.broadcaster.publisher import last_seq
from devnet.process import REPO_ROOT, die_with_parent, free_port, interrupt_on_stop_signals
from devnet.redis_server import Redis

LOADGEN = Path(__file__).with_name("loadgen.mjs")
STREAM_KEY = "bench:events"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# After the window, how long deliveries may still come in (a server behind drains its
# backlog), and how long without a new one ends the wait early.
SETTLE_TIMEOUT = 30.0
SETTLE_QUIET = 3.0
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Scenario:
    name: str
    clients: int
    rate: float  # events per second (0: connect and idle only)
    mode: str = "events"  # every client on events:*, or "markets": client i on market i % markets
    markets: int = 1000
    concurrency: int | None = None  # handshakes in flight (None: all at once)
    slow: int = 0  # clients that stop reading after subscribing
    pad: int = 0  # extra envelope bytes
    send_buffer: int | None = None  # WS_SEND_BUFFER_BYTES for this run
    duration: float | None = None  # measured seconds, instead of --duration
    goal: str = ""


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("fanout-1k", 1000, 100, goal="p99 <= 20 ms, <= 5 us/delivery"),
        Scenario("fanout-10k", 10_000, 10, goal="p99 <= 150 ms, <= 7 us/delivery"),
        Scenario(
            "markets-10k",
            10_000,
            1000,
            mode="markets",
            goal="p99 <= 15 ms; CPU/event flat in non-matching clients",
        ),
        Scenario(
            "markets-1k",
            1000,
            1000,
            mode="markets",
            markets=100,
            goal="10 recipients per event like markets-10k, 9k fewer non-matching clients",
        ),
        Scenario("storm-10k", 10_000, 0, goal="all connected <= 3 s, p99 handshake <= 100 ms"),
        Scenario(
            "storm-10k-w200",
            10_000,
            0,
            concurrency=200,
            goal="same, 200 handshakes in flight (clients with jittered backoff)",
        ),
        Scenario(
            "fat-500",
            500,
            100,
            pad=3000,
            send_buffer=262_144,
            duration=25,
            goal="baseline for slow-500",
        ),
        Scenario(
            "slow-500",
            500,
            100,
            pad=3000,
            slow=1,
            send_buffer=262_144,
            # The kernel buffers megabytes for the stalled socket (up to tcp_wmem's max, 4 MiB,
            # plus the client's window) before the server's 256 KiB fill: at ~390 KB/s the
            # cut-off came 6.5-7 s after the client stopped reading, inside the 25 s window.
            duration=25,
            goal="one client stops reading: same p99 as fat-500, it gets 4008",
        ),
    )
}


@dataclass(frozen=True)
class ServerOptions:
    """How the server under test is started."""

    root: Path = REPO_ROOT  # the checkout it runs from (another one: compare two versions)
    env: dict[str, str] = field(default_factory=dict)  # extra settings, e.g. WS_REUSE_PORT
    profile: Path | None = None  # run it under cProfile, writing <kind>-<scenario>.prof here
    instances: int = 1  # broadcaster processes sharing the port with WS_REUSE_PORT


@dataclass
class Row:
    server: str
    transport: str
    scenario: str
    clients: int
    rate: float
    values: dict[str, Any] = field(default_factory=dict)

    def fail(self, message: str) -> None:
        """Mark the row failed: its figures do not measure the scenario as it says."""
        error = self.values.get("error")
        self.values["error"] = f"{error}; {message}" if error else message


def raise_fd_limit() -> None:
    """10k clients need 10k descriptors in the generator and in the server."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (all CPUs; /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rss_kb(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB


def http_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
        body = orjson.loads(response.read())
    assert isinstance(body, dict)
    return body


@dataclass
class Servers:
    """The server process(es) under test: one, or several sharing the port (SO_REUSEPORT)."""

    procs: list[asyncio.subprocess.Process]
    port: int
    ops_ports: list[int]

    def cpu(self) -> float:
        return sum(cpu_seconds(proc.pid) for proc in self.procs)

    def rss(self) -> int:
        return sum(rss_kb(proc.pid) for proc in self.procs)

    def metric(self, name: str) -> float:
        """A metric summed over the instances (0 when absent)."""
        total = 0.0
        for ops in self.ops_ports:
            url = f"http://127.0.0.1:{ops}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                for line in response.read().decode().splitlines():
                    if line.startswith(name + " ") or line.startswith(name + "{"):
                        total += float(line.rpartition(" ")[2])
        return total


@contextlib.asynccontextmanager
async def server_process(
    kind: str,
    redis: Redis,
    scenario: Scenario,
    logdir: Path,
    unix: str | None,
    options: ServerOptions,
) -> AsyncIterator[Servers]:
    instances = options.instances if kind == "broadcaster" else 1
    servers = Servers([], free_port(), [free_port() for _ in range(instances)])
    try:
        for number, ops in enumerate(servers.ops_ports):
            env = {
                "PATH": os.environ.get("PATH", ""),
                "REDIS_URL": redis.url,
                "REDIS_STREAM_KEY": STREAM_KEY,
                "WS_PORT": str(servers.port),
                "BROADCASTER_HTTP_PORT": str(ops),
                "WS_MAX_CONNECTIONS_PER_IP": "100000",  # every bench client comes from 127.0.0.1
                "LOG_LEVEL": "WARNING",
                "LOG_FORMAT": "json",
            }
            if instances > 1:
                env["WS_REUSE_PORT"] = "true"
            if scenario.send_buffer:
                env["WS_SEND_BUFFER_BYTES"] = str(scenario.send_buffer)
            if unix:
                env["WS_UNIX_SOCKET"] = unix
            env.update(options.env)
            name = f"{kind}-{scenario.name}" + (f"-{number}" if instances > 1 else "")
            servers.procs.append(await _spawn(kind, name, env, logdir, options))
        for proc, ops in zip(servers.procs, servers.ops_ports, strict=True):
            await _started(kind, proc, servers.port, ops, logdir)
        yield servers
    finally:
        for proc in servers.procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in servers.procs:
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _spawn(
    kind: str, name: str, env: dict[str, str], logdir: Path, options: ServerOptions
) -> asyncio.subprocess.Process:
    module = "broadcaster" if kind == "broadcaster" else "bench.broadcaster.naive_server"
    command = [sys.executable, "-m", module]
    if options.profile is not None:
        # cProfile writes its file when the server exits on SIGTERM (it stops cleanly).
        out = options.profile / f"{name}.prof"
        command = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", module]
    with (logdir / f"{name}.log").open("wb") as log:
        return await asyncio.create_subprocess_exec(
            *command,
            cwd=options.root,
            env=env,
            stdout=log,
            stderr=log,
            preexec_fn=die_with_parent,
        )


async def _started(
    kind: str, proc: asyncio.subprocess.Process, port: int, ops: int, logdir: Path
) -> None:
    deadline = time.monotonic() + 15
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"{kind} exited with {proc.returncode}; see {logdir}")
        with contextlib.suppress(OSError):
            if kind == "naive":
                with socket_to(port):
                    return
            elif http_json(f"http://127.0.0.1:{ops}/healthz").get("seq") is not None:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind} did not start; see {logdir}")
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def socket_to(port: int) -> Any:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        yield sock


class LoadGen:
    """The Node load generator, driven line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, url: str, scenario: Scenario) -> LoadGen:
        config = {
            "url": url,
            "clients": scenario.clients,
            "mode": scenario.mode,
            "markets": scenario.markets,
            "concurrency": scenario.concurrency,
            "slow": scenario.slow,
            # Latency is read on every sampleEvery-th client (all of them count events).
            "sampleEvery": max(1, scenario.clients // 100),
        }
        proc = await asyncio.create_subprocess_exec(
            "node",
            "--max-old-space-size=4096",
            str(LOADGEN),
            orjson.dumps(config).decode(),
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            limit=2**20,
            preexec_fn=die_with_parent,
        )
        return cls(proc)

    async def line(self, within: float = 120) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(within):
            raw = await self.proc.stdout.readline()
        if not raw:
            raise RuntimeError("load generator exited")
        body = orjson.loads(raw)
        assert isinstance(body, dict)
        return body

    async def command(self, text: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.line()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"exit\n")
            with contextlib.suppress(ConnectionError):
                await self.proc.stdin.drain()
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def publish(redis: Redis, scenario: Scenario, duration: float, tick: float) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.broadcaster.publisher",
        "--redis-url",
        redis.url,
        "--key",
        STREAM_KEY,
        "--rate",
        str(scenario.rate),
        "--duration",
        str(duration),
        "--markets",
        str(scenario.markets),
        "--pad",
        str(scenario.pad),
        "--tick",
        str(tick),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:  # cancelled: the run is being stopped
            proc.kill()
            await proc.wait()
    return int(orjson.loads(out.splitlines()[-1])["published"])


async def settle_deliveries(gen: LoadGen, after: int, last: int) -> dict[str, Any]:
    """The generator's tally of the events of seqs after+1..last, once all have arrived or
    deliveries stopped coming (none for SETTLE_QUIET s; at most SETTLE_TIMEOUT s); "waited"
    is how long that took."""
    started = quiet_since = time.monotonic()
    tally = await gen.command(f"tally {after} {last}")
    while tally["missing"] and time.monotonic() - started < SETTLE_TIMEOUT:
        await asyncio.sleep(0.1)
        previous = tally["delivered"]
        tally = await gen.command(f"tally {after} {last}")
        if tally["delivered"] != previous:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE_QUIET:
            break
    return {**tally, "waited": time.monotonic() - started}


async def watch_cut_off(servers: Servers, gen: LoadGen, duration: float, row: Row) -> None:
    """Wait out the window, noting when the server cut the slow client off (4008).

    The slow client reads nothing, so it cannot see its close frame: the server's counter
    tells. The generator then starts a second latency histogram ("mark"), so the report
    shows the other clients' p99 after the cut-off as well as over the whole window.
    """
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < duration:
        if "cut_off_s" not in row.values:
            try:
                cut = servers.metric("kektech_broadcaster_slow_consumer_closes_total")
            except OSError:  # a scrape that timed out on a saturated machine: try again
                cut = 0
            if cut:
                row.values["cut_off_s"] = elapsed
                await gen.command("mark")
        await asyncio.sleep(max(0.0, min(0.25, duration - (time.monotonic() - started))))


async def run_scenario(
    kind: str,
    scenario: Scenario,
    *,
    transport: str,
    duration: float,
    warmup: float,
    tick: float,
    logdir: Path,
    options: ServerOptions,
) -> Row:
    row = Row(kind, transport, scenario.name, scenario.clients, scenario.rate)
    duration = scenario.duration or duration
    unix = str(logdir / "broadcaster.sock") if transport == "unix" else None
    with Redis() as redis:
        async with server_process(kind, redis, scenario, logdir, unix, options) as servers:
            await asyncio.sleep(0.5)
            rss_before = servers.rss()
            cpu_before = servers.cpu()
            port = servers.port
            url = f"ws+unix://{unix}:/ws" if unix else f"ws://127.0.0.1:{port}/ws"
            gen = await LoadGen.start(url, scenario)
            try:
                connected = await gen.line()
                cpu_connect = servers.cpu() - cpu_before
                gen_cpu_connect = cpu_seconds(gen.proc.pid)
                await asyncio.sleep(1.0)  # let the connection burst settle before sizing memory
                rss_idle = servers.rss()
                subscribed = connected["subscribed"]
                all_connected_ms = connected["allConnectedMs"]  # None unless all subscribed
                row.values.update(
                    connected=subscribed,
                    all_connected_s=None if all_connected_ms is None else all_connected_ms / 1000,
                    connect_closes=connected["closes"],
                    handshake_p50_ms=connected["handshakeP50Ms"],
                    handshake_p99_ms=connected["handshakeP99Ms"],
                    connect_cpu_s=cpu_connect,
                    connect_cpu_us=1e6 * cpu_connect / max(1, subscribed),
                    connect_gen_cpu_s=gen_cpu_connect,
                    rss_idle_mb=rss_idle / 1024,
                    kib_per_conn=(rss_idle - rss_before) / max(1, subscribed),
                )
                if subscribed < scenario.clients:
                    row.fail(
                        f"{subscribed} of {scenario.clients} clients subscribed"
                        f" (the others: {connected['closes']})"
                    )
                if scenario.rate:
                    await measure_deliveries(
                        kind,
                        scenario,
                        servers=servers,
                        redis=redis,
                        gen=gen,
                        row=row,
                        duration=duration,
                        warmup=warmup,
                        tick=tick,
                    )
            finally:
                await gen.stop()
    return row


async def measure_deliveries(
    kind: str,
    scenario: Scenario,
    *,
    servers: Servers,
    redis: Redis,
    gen: LoadGen,
    row: Row,
    duration: float,
    warmup: float,
    tick: float,
) -> None:
    """Publish, measure a window of `duration` s, then hold what arrived against what was
    published in the window: every event must have reached each of its recipients."""
    publisher = asyncio.create_task(
        publish(redis, scenario, warmup + duration + 0.5, tick), name="publish"
    )
    try:
        async with aioredis.Redis.from_url(redis.url) as stream:
            await asyncio.sleep(warmup)
            await gen.command("start")
            window_after = await last_seq(stream, STREAM_KEY)  # the window's events come after
            server_cpu = servers.cpu()
            gen_cpu = cpu_seconds(gen.proc.pid)
            redis_cpu = cpu_seconds(redis.pid or 0)
            machine_cpu = machine_busy_seconds()
            if scenario.slow and kind == "broadcaster":
                await watch_cut_off(servers, gen, duration, row)
            else:
                await asyncio.sleep(duration)
            report = await gen.command("report")
            server_cpu = servers.cpu() - server_cpu
            gen_cpu = cpu_seconds(gen.proc.pid) - gen_cpu
            redis_cpu = cpu_seconds(redis.pid or 0) - redis_cpu
            machine_cpu = machine_busy_seconds() - machine_cpu
            window_last = await last_seq(stream, STREAM_KEY)
        published = await publisher
    finally:
        if not publisher.done():  # the window failed: the publisher's process goes too
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
    tally = await settle_deliveries(gen, window_after, window_last)
    deliveries = report["received"]
    row.values.update(
        deliveries_per_s=deliveries / duration,
        p50_ms=report["p50Ms"],
        p99_ms=report["p99Ms"],
        max_ms=report["maxMs"],
        p99_before_cut_ms=report["p99BeforeMarkMs"],
        p99_after_cut_ms=report["p99AfterMarkMs"],
        server_cpu_pct=100 * server_cpu / duration,
        us_per_delivery=1e6 * server_cpu / deliveries if deliveries else None,
        us_per_event=1e6 * server_cpu / (scenario.rate * duration),
        gen_cpu_pct=100 * gen_cpu / duration,
        redis_cpu_pct=100 * redis_cpu / duration,
        # All processes, of 200 % on 2 CPUs: what exceeds server + generator +
        # Redis + publisher (~5-10 %) is someone else's load during the window.
        machine_cpu_pct=100 * machine_cpu / duration,
        published=published,
        window_events=tally["events"],
        expected_deliveries=tally["expected"],
        missing_deliveries=tally["missing"],
        gaps=report["gaps"],
        duplicates=report["duplicates"],
        closes=report["closes"],
        still_open=report["open"],
        gen_loop_delay_p99_ms=report["genLoopDelayP99Ms"],
        gen_loop_delay_max_ms=report["genLoopDelayMaxMs"],
        gen_gc_max_ms=report["genGcMaxMs"],
        gen_gc_total_ms=report["genGcTotalMs"],
    )
    if tally["missing"]:
        row.fail(
            f"{tally['missing']:,} of the {tally['expected']:,} deliveries of the"
            f" {tally['events']:,} events published in the window had not arrived"
            f" {tally['waited']:.1f} s after it ({tally['eventsShort']:,} events short)"
        )
    if kind == "broadcaster":
        with contextlib.suppress(OSError):
            row.values["slow_closes"] = int(
                servers.metric("kektech_broadcaster_slow_consumer_closes_total")
            )


COLUMNS = (
    ("server", "server", "{}"),
    ("transport", "via", "{}"),
    ("scenario", "scenario", "{}"),
    ("clients", "clients", "{}"),
    ("rate", "ev/s", "{:g}"),
    ("subscribed", "subscribed", "{}"),
    ("deliveries_per_s", "deliv/s", "{:,.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("max_ms", "max ms", "{:.1f}"),
    ("us_per_delivery", "us/deliv", "{:.2f}"),
    ("us_per_event", "us/event", "{:.0f}"),
    ("server_cpu_pct", "srv CPU%", "{:.0f}"),
    ("gen_cpu_pct", "gen CPU%", "{:.0f}"),
    ("gen_loop_delay_p99_ms", "gen lag p99 ms", "{:.1f}"),
    ("gen_gc_max_ms", "gen GC max ms", "{:.1f}"),
    ("redis_cpu_pct", "redis%", "{:.0f}"),
    ("machine_cpu_pct", "machine%", "{:.0f}"),
    ("all_connected_s", "conn s", "{:.2f}"),
    ("handshake_p99_ms", "hs p99 ms", "{:.0f}"),
    ("connect_cpu_s", "conn CPU s", "{:.2f}"),
    ("connect_gen_cpu_s", "gen conn CPU s", "{:.2f}"),
    ("connect_cpu_us", "us/conn", "{:.0f}"),
    ("kib_per_conn", "KiB/conn", "{:.1f}"),
    ("cut_off_s", "cut at s", "{:.1f}"),
    ("p99_before_cut_ms", "p99 before cut", "{:.2f}"),
    ("p99_after_cut_ms", "p99 after cut", "{:.2f}"),
    ("slow_closes", "4008s", "{}"),
    ("missing_deliveries", "missing", "{:,}"),
    ("gaps", "gaps", "{}"),
    ("duplicates", "dups", "{}"),
    ("closes", "closes", "{}"),
)


def render(rows: list[Row]) -> str:
    table = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        values: dict[str, Any] = {
            "server": row.server,
            "transport": row.transport,
            "scenario": row.scenario,
            "clients": row.clients,
            "rate": row.rate,
            **row.values,
        }
        if row.values.get("connected") is not None:
            values["subscribed"] = f"{row.values['connected']}/{row.clients}"
        table.append(
            ["-" if values.get(key) is None else fmt.format(values[key]) for key, _, fmt in COLUMNS]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join(
        "| "
        + " | ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        + " |"
        for line in table
    )


async def main_async(args: argparse.Namespace, logdir: Path, options: ServerOptions) -> list[Row]:
    raise_fd_limit()
    rows = []
    for name in args.scenario:
        for transport in args.transport:
            for kind in args.server:
                if kind == "naive" and transport == "unix":
                    continue  # the baseline serves TCP only
                scenario = SCENARIOS[name]
                print(f"running {kind} / {transport} / {name} ...", file=sys.stderr, flush=True)
                try:
                    row = await run_scenario(
                        kind,
                        scenario,
                        transport=transport,
                        duration=args.duration,
                        warmup=args.warmup,
                        tick=args.tick,
                        logdir=logdir,
                        options=options,
                    )
                except (RuntimeError, TimeoutError, OSError) as exc:
                    row = Row(kind, transport, name, scenario.clients, scenario.rate)
                    row.fail(str(exc))
                if "error" in row.values:
                    print(f"  failed: {row.values['error']}", file=sys.stderr)
                rows.append(row)
                print(render([row]).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broadcaster.run")
    parser.add_argument(
        "--server", nargs="+", default=["naive", "broadcaster"], choices=["naive", "broadcaster"]
    )
    parser.add_argument("--scenario", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument(
        "--transport",
        nargs="+",
        default=["tcp"],
        choices=["tcp", "unix"],
        help="how clients reach the server: loopback TCP, or WS_UNIX_SOCKET (as Nginx would)",
    )
    parser.add_argument(
        "--tick",
        type=float,
        default=0.002,
        help="seconds between the publisher's batches (events due are written together)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument(
        "--server-root", help="run the server from this copy of the repository (before/after)"
    )
    parser.add_argument(
        "--server-env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="extra settings for the server, e.g. WS_REUSE_PORT=true",
    )
    parser.add_argument("--profile", help="run the server under cProfile; .prof files go here")
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="broadcaster processes sharing the port (WS_REUSE_PORT=true) when above 1",
    )
    parser.add_argument("--logdir", help="server logs go here (default: a new temp dir)")
    args = parser.parse_args()
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="kektech-bench-broadcaster-"))
    logdir.mkdir(parents=True, exist_ok=True)
    options = ServerOptions(
        root=Path(args.server_root).resolve() if args.server_root else REPO_ROOT,
        env=dict(item.split("=", 1) for item in args.server_env),
        profile=Path(args.profile).resolve() if args.profile else None,
        instances=args.instances,
    )
    # SIGTERM and SIGHUP stop it as Ctrl-C does: the servers, the load generator, the
    # publisher and Redis are stopped on the way out.
    interrupt_on_stop_signals()
    try:
        rows = asyncio.run(main_async(args, logdir, options))
    except KeyboardInterrupt:
        print(f"interrupted; server logs in {logdir}", file=sys.stderr)
        return 130
    print(render(rows))
    failed = [row for row in rows if "error" in row.values]
    for row in failed:
        print(f"{row.server}/{row.scenario}: {row.values['error']}")
    if args.json:
        Path(args.json).write_bytes(
            orjson.dumps([row.__dict__ for row in rows], option=orjson.OPT_INDENT_2)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
