"""Throwaway local services on loopback: Postgres, Redis and anvil.

Used by the pytest fixtures, the demo (`python -m devnet`) and the benchmarks. Each service
runs as a child process on a free 127.0.0.1 port with its files in a temporary directory that
is removed on stop. Children get a parent-death signal so a killed test run leaves nothing
behind, and every service stops cleanly on Ctrl-C through the context managers (on SIGTERM
and SIGHUP too in a program that calls `interrupt_on_stop_signals`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from devnet.anvil_node import Anvil
from devnet.postgres_server import Postgres
from devnet.process import Service
from devnet.redis_server import Redis


@dataclass
class LocalServices:
    """Postgres, Redis and anvil started together and stopped together."""

    postgres: Postgres
    redis: Redis
    anvil: Anvil

    def close(self) -> None:
        for service in (self.anvil, self.redis, self.postgres):
            service.close()


@contextlib.contextmanager
def local_services(*, anvil_block_time: float | None = None) -> Iterator[LocalServices]:
    """Start Postgres, Redis and anvil; stop them all on exit, Ctrl-C included."""
    started: list[Service] = []
    try:
        postgres = Postgres()
        started.append(postgres)
        postgres.start()
        redis = Redis()
        started.append(redis)
        redis.start()
        anvil = Anvil(block_time=anvil_block_time)
        started.append(anvil)
        anvil.start()
        yield LocalServices(postgres=postgres, redis=redis, anvil=anvil)
    finally:
        for service in reversed(started):
            service.close()
