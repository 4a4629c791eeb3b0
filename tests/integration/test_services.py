"""The local services harness starts real servers on loopback and cleans up after them."""

from __future__ import annotations

import os
import pwd
import socket
import urllib.request
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from devnet.anvil_node import Anvil
from devnet.postgres_server import Postgres
from devnet.process import UNPRIVILEGED_USER, ServiceError, free_port
from devnet.redis_server import Redis
from tests.support.database import connected


async def test_postgres_runs_unprivileged_and_accepts_connections(postgres: Postgres) -> None:
    """The cluster answers on 127.0.0.1 and its server process is not root."""
    async with connected(postgres.url) as conn:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
    assert postgres.pid is not None
    assert os.stat(f"/proc/{postgres.pid}").st_uid != 0


def test_postgres_runs_with_its_users_group(postgres: Postgres) -> None:
    """Started as root, the server runs as the unprivileged user with that user's group and no
    supplementary groups (not root's group 0); otherwise as the current user and group."""
    assert postgres.pid is not None
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{postgres.pid}/status").read_text().splitlines()
    )
    uids, gids = ({int(v) for v in status[key].split()} for key in ("Uid", "Gid"))
    if os.geteuid() == 0:
        user = pwd.getpwnam(UNPRIVILEGED_USER)
        assert (uids, gids) == ({user.pw_uid}, {user.pw_gid})
        assert status["Groups"].split() == []
    else:
        assert (uids, gids) == ({os.getuid()}, {os.getgid()})


async def test_fresh_databases_are_isolated(database_url: str, postgres: Postgres) -> None:
    """Each test gets its own empty database."""
    async with connected(database_url) as conn:
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
    assert tables == 0
    assert database_url != postgres.url


async def test_redis_keeps_its_data_across_a_restart() -> None:
    """A stopped and restarted Redis keeps what it had (append-only file) on the same port."""
    with Redis() as server:
        async with aioredis.from_url(server.url) as client:
            await client.set("k", "v")
        server.stop()
        assert not server.running
        server.start()
        async with aioredis.from_url(server.url) as client:
            assert await client.get("k") == b"v"


def test_anvil_runs_the_kektech_chain_id(anvil: Anvil) -> None:
    """anvil reports chain id 32323 and its files vanish on close."""
    # Read into a name: after `assert anvil.running` mypy keeps the property narrowed to True
    # across close(), so it would take `assert not anvil.running` to always fail.
    started = anvil.running
    assert started
    assert _rpc(anvil, "eth_chainId", []) == hex(32323)
    workdir = anvil.workdir
    anvil.close()
    assert not anvil.running
    assert not workdir.exists()


def test_anvil_leaves_no_state_files_behind(anvil: Anvil) -> None:
    """Past its in-memory limit anvil writes block states under ~/.foundry/anvil/tmp and
    leaves them there when stopped (79 GB on the development machine after two days of
    benchmarks); the harness's anvil keeps them in its workdir, which close() removes."""
    shared = Path.home() / ".foundry" / "anvil" / "tmp"
    before = set(shared.iterdir()) if shared.exists() else set()
    _rpc(anvil, "anvil_mine", [hex(600)])  # enough blocks for anvil to go to disk
    anvil.close()
    after = set(shared.iterdir()) if shared.exists() else set()
    assert after - before == set()


def _rpc(anvil: Anvil, method: str, params: list[object]) -> object:
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    request = urllib.request.Request(  # noqa: S310 - the loopback URL of the harness
        anvil.rpc_url, data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        return orjson.loads(response.read())["result"]


def test_free_ports_are_outside_the_ephemeral_range() -> None:
    """A port handed out by free_port() is not one the kernel may give an outgoing
    connection as its source port meanwhile (that race made a test's bind fail with
    EADDRINUSE): it lies below the ephemeral range, and it is free."""
    low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= port < low for port in ports), ports
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_free_ports_picked_before_any_is_bound_are_all_different() -> None:
    """A test picks several ports before its services bind them (a broadcaster's two, an
    edge's six): drawn at random and checked free one by one, two of them were sometimes
    the same port (about one CI run in a hundred)."""
    ports = [free_port() for _ in range(2000)]  # at random, some 80 repeats expected
    assert len(set(ports)) == len(ports)


def test_a_service_that_fails_to_start_leaves_nothing_behind() -> None:
    """`with Redis(port=taken)` raises ServiceError, and the temp dir made for it is gone."""
    with socket.create_server(("127.0.0.1", 0)) as blocker:
        server = Redis(port=blocker.getsockname()[1])
        workdir = server.workdir
        assert workdir.exists()
        with pytest.raises(ServiceError), server:
            pass
    assert not server.running
    assert not workdir.exists()
