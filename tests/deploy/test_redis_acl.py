"""The Redis ACL users of deploy/redis/kektech-acl.conf, on a real redis-server.

The indexer (a real subprocess following anvil) publishes as `indexer`, the broadcaster
(in-process) relays as `broadcaster`, and neither needs more than its user allows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from devnet.anvil_node import Anvil
from devnet.chain import Deployment, DevChain
from devnet.driver import ActivityDriver
from indexer.publisher import PUBLISH_SCRIPT, script_event
from ops.probes.redis import probe_redis
from tests.broadcaster.support import running, settings_for, ws_client
from tests.support.indexer_process import IndexerProcess, indexer_env
from tests.support.redis_acl import AclRedis, acl_redis

STREAM_KEY = "kektech:events"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[AclRedis]:
    with acl_redis(tmp_path, stream_key=STREAM_KEY) as started:
        yield started


@pytest.fixture
async def admin(server: AclRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url("admin"))
    yield client
    await client.aclose()


@pytest.fixture
async def as_broadcaster(server: AclRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url("broadcaster"))
    yield client
    await client.aclose()


async def denials(admin: aioredis.Redis) -> list[str]:
    """`user: command` of every ACL denial Redis logged."""
    entries = await admin.acl_log()
    return [f"{e['username']}: {e['object']} ({e['reason']})" for e in entries]


@pytest.mark.timeout(90)
async def test_indexer_and_broadcaster_work_with_their_acl_users(
    server: AclRedis,
    admin: aioredis.Redis,
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    database_url: str,
    tmp_path: Path,
) -> None:
    """Chain events published by the indexer as `indexer` reach a WebSocket client through a
    broadcaster reading as `broadcaster`: history at boot (XREVRANGE), a resume older than the
    history (XRANGE), live events (XREAD), also after the script cache was flushed (SCRIPT
    LOAD again); and Redis logged no ACL denial."""
    env = indexer_env(
        database_url=database_url,
        redis_url=server.url("indexer"),
        rpc_url=anvil.rpc_url,
        deployment=deployment,
        stream_key=STREAM_KEY,
    )
    driver = ActivityDriver(dev_chain, deployment, seed=5, txs_per_block=4)
    with IndexerProcess(env, log_dir=tmp_path) as indexer:
        await indexer.wait_ready()
        await driver.run(blocks=2)
        await indexer.wait_cursor(await dev_chain.block_number())
        first = await admin.xlen(STREAM_KEY)
        assert first > 1
        # A one-event history: resuming from 0 must read the older entries with XRANGE.
        settings = settings_for(server.url("broadcaster"), STREAM_KEY, ws_history_size=1)
        async with running(settings) as broadcaster, ws_client(broadcaster.url) as client:
            ack = await client.subscribe("events:*", since=0)
            assert ack["recovered"] is True
            await admin.script_flush()
            await driver.run(blocks=2)
            await indexer.wait_cursor(await dev_chain.block_number())
            total = await admin.xlen(STREAM_KEY)
            assert total > first
            live = await client.events(total - first, within=30)
    seqs = [e["seq"] for e in ack["replayedEvents"] + live]
    assert seqs == list(range(1, total + 1))
    assert await denials(admin) == []


async def test_broadcaster_user_cannot_write_or_administer(
    as_broadcaster: aioredis.Redis, admin: aioredis.Redis
) -> None:
    """The broadcaster user may read the stream but not XADD, PUBLISH, FLUSHALL or CONFIG."""
    await admin.xadd(STREAM_KEY, {"seq": "1"}, id="1-0")
    entries = await as_broadcaster.xrange(STREAM_KEY)
    assert [entry_id for entry_id, _ in entries or []] == [b"1-0"]
    refused: list[Callable[[], Awaitable[object]]] = [
        lambda: as_broadcaster.xadd(STREAM_KEY, {"seq": "2"}, id="2-0"),
        lambda: as_broadcaster.publish("events:bet_placed", "{}"),
        lambda: as_broadcaster.flushall(),
        lambda: as_broadcaster.config_get("*"),
        lambda: as_broadcaster.xrange("another:key"),
    ]
    for call in refused:
        with pytest.raises(NoPermissionError):
            await call()
    assert await admin.xlen(STREAM_KEY) == 1


async def test_indexer_user_cannot_touch_other_keys_or_administer(
    server: AclRedis, admin: aioredis.Redis
) -> None:
    """The indexer user may not write other keys, publish outside events:/market:, FLUSHALL,
    CONFIG or run arbitrary scripts with EVAL."""
    client = aioredis.Redis.from_url(server.url("indexer"))
    try:
        refused: list[Callable[[], Awaitable[object]]] = [
            lambda: client.set("another:key", "x"),
            lambda: client.xadd("another:key", {"seq": "1"}),
            lambda: client.publish("admin:channel", "{}"),
            lambda: client.flushall(),
            lambda: client.config_get("*"),
            lambda: client.eval("return 1", 0),
        ]
        for call in refused:
            with pytest.raises(NoPermissionError):
                await call()
        assert await client.publish("events:bet_placed", "{}") == 0
    finally:
        await client.aclose()
    assert await admin.dbsize() == 0


async def test_indexer_user_can_check_seqs_already_in_its_stream(
    server: AclRedis, admin: aioredis.Redis
) -> None:
    """The publish script reads back the stream entry of a seq it skips (its own, written
    before a crash, or another writer's): the indexer user is allowed that read, so a retry
    after a crash publishes instead of failing with NOPERM at every attempt."""
    event = b'{"type":"Test","seq":1}'
    await admin.xadd(STREAM_KEY, {"seq": "1", "channels": "events:test", "event": event}, id="1-0")
    client = aioredis.Redis.from_url(server.url("indexer"))
    try:
        publish = client.register_script(PUBLISH_SCRIPT)
        args: list[bytes | int] = [1000, 1, 0, script_event(1, "events:test", event)]
        args.append(script_event(2, "events:test", b'{"seq":2}'))
        added, top, foreign, unchecked = await publish(keys=[STREAM_KEY], args=args)
    finally:
        await client.aclose()
    assert (added, top, foreign, unchecked) == (1, 1, [], 0)
    assert await denials(admin) == []


async def test_default_user_cannot_authenticate(server: AclRedis) -> None:
    """Without credentials every command is refused, and the default user cannot log in."""
    anonymous = aioredis.Redis.from_url(server.url())
    try:
        with pytest.raises(AuthenticationError):
            await anonymous.ping()
    finally:
        await anonymous.aclose()
    default = aioredis.Redis.from_url(server.url("default", password="not-a-password"))
    try:
        with pytest.raises((AuthenticationError, ResponseError)):
            await default.ping()
    finally:
        await default.aclose()


async def test_ops_user_runs_the_doctor_probe_and_nothing_else(
    server: AclRedis, admin: aioredis.Redis
) -> None:
    """The `ops` user of .env passes `kektech doctor`'s Redis probe (PING, TYPE, XLEN) but can
    neither read events nor write."""
    await admin.xadd(STREAM_KEY, {"seq": "1"}, id="1-0")
    info = await probe_redis(server.url("ops"), stream_key=STREAM_KEY, within=5)
    assert info.length == 1
    client = aioredis.Redis.from_url(server.url("ops"))
    try:
        refused: list[Callable[[], Awaitable[object]]] = [
            lambda: client.xrange(STREAM_KEY),
            lambda: client.xadd(STREAM_KEY, {"seq": "2"}, id="2-0"),
            lambda: client.xlen("another:key"),
        ]
        for call in refused:
            with pytest.raises(NoPermissionError):
                await call()
    finally:
        await client.aclose()
