"""`python -m devnet`: the whole system on local defaults, with simulated KEKTECH activity."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from devnet.chain import DevChain, deploy
from devnet.driver import ActivityDriver
from devnet.services import LocalServices, ServiceError, local_services


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devnet",
        description="Start local Postgres, Redis and anvil, deploy the KEKTECH test contracts "
        "and generate activity until Ctrl-C.",
    )
    parser.add_argument("--seed", type=int, default=1, help="RNG seed of the activity (default 1)")
    parser.add_argument(
        "--block-interval", type=float, default=1.0, help="seconds between blocks (default 1)"
    )
    parser.add_argument("--txs-per-block", type=int, default=4, help="transactions per block")
    parser.add_argument(
        "--blocks", type=int, default=None, help="stop after this many random blocks"
    )
    return parser.parse_args(argv)


async def simulate(services: LocalServices, args: argparse.Namespace) -> None:
    """Deploy the contracts, emit every event once, then keep producing blocks."""
    async with DevChain(services.anvil.rpc_url) as chain:
        deployment = await deploy(chain)
        print("deployed:", file=sys.stderr)
        for name, value in deployment.as_env().items():
            print(f"  {name}={value}", file=sys.stderr)
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
    try:
        with local_services() as services:
            print(
                "local services:\n"
                f"  DATABASE_URL={services.postgres.url}\n"
                f"  REDIS_URL={services.redis.url}\n"
                f"  RPC_PROVIDER_URL={services.anvil.rpc_url}",
                file=sys.stderr,
            )
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(simulate(services, args))
    except ServiceError as exc:
        print(f"devnet: {exc}", file=sys.stderr)
        return 1
    return 0
