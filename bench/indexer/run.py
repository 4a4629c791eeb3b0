"""`python -m bench.indexer.run`: the indexer benchmark of the issue, end to end.

On fresh local services (Postgres with fsync on, as in production; Redis; anvil), generate a
chain of at least --events KEKTECH events, then measure:
1. the fetch-only floor: the same logs and headers through the indexer's RPC layer alone, in
   fewer and larger requests than the indexer makes (bench/README.md, step 2);
2. catch-up: a real `python -m indexer` on an empty database until all is stored and published;
3. live latency: blocks mined one by one, from `evm_mine` to the first Pub/Sub message;
4. the indexer's RSS after catch-up and after the live phase.
Generation is timed but not part of the figures. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis.asyncio as aioredis

from bench.indexer.catchup import PySpy, measure_catch_up
from bench.indexer.floor import measure_floor
from bench.indexer.live import TimedChain, measure_live, settle_writes
from bench.indexer.proc import read_memory
from bench.indexer.report import Result, render, write_json
from devnet.anvil_node import Anvil
from devnet.chain import deploy
from devnet.driver import ActivityDriver
from devnet.postgres_server import Postgres
from devnet.process import REPO_ROOT, ServiceError, interrupt_on_stop_signals
from devnet.redis_server import Redis
from devnet.services import LocalServices
from shared.indexer_settings import IndexerSettings
from tests.support.indexer_process import IndexerProcess, indexer_env
from tests.support.rpc_proxy import RpcFaultProxy
from tests.support.tcp_proxy import TcpProxy

STREAM_KEY = "kektech:events"
CATCH_UP_TIMEOUT = 900.0
# Results go outside the repository by default.
TMP = Path(tempfile.gettempdir())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.indexer.run",
        description="Benchmark the indexer: catch-up throughput against the fetch-only floor, "
        "live latency to Redis, and memory.",
    )
    parser.add_argument("--events", type=int, default=50_000, help="events to generate")
    parser.add_argument("--txs-per-block", type=int, default=20, help="when generating")
    parser.add_argument("--live-samples", type=int, default=200, help="blocks in the live phase")
    parser.add_argument("--live-txs-per-block", type=int, default=1, help="in the live phase")
    parser.add_argument("--poll-interval", type=float, default=0.25, help="indexer POLL_INTERVAL")
    parser.add_argument("--seed", type=int, default=1, help="activity seed")
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="start the live phase without a CHECKPOINT and sync(2) after the catch-up",
    )
    parser.add_argument("--floor-repeats", type=int, default=3, help="fetch-only passes")
    parser.add_argument(
        "--postgres",
        choices=("durable", "fast"),
        default="durable",
        help="durable: fsync on, as in production (default); fast: fsync off, as in the tests",
    )
    parser.add_argument(
        "--py-spy",
        metavar="BINARY",
        default=None,
        help="profile the indexer during catch-up with this py-spy (timings are then perturbed)",
    )
    parser.add_argument("--profile-out", type=Path, default=TMP / "kektech-indexer-profile.txt")
    parser.add_argument(
        "--indexer-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra indexer setting, e.g. LOGS_RANGE_MAX=2000 (repeatable)",
    )
    parser.add_argument(
        "--live-rpc-latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="the indexer reaches anvil through a proxy that, in the live phase, answers each "
        "request this much later (a remote RPC's round trip); the floor is not affected",
    )
    parser.add_argument(
        "--live-db-latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="the indexer reaches Postgres through a TCP proxy that, in the live phase, adds "
        "this much to every round trip (a remote database such as Supabase)",
    )
    parser.add_argument(
        "--keep-indexer-log", action="store_true", help="keep the indexer's log file and say where"
    )
    parser.add_argument("--out", type=Path, default=TMP / "kektech-indexer-bench.json")
    args = parser.parse_args(argv)
    if args.events < 1 or args.live_samples < 2 or args.floor_repeats < 1:
        parser.error("--events >= 1, --live-samples >= 2 and --floor-repeats >= 1 are required")
    if args.live_rpc_latency < 0 or args.live_db_latency < 0:
        parser.error("--live-rpc-latency and --live-db-latency must not be negative")
    if any("=" not in item for item in args.indexer_env):
        parser.error("--indexer-env takes NAME=VALUE")
    return args


def production_overrides(args: argparse.Namespace) -> dict[str, str]:
    """Indexer settings on top of the test harness's: production defaults where it shortens."""
    fields = IndexerSettings.model_fields
    settings = {
        "POLL_INTERVAL": str(args.poll_interval),
        "LOG_LEVEL": "WARNING",
        # The harness shortens these for fast tests; a benchmark runs what production runs.
        "LEASE_TTL": str(fields["lease_ttl"].default),
        "RPC_TIMEOUT": str(fields["rpc_timeout"].default),
    }
    settings.update(item.split("=", 1) for item in args.indexer_env)
    return settings


@contextlib.contextmanager
def services(*, durable: bool) -> Iterator[LocalServices]:
    """Like devnet.services.local_services, but with the Postgres durability chosen."""
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(Postgres(durable=durable))
        redis = stack.enter_context(Redis())
        anvil = stack.enter_context(Anvil())
        yield LocalServices(postgres=postgres, redis=redis, anvil=anvil)


def service_pids(local: LocalServices) -> dict[str, int]:
    pids = {"postgres": local.postgres.pid, "redis": local.redis.pid, "anvil": local.anvil.pid}
    return {name: pid for name, pid in pids.items() if pid is not None}


