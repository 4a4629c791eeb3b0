"""ecosystem.config.js under the real PM2 (node_modules) against Postgres, Redis and anvil."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from devnet.anvil_node import Anvil
from devnet.chain import Deployment, DevChain
from devnet.driver import ActivityDriver
from devnet.redis_server import Redis
from tests.broadcaster.support import WsClient, ws_client
from tests.indexer.conftest import assert_gap_free, stored_and_published
from tests.support.indexer_process import indexer_env
from tests.support.pm2 import (
    BROADCASTER,
    ECOSYSTEM,
    INDEXER,
    Pm2,
    consecutive_free_ports,
    ecosystem_error,
    evaluate_ecosystem,
    http_json,
    kill_timeouts,
    write_dotenv,
)
from tests.support.tasks import background
from tests.support.waiting import eventually

INSTANCES = 2
# ecosystem.config.js
LISTEN_TIMEOUT = {INDEXER: 60.0, BROADCASTER: 30.0}


@dataclass
class Stack:
    pm2: Pm2
    ws_base: int
    http_base: int
    indexer_http: str
    stream_key: str

    def ws_url(self, instance: int) -> str:
        return f"ws://127.0.0.1:{self.ws_base + instance}/ws"


def stack_env(
    *,
    database_url: str,
    redis_url: str,
    rpc_url: str,
    deployment: Deployment,
    stream_key: str,
) -> dict[str, str]:
    """The .env of both apps; LOG_FORMAT unset so the services choose JSON off a TTY."""
    env = indexer_env(
        database_url=database_url,
        redis_url=redis_url,
        rpc_url=rpc_url,
        deployment=deployment,
        stream_key=stream_key,
    )
    env.pop("LOG_FORMAT")
    return env


def build_stack(tmp_path: Path, env: dict[str, str]) -> Stack:
    ws_base = consecutive_free_ports(INSTANCES)
    http_base = consecutive_free_ports(INSTANCES)
    workdir = tmp_path / "app"
    write_dotenv(workdir, env)
    pm2 = Pm2(
        tmp_path / "pm2",
        workdir=workdir,
        KEKTECH_BROADCASTER_INSTANCES=str(INSTANCES),
        KEKTECH_WS_BASE_PORT=str(ws_base),
        KEKTECH_BROADCASTER_HTTP_BASE_PORT=str(http_base),
    )
    return Stack(
        pm2=pm2,
        ws_base=ws_base,
        http_base=http_base,
        indexer_http=f"http://127.0.0.1:{env['INDEXER_HTTP_PORT']}",
        stream_key=env["REDIS_STREAM_KEY"],
    )


@pytest.fixture
def stack(
    tmp_path: Path,
    database_url: str,
    redis_server: Redis,
    anvil: Anvil,
    deployment: Deployment,
) -> Iterator[Stack]:
    """Both apps started from ecosystem.config.js; `pm2 kill` afterwards, also on failure."""
    env = stack_env(
        database_url=database_url,
        redis_url=redis_server.url,
        rpc_url=anvil.rpc_url,
        deployment=deployment,
        stream_key=f"test:pm2:{tmp_path.name}:events",
    )
    built = build_stack(tmp_path, env)
    with built.pm2:
        built.pm2.start()
        yield built


async def wait_indexed(stack: Stack, chain: DevChain, deployment: Deployment, database_url: str,
                       client: aioredis.Redis) -> list[tuple[int, dict[str, Any]]]:  # fmt: skip
    """Wait until the database equals the chain and the stream holds every event."""
    head = await chain.block_number()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60  # for the cursor and the database together

    async def cursor_at_head() -> bool:
        try:
            health = await http_json(stack.indexer_http + "/healthz")
        except OSError:
            return False
        return isinstance(health.get("cursor"), int) and health["cursor"] >= head

    await eventually(cursor_at_head, within=60, what=f"the indexer's cursor at {head}")
    return await stored_and_published(
        chain, client, stack.stream_key, database_url, deployment,
        within=max(0.0, deadline - loop.time()),
    )  # fmt: skip


def ready_lines(stack: Stack, name: str) -> list[dict[str, Any]]:
    return [line for line in stack.pm2.app_log(name) if line.get("event") == "ready"]


async def test_both_apps_go_online_only_through_their_ready_message(stack: Stack) -> None:
    """pm2 start: each process is online after writing "ready", well before listen_timeout."""
    pm2 = stack.pm2
    assert pm2.statuses(INDEXER) == ["online"]
    assert pm2.statuses(BROADCASTER) == ["online"] * INSTANCES
    assert len(ready_lines(stack, INDEXER)) == 1
    assert sorted(line["port"] for line in ready_lines(stack, BROADCASTER)) == [
        stack.ws_base + i for i in range(INSTANCES)
    ]
    for name in (INDEXER, BROADCASTER):
        assert all(line["supervisor"] == "pm2" for line in ready_lines(stack, name))
    # PM2 marks a wait_ready process online on the message or at listen_timeout, nothing else:
    # online sooner than listen_timeout after starting means the message was received.
    for name in (INDEXER, BROADCASTER):
        for process in pm2.processes(name):
            tag = rf"\[{name}:{process['pm_id']}\]"
            (started, _), *_ = pm2.daemon_events(tag + " starting")
            (online, _), *_ = pm2.daemon_events(tag + " online")
            assert (online - started).total_seconds() < LISTEN_TIMEOUT[name] / 2
    # Each instance serves its own pair of consecutive ports.
    for instance in range(INSTANCES):
        health = await http_json(f"http://127.0.0.1:{stack.http_base + instance}/healthz")
        assert health["redis"] == "up"
    assert (await http_json(stack.indexer_http + "/healthz"))["role"] == "leader"


async def test_an_app_is_launching_not_online_until_it_is_ready(
    tmp_path: Path, database_url: str, redis_server: Redis, deployment: Deployment
) -> None:
    """An indexer whose RPC never answers serves /healthz but stays `launching` in PM2."""
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = stack_env(
            database_url=database_url,
            redis_url=redis_server.url,
            rpc_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            deployment=deployment,
            stream_key=f"test:pm2:{tmp_path.name}:events",
        )
        env["RPC_TIMEOUT"] = "60"
        stack = build_stack(tmp_path, env)
        with stack.pm2 as pm2:
            starting = pm2.popen("start", str(ECOSYSTEM), "--only", INDEXER)
            try:

                async def serving() -> bool:
                    try:
                        await http_json(stack.indexer_http + "/healthz")
                    except OSError:
                        return False
                    return True

                await eventually(serving, within=30, what="the indexer's /healthz answers")
                await asyncio.sleep(1.0)  # the ready message would have come long ago
                assert pm2.statuses(INDEXER) == ["launching"]
                assert ready_lines(stack, INDEXER) == []
                assert starting.poll() is None  # `pm2 start` still waits for readiness
            finally:
                starting.kill()
                starting.wait()


def app_processes(workdir: Path, module: str) -> list[int]:
    """PIDs of `python -m <module>` processes running in workdir, whoever supervises them."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = (entry / "cwd").readlink()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if cwd == workdir and b"-m" in argv and module.encode() in argv:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("command", ["stop", "restart"])
