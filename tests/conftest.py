"""Fixtures that start real services on loopback: Postgres, Redis and anvil."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings

from devnet.anvil_node import Anvil
from devnet.chain import Deployment, DevChain, deploy
from devnet.postgres_server import PgBouncer, Postgres
from devnet.redis_server import Redis

_database_names = itertools.count()

# Timing belongs to the benchmarks, not to tests: no per-example deadline, and slow input
# generation is no failure (the first st.text() of a run builds Hypothesis's Unicode tables,
# which took 3 s on a loaded machine).
settings.register_profile("kektech", deadline=None, suppress_health_check=[HealthCheck.too_slow])
# In CI (CI set, as CI services and .ci/run do) the inputs are the same every run, derived from
# each test: a change is blocked by what it broke, not by an input that run happened to draw.
# Local runs keep drawing new inputs, to find what CI's fixed ones miss.
settings.register_profile("kektech-ci", settings.get_profile("kektech"), derandomize=True)
settings.load_profile("kektech-ci" if os.environ.get("CI") else "kektech")

_run_loop: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(scope="session", autouse=True)
async def _remember_run_loop() -> AsyncIterator[None]:
    """The run's event loop (one per session), for the timeout report below."""
    _run_loop.append(asyncio.get_running_loop())
    yield
    _run_loop.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On pytest-timeout's failure, add where each pending asyncio task was waiting: its
    traceback shows only the loop's select(), not which await of the test never finished."""
    report = yield
    timed_out = call.excinfo is not None and "Timeout (>" in str(call.excinfo.value)
    if timed_out and _run_loop:
        stacks = io.StringIO()
        for task in asyncio.all_tasks(_run_loop[0]):
            task.print_stack(file=stacks)
        report.sections.append(("asyncio tasks pending at the timeout", stacks.getvalue()))
    return report


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One throwaway Postgres cluster for the whole run."""
    with Postgres() as server:
        yield server


@pytest.fixture
def database_url(postgres: Postgres) -> Iterator[str]:
    """A fresh, empty database for one test."""
    name = f"test_{os.getpid()}_{next(_database_names)}"
    yield postgres.create_database(name)
    postgres.drop_database(name)


@pytest.fixture(scope="session")
def pgbouncer(postgres: Postgres) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the test cluster (like Supabase's pooler)."""
    with PgBouncer(postgres) as bouncer:
        yield bouncer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Redis]:
    """One Redis server for the whole run; tests use their own key prefixes or flush."""
    with Redis() as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: Redis) -> AsyncIterator[aioredis.Redis]:
    """A client of the run's Redis server, closed after the test."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def anvil() -> Iterator[Anvil]:
    """A fresh dev chain (chain id 32323, mines only on request) for one test."""
    with Anvil() as chain:
        yield chain


@pytest.fixture
async def dev_chain(anvil: Anvil) -> AsyncIterator[DevChain]:
    """An RPC session to the test's dev chain."""
    async with DevChain(anvil.rpc_url) as chain:
        yield chain


@pytest.fixture
async def deployment(dev_chain: DevChain) -> Deployment:
    """The KEKTECH test contracts deployed on the test's dev chain."""
    return await deploy(dev_chain)


@pytest.fixture
def services_tmpdir() -> Iterator[Path]:
    """A TMPDIR for a program that starts local services, to look at only its temp dirs.

    Not in tmp_path: Postgres, run as an unprivileged user under root, must reach its own.
    """
    temp = Path(tempfile.mkdtemp(prefix="kektech-test-services-"))
    temp.chmod(0o711)
    yield temp
    shutil.rmtree(temp, ignore_errors=True)
