"""`python -m devnet`: the whole system on local defaults, with simulated KEKTECH activity."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from devnet.chain import Deployment, DevChain, deploy
from devnet.driver import ActivityDriver
from devnet.process import ServiceError, die_with_parent, free_port, interrupt_on_stop_signals
from devnet.services import LocalServices, local_services

STOP_GRACE = 10.0
WATCH_INTERVAL = 0.5  # seconds between looks at whether the services still run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devnet",
        description="Start local Postgres, Redis and anvil, deploy the KEKTECH test contracts, "
        "run the indexer and the broadcaster against them and generate activity until Ctrl-C.",
    )
    parser.add_argument("--seed", type=int, default=1, help="RNG seed of the activity (default 1)")
    parser.add_argument(
        "--block-interval", type=float, default=1.0, help="seconds between blocks (default 1)"
    )
    parser.add_argument("--txs-per-block", type=int, default=4, help="transactions per block")
    parser.add_argument(
        "--blocks", type=int, default=None, help="stop after this many random blocks"
    )
    parser.add_argument(
        "--chain-only",
        action="store_true",
        help="only the local services and the chain activity, without the indexer and broadcaster",
    )
    parser.add_argument(
        "--ws-port",
        type=int,
        default=None,
        help="port of the broadcaster's WebSocket server (default: a free port)",
    )
    return parser.parse_args(argv)


def start_service(module: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start `python -m <module>` with the local services' settings; it logs to our stderr.

    `cwd`: an empty directory. The services read `.env` from their working directory, and
    one where the demo is started (the checkout's, written for a server) would move them off
    the settings the demo announces. It gets SIGTERM (a clean stop) if we die without
    stopping it, e.g. by SIGKILL.
    """
    return subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=cwd,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )


async def watch(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """Return never; raise ServiceError once one of the services has ended."""
    while True:
        for name, process in processes.items():
            code = process.poll()
            if code is not None:
                raise ServiceError(f"the {name} exited with code {code} (its log is above)")
        await asyncio.sleep(WATCH_INTERVAL)


async def listening(port: int) -> bool:
    """Whether something takes connections on the loopback port."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def announce(env: dict[str, str]) -> None:
    """Print the services' addresses once each takes connections, then wait for ever (the
    demo's end is drive's or watch's)."""
    ports = [int(env[name]) for name in ("INDEXER_HTTP_PORT", "WS_PORT", "BROADCASTER_HTTP_PORT")]
    for port in ports:
        # Another process's port: no event to await, so looked at until it answers.
        while not await listening(port):  # noqa: ASYNC110
            await asyncio.sleep(WATCH_INTERVAL / 5)
    indexer = f"http://127.0.0.1:{env['INDEXER_HTTP_PORT']}"
    broadcaster = f"http://127.0.0.1:{env['BROADCASTER_HTTP_PORT']}"
    print(
        "services answering:\n"
        f"  WebSocket: ws://127.0.0.1:{env['WS_PORT']}/ws "
        '(send {"type":"subscribe","channel":"events:*"})\n'
        f"  indexer: health {indexer}/healthz, caught up {indexer}/ready,"
        f" metrics {indexer}/metrics\n"
        f"  broadcaster: health {broadcaster}/healthz, metrics {broadcaster}/metrics",
        file=sys.stderr,
    )
    await asyncio.Event().wait()


async def first_of(*work: Coroutine[Any, Any, None]) -> None:
    """Run `work` together until the first one ends (its error raised); cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()


def stop_services(processes: list[subprocess.Popen[bytes]]) -> None:
    """Stop services the way PM2 does: SIGINT to all, then SIGKILL after a grace period."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def simulate(services: LocalServices, args: argparse.Namespace) -> None:
    """Deploy the contracts, emit every event once, then keep producing blocks."""
    async with DevChain(services.anvil.rpc_url) as chain:
        deployment = await deploy(chain)
        print("deployed:", file=sys.stderr)
        for name, value in deployment.as_env().items():
            print(f"  {name}={value}", file=sys.stderr)
        if args.chain_only:
            await drive(chain, deployment, args)
            return
        env = {
            "DATABASE_URL": services.postgres.url,
            "REDIS_URL": services.redis.url,
            "RPC_PROVIDER_URL": services.anvil.rpc_url,
            "INDEXER_HTTP_PORT": str(free_port()),
            "WS_PORT": str(args.ws_port or free_port()),
            "BROADCASTER_HTTP_PORT": str(free_port()),
            **deployment.as_env(),
        }
        with tempfile.TemporaryDirectory(prefix="kektech-devnet-") as workdir:
            processes = {
                name: start_service(name, env, Path(workdir)) for name in ("indexer", "broadcaster")
            }
            try:
                await first_of(drive(chain, deployment, args), watch(processes), announce(env))
            finally:
                stop_services(list(processes.values()))


async def drive(chain: DevChain, deployment: Deployment, args: argparse.Namespace) -> None:
    """Emit every event once, then keep mining blocks of random activity."""
    driver = ActivityDriver(chain, deployment, seed=args.seed, txs_per_block=args.txs_per_block)
    await driver.cover_all_events()
    print(f"every KEKTECH event emitted once: {driver.stats}", file=sys.stderr)
    if args.blocks is not None:
        await driver.run(blocks=args.blocks, block_interval=args.block_interval)
        print(f"done: {driver.stats}", file=sys.stderr)
        return
    while True:
        await driver.run(blocks=10, block_interval=args.block_interval)
        print(f"activity: {driver.stats}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM and SIGHUP stop it as Ctrl-C does: the services and their temp dirs go too.
    interrupt_on_stop_signals()
    try:
        with contextlib.suppress(KeyboardInterrupt), local_services() as services:
            print(
                "local services:\n"
                f"  DATABASE_URL={services.postgres.url}\n"
                f"  REDIS_URL={services.redis.url}\n"
                f"  RPC_PROVIDER_URL={services.anvil.rpc_url}",
                file=sys.stderr,
            )
            asyncio.run(simulate(services, args))
    except ServiceError as exc:
        print(f"devnet: {exc}", file=sys.stderr)
        return 1
    return 0