async def test_an_app_still_launching_stops_or_restarts_as_asked(
    tmp_path: Path, redis_server: Redis, anvil: Anvil, deployment: Deployment, command: str
) -> None:
    """An indexer waiting at start-up for its database (PM2's `launching`, up to
    listen_timeout) is stopped or restarted like any other: PM2 7 took its exit for a crash
    and started it again, so `pm2 stop` was undone within a second and `pm2 restart` left a
    second indexer running that PM2 no longer knew of."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        env = stack_env(
            database_url=f"postgresql://kektech@127.0.0.1:{closed.getsockname()[1]}/kektech",
            redis_url=redis_server.url,
            rpc_url=anvil.rpc_url,
            deployment=deployment,
            stream_key=f"test:pm2:{tmp_path.name}:events",
        )
        stack = build_stack(tmp_path, env)
        workdir = tmp_path / "app"
        with stack.pm2 as pm2:
            starting = pm2.popen("start", str(ECOSYSTEM), "--only", INDEXER)
            try:

                async def waiting() -> bool:
                    try:
                        health = await http_json(stack.indexer_http + "/healthz")
                    except OSError:
                        return False
                    return "database" in str(health.get("waiting_for"))

                await eventually(waiting, within=30, what="the indexer waiting for its database")
                assert pm2.statuses(INDEXER) == ["launching"]
                pm2.run(command, INDEXER)
                await asyncio.sleep(3)  # PM2 restarted a stopped app after 100 ms
                running = app_processes(workdir, "indexer")
                if command == "stop":
                    assert (pm2.statuses(INDEXER), running) == (["stopped"], [])
                else:
                    assert len(running) == 1, running
                    assert [p["pid"] for p in pm2.processes(INDEXER)] == running
            finally:
                starting.kill()
                starting.wait()
                for pid in app_processes(workdir, "indexer"):  # one PM2 lost, if any
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


async def test_events_flow_to_a_client_of_every_instance(
    stack: Stack, dev_chain: DevChain, deployment: Deployment
) -> None:
    """Chain activity reaches a WebSocket client on each broadcaster instance."""
    driver = ActivityDriver(dev_chain, deployment, seed=21)
    for instance in range(INSTANCES):
        # Unbounded queue: the unread rest of the events must not hold up the closing handshake.
        async with ws_client(stack.ws_url(instance), max_queue=None) as client:
            await client.subscribe("events:*")
            await driver.run(blocks=2)
            (event,) = await client.events(1, within=20)
            assert event["data"]["chainId"] == 32323


async def events_until_closed(client: WsClient, within: float = 15.0) -> tuple[list[int], int]:
    """Seqs of the events still delivered before the server's close frame, and its code."""
    seqs = []
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = orjson.loads(await client.ws.recv())
                if message["type"] == "event":
                    seqs.append(message["seq"])
    received = client.ws.protocol.close_rcvd
    assert received is not None
    return seqs, received.code