def _git(*argv: str) -> str:
    done = subprocess.run(["git", *argv], cwd=REPO_ROOT, capture_output=True, check=False)
    return done.stdout.decode().strip()


def environment(args: argparse.Namespace, local: LocalServices) -> dict[str, object]:
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        # Uncommitted changes to what is measured make the figures unreproducible: say so.
        "dirty": bool(_git("status", "--porcelain", "--", "indexer", "shared")),
        "postgres": "durable (fsync on)" if args.postgres == "durable" else "fast (fsync off)",
        "postgres_data": str(local.postgres.workdir),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
        "profiled": args.py_spy is not None,
    }


async def bench(args: argparse.Namespace, local: LocalServices) -> Result:
    """Generate the chain, then measure floor, catch-up and live phases."""
    async with TimedChain(local.anvil.rpc_url) as chain, contextlib.AsyncExitStack() as stack:
        deployment = await deploy(chain)
        driver = ActivityDriver(chain, deployment, seed=args.seed, txs_per_block=args.txs_per_block)
        print(f"generating >= {args.events:,} events ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        await driver.cover_all_events()
        await driver.run(events=args.events)
        generation = time.perf_counter() - started
        head = await chain.block_number()
        chain_info = {
            "blocks": head - deployment.block + 1,
            "head": head,
            "start_block": deployment.block,
            "driver_events": driver.stats.events,
            "transactions": driver.stats.transactions,
            "txs_per_block": args.txs_per_block,
            "generation_seconds": generation,
        }
        print(f"generated: {driver.stats} in {generation:.1f} s", file=sys.stderr, flush=True)

        env = indexer_env(
            database_url=local.postgres.url,
            redis_url=local.redis.url,
            rpc_url=local.anvil.rpc_url,
            deployment=deployment,
            stream_key=STREAM_KEY,
            **production_overrides(args),
        )
        # Exactly the indexer's settings (model_validate reads neither os.environ nor .env).
        settings = IndexerSettings.model_validate(env)
        if settings.confirmations:
            # The indexer stays CONFIRMATIONS blocks behind the head: empty blocks on top let
            # it index the whole generated chain, which is what the floor fetches and what
            # the catch-up waits for (`head` stays the last generated block).
            await chain.mine_empty(settings.confirmations)
        print("fetch-only floor ...", file=sys.stderr, flush=True)
        floor = await measure_floor(settings, head=head, repeats=args.floor_repeats)

        print("catch-up ...", file=sys.stderr, flush=True)
        # Read now: the indexer runs the code checked out when it is spawned.
        machine = environment(args, local)
        rpc_proxy = db_proxy = None
        if args.live_rpc_latency:
            rpc_proxy = await stack.enter_async_context(RpcFaultProxy(local.anvil.rpc_url, seed=0))
            env = {**env, "RPC_PROVIDER_URL": rpc_proxy.url}
        if args.live_db_latency:
            db_proxy = await stack.enter_async_context(TcpProxy(local.postgres.port))
            database_url = f"postgresql://{local.postgres.user}@127.0.0.1:{db_proxy.port}/kektech"
            env = {**env, "DATABASE_URL": database_url}
        indexer = IndexerProcess(env)
        profiler = PySpy(args.py_spy, args.profile_out) if args.py_spy else None
        try:
            async with aioredis.Redis.from_url(local.redis.url) as redis:
                catch_up = await measure_catch_up(
                    indexer,
                    redis,
                    stream_key=STREAM_KEY,
                    first_block=deployment.block,
                    head=head,
                    expected_events=floor.logs,
                    within=CATCH_UP_TIMEOUT,
                    services=service_pids(local),
                    profiler=profiler,
                )
            print("live ...", file=sys.stderr, flush=True)
            settled = None if args.no_settle else await settle_writes(local.postgres.url)
            if rpc_proxy is not None:
                rpc_proxy.delay = args.live_rpc_latency
            if db_proxy is not None:
                db_proxy.delay = args.live_db_latency
            live = await measure_live(
                driver,
                chain,
                local.redis.url,
                samples=args.live_samples,
                txs_per_block=args.live_txs_per_block,
                seed=args.seed,
                settle_seconds=settled,
                confirmations=settings.confirmations,
            )
            assert indexer.proc is not None
            memory = read_memory(indexer.proc.pid)
            # In a thread: the proxies live on this loop, and the stop goes through them.
            exit_code = await asyncio.to_thread(indexer.stop)
        except BaseException:
            print(f"indexer log kept at {indexer.log_path}", file=sys.stderr)
            raise
        finally:
            indexer.kill()
        if args.keep_indexer_log:
            print(f"indexer log: {indexer.log_path}", file=sys.stderr)
        else:
            shutil.rmtree(indexer.log_path.parent, ignore_errors=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    config["indexer_settings"] = " ".join(f"{k}={v}" for k, v in production_overrides(args).items())
    return Result(
        config=config,
        environment=machine,
        chain=chain_info,
        floor=floor,
        catch_up=catch_up,
        live=live,
        memory_after_live_kb=memory,
        indexer_exit_code=exit_code,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM and SIGHUP stop it as Ctrl-C does: the indexer and the services are stopped.
    interrupt_on_stop_signals()
    try:
        with services(durable=args.postgres == "durable") as local:
            result = asyncio.run(bench(args, local))
    except ServiceError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    print(render(result))
    write_json(args.out, result)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