async def has_events(client: aioredis.Redis, key: str) -> bool:
    return int(await client.xlen(key)) >= 10


async def test_client_resuming_after_broadcaster_restart_misses_nothing(
    stack: Stack,
    dev_chain: DevChain,
    deployment: Deployment,
    database_url: str,
    redis_client: aioredis.Redis,
) -> None:
    """pm2 restart of the broadcaster: a client resuming with `since` gets every seq once."""
    driver = ActivityDriver(dev_chain, deployment, seed=22)
    async with ws_client(stack.ws_url(0)) as client:
        await client.subscribe("events:*")
        await driver.cover_all_events()
        seqs = [e["seq"] for e in await client.events(3, within=20)]
        # Returns once both instances are back and ready: their listeners are bound.
        stack.pm2.run("restart", BROADCASTER)
        delivered, code = await events_until_closed(client)
        assert code == 1012
        seqs += delivered
    await driver.run(blocks=3)  # events published while the client is away
    entries = await wait_indexed(stack, dev_chain, deployment, database_url, redis_client)
    top = entries[-1][0]
    async with ws_client(stack.ws_url(0)) as again:
        ack = await again.subscribe("events:*", since=seqs[-1])
        assert ack["recovered"] is True
        assert ack["replayed"] > 0  # the events published while it was away
        seqs += [e["seq"] for e in ack["replayedEvents"]]
        while seqs[-1] < top:
            seqs.append((await again.expect("event", within=20))["seq"])
    assert_gap_free(entries)
    assert seqs == list(range(seqs[0], top + 1))  # no gap, no duplicate


async def test_indexer_restart_under_load_loses_nothing(
    stack: Stack,
    dev_chain: DevChain,
    deployment: Deployment,
    database_url: str,
    redis_client: aioredis.Redis,
) -> None:
    """pm2 restart of the indexer while blocks arrive: database equals chain, stream gap-free."""
    driver = ActivityDriver(dev_chain, deployment, seed=23, txs_per_block=10)
    await driver.cover_all_events()
    stop = asyncio.Event()

    async def load_until_stopped() -> None:  # blocks before, during and after the restart
        while not stop.is_set():
            await driver.run(blocks=1, block_interval=0.1)

    async with background(load_until_stopped(), name="chain-load") as load:
        await eventually(lambda: has_events(redis_client, stack.stream_key), within=30,
                         what="events in the stream")  # fmt: skip
        (before,) = [p["pid"] for p in stack.pm2.processes(INDEXER)]
        stack.pm2.run("restart", INDEXER)
        restarted_at = await dev_chain.block_number()
        (after,) = [p["pid"] for p in stack.pm2.processes(INDEXER)]
        assert after != before
        assert stack.pm2.statuses(INDEXER) == ["online"]

        async def mined_past_the_restart() -> bool:
            return await dev_chain.block_number() >= restarted_at + 10

        await eventually(mined_past_the_restart, within=30, what="10 blocks after the restart")
        stop.set()
        await load
    entries = await wait_indexed(stack, dev_chain, deployment, database_url, redis_client)
    assert_gap_free(entries)
    assert len(ready_lines(stack, INDEXER)) == 2


async def test_pm2_stop_ends_each_app_with_sigint_within_kill_timeout(stack: Stack) -> None:
    """pm2 stop: every process logs its own stop and exits 0 on SIGINT, never SIGKILLed."""
    pm2 = stack.pm2
    kill_timeout = kill_timeouts()
    async with ws_client(stack.ws_url(0)) as client:
        await client.subscribe("events:*")
        for name in (INDEXER, BROADCASTER):
            started = time.monotonic()
            pm2.run("stop", name)
            took = time.monotonic() - started
            assert pm2.statuses(name) == ["stopped"] * len(pm2.processes(name))
            assert took < kill_timeout[name], f"pm2 stop {name} took {took:.1f}s"
            exits = pm2.daemon_events(rf"\[{name}:\d+\] exited with code")
            assert [message.split("] exited ")[1] for _, message in exits] == [
                "with code [0] via signal [SIGINT]"
            ] * len(pm2.processes(name))
            stops = [line for line in pm2.app_log(name) if line["event"] == "stopped by signal"]
            assert len(stops) == len(pm2.processes(name))
        assert (await client.closed())[0] == 1012
    assert "SIGKILL" not in pm2.daemon_log()


async def test_reload_from_the_ecosystem_keeps_each_instance_on_its_own_ports(
    stack: Stack,
) -> None:
    """`pm2 reload ecosystem.config.js --update-env` (deploy/update.sh) keeps ports distinct."""
    before = [p["pid"] for p in stack.pm2.processes(BROADCASTER)]
    stack.pm2.run("reload", str(ECOSYSTEM), "--update-env")
    after = [p["pid"] for p in stack.pm2.processes(BROADCASTER)]
    assert set(after).isdisjoint(before)
    assert stack.pm2.statuses(BROADCASTER) == ["online"] * INSTANCES
    for instance in range(INSTANCES):
        health = await http_json(f"http://127.0.0.1:{stack.http_base + instance}/healthz")
        assert health["redis"] == "up"
        async with ws_client(stack.ws_url(instance)) as client:
            assert client.hello["type"] == "connected"


def test_ecosystem_merges_each_service_env_file_into_its_app(tmp_path: Path) -> None:
    """<KEKTECH_SERVICE_ENV_DIR>/<service>.env lands in that app's env, and only there."""
    (tmp_path / "indexer.env").write_text("# comment\nREDIS_URL=redis://indexer:pw@h:1/0\n")
    (tmp_path / "broadcaster.env").write_text("REDIS_URL='redis://broadcaster:pw@h:1/0'\n")
    indexer, broadcaster = evaluate_ecosystem(
        KEKTECH_SERVICE_ENV_DIR=str(tmp_path), KEKTECH_ROOT="/opt/kektech"
    )
    assert indexer["env"] == {"REDIS_URL": "redis://indexer:pw@h:1/0"}
    assert broadcaster["env"]["REDIS_URL"] == "redis://broadcaster:pw@h:1/0"
    assert (indexer["cwd"], indexer["script"]) == ("/opt/kektech", "/opt/kektech/.venv/bin/python")
    assert (broadcaster["instances"], broadcaster["env"]["WS_PORT"]) == (2, "3180")


async def test_settings_of_the_ecosystem_env_file_survive_a_reload_without_them(
    tmp_path: Path, redis_server: Redis
) -> None:
    """KEKTECH_* saved in <KEKTECH_SERVICE_ENV_DIR>/ecosystem.env hold across `pm2 startOrReload
    ecosystem.config.js --update-env` from a shell without them (update.sh, sudo), and a
    malformed file stops the reload with the file's line, leaving the apps running."""
    ws_base, http_base = consecutive_free_ports(1), consecutive_free_ports(1)
    etc = tmp_path / "etc"
    etc.mkdir()
    settings = etc / "ecosystem.env"
    settings.write_text(
        "# this machine's ports\n"
        "KEKTECH_BROADCASTER_INSTANCES=1\n"
        f"KEKTECH_WS_BASE_PORT={ws_base}\n"
        f"KEKTECH_BROADCASTER_HTTP_BASE_PORT='{http_base}'\n"
    )
    workdir = tmp_path / "app"
    write_dotenv(
        workdir,
        {"REDIS_URL": redis_server.url, "REDIS_STREAM_KEY": f"test:pm2:{tmp_path.name}:events"},
    )
    with Pm2(tmp_path / "pm2", workdir=workdir, KEKTECH_SERVICE_ENV_DIR=str(etc)) as pm2:
        assert not [name for name in pm2.env if name.endswith("_PORT") or "INSTANCES" in name]

        async def assert_on_the_saved_ports() -> None:
            assert pm2.statuses(BROADCASTER) == ["online"]
            health = await http_json(f"http://127.0.0.1:{http_base}/healthz")
            assert health["redis"] == "up"
            async with ws_client(f"ws://127.0.0.1:{ws_base}/ws") as client:
                assert client.hello["type"] == "connected"

        pm2.start("--only", BROADCASTER)
        await assert_on_the_saved_ports()
        before = [p["pid"] for p in pm2.processes(BROADCASTER)]
        pm2.run("startOrReload", str(ECOSYSTEM), "--only", BROADCASTER, "--update-env")
        assert [p["pid"] for p in pm2.processes(BROADCASTER)] != before
        await assert_on_the_saved_ports()

        settings.write_text(settings.read_text() + "KEKTECH_WS_PORT=4000\n")
        with pytest.raises(AssertionError, match=r"ecosystem\.env line 5: unknown variable "
                           r"KEKTECH_WS_PORT \(did you mean KEKTECH_WS_BASE_PORT\?\)"):  # fmt: skip
            pm2.run("startOrReload", str(ECOSYSTEM), "--only", BROADCASTER, "--update-env")
        assert pm2.statuses(BROADCASTER) == ["online"]


def test_the_environment_beats_the_ecosystem_env_file_which_beats_the_defaults(
    tmp_path: Path,
) -> None:
    """A KEKTECH_* variable set in PM2's environment wins over ecosystem.env, which wins over
    the file's own defaults."""
    (tmp_path / "ecosystem.env").write_text(
        "KEKTECH_WS_BASE_PORT=14100\nKEKTECH_BROADCASTER_HTTP_BASE_PORT=14200\n"
        "KEKTECH_LOG_DIR=/var/log/elsewhere\n"
    )
    _, broadcaster = evaluate_ecosystem(
        KEKTECH_SERVICE_ENV_DIR=str(tmp_path), KEKTECH_BROADCASTER_HTTP_BASE_PORT="15200"
    )
    assert (broadcaster["instances"], broadcaster["env"]["WS_PORT"]) == (2, "14100")
    assert broadcaster["env"]["BROADCASTER_HTTP_PORT"] == "15200"
    assert broadcaster["out_file"] == f"/var/log/elsewhere/{BROADCASTER}.out.log"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("KEKTECH_WS_BASE_PORT 14100\n", "line 1 is not NAME=value"),
        ("\n# port\nKEKTECH_WS_BASE_PORT=14100\nKEKTECH_WS_BASE_PORT=14101\n",
         "line 4: KEKTECH_WS_BASE_PORT is already set on line 3"),
        ("KEKTECH_BROADCASTER_INSTANCE=3\n",
         "line 1: unknown variable KEKTECH_BROADCASTER_INSTANCE "
         "(did you mean KEKTECH_BROADCASTER_INSTANCES?)"),
        ("WS_PORT=14100\n", "line 1: WS_PORT is a setting of the services: it belongs in .env"),
        ("KEKTECH_SERVICE_ENV_DIR=/srv\n",
         "line 1: KEKTECH_SERVICE_ENV_DIR locates this file, so only the environment sets it"),
        ("KEKTECH_WS_BASE_PORT=31x\n",
         'KEKTECH_WS_BASE_PORT must be an integer from 1 to 65533, not "31x" ('),
    ],
)  # fmt: skip
def test_a_bad_line_of_the_ecosystem_env_file_is_refused_with_its_number(
    tmp_path: Path, text: str, error: str
) -> None:
    """ecosystem.config.js refuses a malformed line, a name set twice, a name it does not read
    and a bad value, naming the file and the line, rather than fall back to a default."""
    (tmp_path / "ecosystem.env").write_text(text)
    message = ecosystem_error(KEKTECH_SERVICE_ENV_DIR=str(tmp_path))
    assert str(tmp_path / "ecosystem.env") in message
    assert error in message


@pytest.mark.parametrize(
    ("ws", "http", "instances"),
    [("14100", "14101", "2"), ("14104", "14100", "5"), ("14100", "14100", "1")],
)
def test_overlapping_port_ranges_of_the_broadcaster_instances_are_refused(
    tmp_path: Path, ws: str, http: str, instances: str
) -> None:
    """Instance i listens on WS base + i and HTTP base + i: ranges that overlap would give
    one instance's WebSocket port to another's health and metrics, and one of the two would
    crash-loop on "address already in use". Refused when PM2 evaluates the file instead."""
    message = ecosystem_error(
        KEKTECH_SERVICE_ENV_DIR=str(tmp_path),
        KEKTECH_WS_BASE_PORT=ws,
        KEKTECH_BROADCASTER_HTTP_BASE_PORT=http,
        KEKTECH_BROADCASTER_INSTANCES=instances,
    )
    assert "KEKTECH_WS_BASE_PORT" in message
    assert "KEKTECH_BROADCASTER_HTTP_BASE_PORT" in message
    assert "overlap" in message


def test_adjacent_port_ranges_of_the_broadcaster_instances_are_accepted(
    tmp_path: Path,
) -> None:
    _, broadcaster = evaluate_ecosystem(
        KEKTECH_SERVICE_ENV_DIR=str(tmp_path),
        KEKTECH_WS_BASE_PORT="14100",
        KEKTECH_BROADCASTER_HTTP_BASE_PORT="14103",
        KEKTECH_BROADCASTER_INSTANCES="3",
    )
    assert (broadcaster["env"]["WS_PORT"], broadcaster["env"]["BROADCASTER_HTTP_PORT"]) == (
        "14100",
        "14103",
    )
