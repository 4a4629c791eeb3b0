"""Routing to clients: exact channels and patterns, once per connection, in seq order."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import pwd
import socket
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import unix_connect
from websockets.exceptions import InvalidStatus

from broadcaster.errors import SocketInUse
from broadcaster.server import _bind_unix
from broadcaster.session import Session
from devnet.process import REPO_ROOT, free_port
from devnet.redis_server import Redis
from indexer.publisher import PUBLISH_SCRIPT, script_event
from shared.channels import channels_for
from shared.errors import ConfigError
from tests.broadcaster.support import (
    MARKET,
    OTHER_MARKET,
    WITHIN,
    EventProducer,
    RawClient,
    Running,
    WsClient,
    envelope,
    ws_client,
)

Start = Callable[..., AbstractAsyncContextManager[Running]]


async def test_pattern_routing(server: Running, producer: EventProducer) -> None:
    """Each client gets exactly the events its channel or pattern matches, on that channel."""
    subscriptions = {
        "all": "events:*",
        "bets": "events:bet_placed",
        "market": "market:" + MARKET,
        "market-prefix": "market:0x31d2*",
        "glob": "events:*_placed",
        "everything": "*",
        "other-market": "market:" + OTHER_MARKET,
        "approvals": "events:proposal_approved",
    }
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for name, channel in subscriptions.items():
            clients[name] = await stack.enter_async_context(ws_client(server.url))
            await clients[name].subscribe(channel)
        await producer.publish("BetPlaced", market=MARKET)  # 1
        await producer.publish("MarketCreated", market=OTHER_MARKET)  # 2
        await producer.publish("FactoryPaused")  # 3
        await producer.publish("MarketApproved", market=MARKET)  # 4
        expected = {
            "all": [(1, "events:bet_placed"), (2, "events:market_created"),
                    (3, "events:factory_paused"), (4, "events:market_approved")],
            "bets": [(1, "events:bet_placed")],
            "market": [(1, "market:" + MARKET), (4, "market:" + MARKET)],
            "market-prefix": [(1, "market:" + MARKET), (4, "market:" + MARKET)],
            "glob": [(1, "events:bet_placed")],
            "everything": [(1, "events:bet_placed"), (2, "events:market_created"),
                           (3, "events:factory_paused"), (4, "events:market_approved")],
            "other-market": [(2, "market:" + OTHER_MARKET)],
            "approvals": [(4, "events:proposal_approved")],
        }  # fmt: skip
        for name, wanted in expected.items():
            got = await clients[name].events(len(wanted))
            assert [(e["seq"], e["channel"]) for e in got] == wanted, name
            await clients[name].nothing(0.05)


async def test_each_event_once_per_connection(server: Running, producer: EventProducer) -> None:
    """Overlapping subscriptions deliver each event once, on the first matching channel."""
    async with ws_client(server.url) as client:
        for channel in ("market:" + MARKET, "events:*", "*", "events:bet_placed", "market:0x3*"):
            await client.subscribe(channel)
        await producer.publish(count=3)
        events = await client.events(3)
        assert [e["seq"] for e in events] == [1, 2, 3]
        assert {e["channel"] for e in events} == {"events:bet_placed"}
        await client.send({"type": "ping"})
        await client.expect("pong")


async def test_republication_is_not_delivered_twice(
    server: Running, producer: EventProducer, redis_client: aioredis.Redis
) -> None:
    """The indexer's retries after a crash reach no one twice: its publish script, run again
    on the same outbox row, skips the seq the stream holds (and PUBLISHes it again on Pub/Sub,
    which the broadcaster does not read)."""
    publish_rows = redis_client.register_script(PUBLISH_SCRIPT)
    env = envelope(1)
    channels = " ".join(channels_for(env.type, env.contract_kind, env.market_address))
    # What Publisher._publish sends for one row: MAXLEN, the seq the batch follows on from
    # (the recorded position + 1, still 1 after a crash before it was recorded), the recorded
    # position (0), the row.
    event = script_event(1, channels, env.to_json_bytes())
    args: list[bytes | int] = [producer.maxlen, 1, 0, event]
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        added = []
        for _ in range(4):  # the publication, then what a retrying indexer does after a crash
            result = await publish_rows(keys=[producer.key], args=args)
            added.append(result[0])
        producer.seq = 1
        await producer.publish()
        assert [e["seq"] for e in await client.events(2)] == [1, 2]
        await client.nothing(0.1)
    assert added == [1, 0, 0, 0]  # written once, then skipped as already there
    assert await redis_client.xlen(producer.key) == 2


async def test_market_addresses_match_case_insensitively(
    server: Running, producer: EventProducer
) -> None:
    """Checksummed or upper-case addresses, exact or as a pattern, match lowercase channels."""
    async with ws_client(server.url) as exact, ws_client(server.url) as prefix:
        await exact.subscribe("market:0x31D2bc49A6Fd4a066f5F8aC61ACD0e6C9105Dd84")
        await prefix.subscribe("MARKET:0X31D2*".replace("MARKET", "market"))
        await producer.publish(market=MARKET)
        assert (await exact.events(1))[0]["channel"] == "market:" + MARKET
        assert (await prefix.events(1))[0]["channel"] == "market:" + MARKET


async def test_connections_on_one_channel_share_one_name(server: Running) -> None:
    """The connections subscribed to one channel hold one string for its name, the one
    routing holds, not a copy each (100 long subscriptions cost 33.6 KiB a connection with
    copies, 14.8 shared); once none holds it, it is not kept: the next connection to
    subscribe holds the string of its own message."""
    channel = f"market:{MARKET}"
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for _ in range(3):
            client = await RawClient.open(server.settings.ws_port)
            stack.callback(client.close)
            clients.append(client)
        first, second, third = clients
        name = await subscribed_name(first, channel)
        assert await subscribed_name(second, f"market:0x{MARKET[2:].upper()}") is name
        first.close()
        second.close()
        await server.wait_metric("kektech_broadcaster_connections", 1)
        assert await subscribed_name(third, channel) is not name


async def subscribed_name(client: RawClient, written: str) -> str:
    """Subscribe a new client to one channel; the name its subscription holds server-side."""
    await client.read_frame()  # connected
    client.send_frame(0x1, orjson.dumps({"type": "subscribe", "channel": written}))
    async with asyncio.timeout(WITHIN):
        while b'"subscribed"' not in (await client.read_frame())[1]:
            pass
    session = client.server_side().conversation
    assert isinstance(session, Session)
    (name,) = session.client.subs
    return name


async def test_event_message_carries_the_envelope(server: Running, producer: EventProducer) -> None:
    """Events arrive as {type, channel, seq, data: envelope, timestamp}, as the frontend reads."""
    async with ws_client(server.url) as client:
        await client.subscribe("events:market_created")
        [env] = await producer.publish("MarketCreated", market=MARKET)
        [message] = await client.events(1)
    assert set(message) == {"type", "channel", "seq", "data", "timestamp"}
    assert message["data"] == orjson.loads(env.to_json_bytes())
    data = message["data"]
    assert data["type"] == "MarketCreated"
    assert data["marketAddress"] == MARKET
    assert data["transactionHash"] == env.transaction_hash
    assert data["blockNumber"] == env.block_number
    assert data["timestamp"].endswith("Z")
    assert data["data"]["question"] == "Will test 1 pass?"
    assert message["seq"] == data["seq"] == 1


async def test_invalid_entries_are_skipped(server: Running, producer: EventProducer) -> None:
    """Entries that are not valid events are counted and skipped; the stream goes on."""
    good = envelope(1).to_json_bytes()
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        await producer.publish_raw({"seq": 1, "channels": "events:bet_placed"})
        await producer.publish_raw({"seq": 2, "channels": "events:bet_placed", "event": b"{"})
        await producer.publish_raw({"seq": 4, "channels": "events:bet_placed", "event": good})
        await producer.publish_raw(
            {"seq": 4, "channels": "events:*", "event": envelope(4).to_json_bytes()}
        )
        impossible = orjson.loads(envelope(5).to_json_bytes()) | {
            "timestamp": "2024-02-30T00:00:00Z"
        }
        await producer.publish_raw(
            {"seq": 5, "channels": "events:bet_placed", "event": orjson.dumps(impossible)}
        )
        not_json = envelope(6).to_json_bytes()[:-1] + b',"extra":NaN}'
        await producer.publish_raw({"seq": 6, "channels": "events:bet_placed", "event": not_json})
        await producer.publish()  # seq 7, valid
        [event] = await client.events(1)
        assert event["seq"] == 7
        await client.nothing(0.05)
    assert await server.metric("kektech_broadcaster_invalid_entries_total") == 6


async def test_invalid_entries_in_the_history_do_not_stop_a_start(
    start: Start, producer: EventProducer
) -> None:
    """Entries a start-up reads as its history (here an impossible date) are skipped too: one
    bad entry must not keep every instance from starting. And counted, as when read live: one
    written while no broadcaster ran (a faulty producer) left no trace."""
    impossible = orjson.loads(envelope(1).to_json_bytes()) | {"timestamp": "2024-02-30T00:00:00Z"}
    await producer.publish_raw(
        {"seq": 1, "channels": "events:bet_placed", "event": orjson.dumps(impossible)}
    )
    async with start() as server, ws_client(server.url) as client:
        await client.subscribe("events:*")
        await producer.publish()  # seq 2, valid
        [event] = await client.events(1)
        assert event["seq"] == 2
        ack = await client.subscribe("events:bet_placed", since=0)  # skips it again, uncounted
        assert ack["replayedEvents"] == []
        assert await server.metric("kektech_broadcaster_invalid_entries_total") == 1


async def test_instances_side_by_side(start: Start, producer: EventProducer) -> None:
    """Two instances on their own ports serve the same stream with no coordination."""
    async with start() as one, start() as two, ws_client(one.url) as a, ws_client(two.url) as b:
        await a.subscribe("events:*")
        await b.subscribe("events:*")
        await producer.publish(count=5)
        assert [e["seq"] for e in await a.events(5)] == [1, 2, 3, 4, 5]
        assert [e["seq"] for e in await b.events(5)] == [1, 2, 3, 4, 5]


async def test_instances_share_a_port_with_reuseport(start: Start, producer: EventProducer) -> None:
    """With WS_REUSE_PORT two instances listen on one port and the kernel spreads clients."""
    async with (
        start(ws_reuse_port=True) as one,
        start(ws_reuse_port=True, ws_port=one.settings.ws_port) as two,
        contextlib.AsyncExitStack() as stack,
    ):
        clients = [await stack.enter_async_context(ws_client(one.url)) for _ in range(24)]
        for client in clients:
            await client.subscribe("events:*")
        await producer.publish()
        for client in clients:
            assert [e["seq"] for e in await client.events(1)] == [1]
        counts = [(await s.health())["connections"] for s in (one, two)]
    assert sum(counts) == 24
    assert min(counts) > 0


async def test_unix_socket_for_a_local_proxy(
    start: Start, producer: EventProducer, tmp_path: Path
) -> None:
    """With WS_UNIX_SOCKET, clients reach the broadcaster through the socket file (as Nginx
    would), and X-Forwarded-For is believed there for the per-IP limit; a stop removes it."""
    path = str(tmp_path / "ws.sock")
    async with start(ws_unix_socket=path, ws_max_connections_per_ip=1) as server:
        headers = {"X-Forwarded-For": "203.0.113.5"}
        async with unix_connect(path, "ws://localhost/ws", additional_headers=headers) as ws:
            client = WsClient(ws)
            await client.expect("connected")
            await client.subscribe("events:*")
            await producer.publish()
            assert [e["seq"] for e in await client.events(1)] == [1]
            with pytest.raises(InvalidStatus) as caught:
                async with unix_connect(path, "ws://localhost/ws", additional_headers=headers):
                    pass
            assert caught.value.response.status_code == 429
            other = {"X-Forwarded-For": "203.0.113.6"}
            async with unix_connect(path, "ws://localhost/ws", additional_headers=other):
                pass
        assert (await server.health())["redis"] == "up"
    assert not (tmp_path / "ws.sock").exists(), "a clean stop leaves its socket file behind"


async def test_instances_get_their_own_unix_socket_and_never_take_another_s(
    start: Start, tmp_path: Path
) -> None:
    """Instances started with one WS_UNIX_SOCKET (as PM2 starts them) each serve their own
    socket; one that would take a live server's socket over refuses to start instead."""
    path = str(tmp_path / "ws.sock")
    async with (
        start(ws_unix_socket=path, broadcaster_instance=0) as first,
        start(ws_unix_socket=path, broadcaster_instance=1) as second,
    ):
        assert (first.settings.ws_unix_socket, second.settings.ws_unix_socket) == (
            path,
            path + ".1",
        )
        for server in (first, second):
            async with unix_connect(server.settings.ws_unix_socket, "ws://localhost/ws") as ws:
                await WsClient(ws).expect("connected")
            assert await server.metric("kektech_broadcaster_connections_opened_total") == 1
            assert os.stat(server.settings.ws_unix_socket).st_mode & 0o777 == 0o660
        with pytest.raises(SocketInUse):
            async with start(ws_unix_socket=path):
                pass
        async with unix_connect(path, "ws://localhost/ws") as ws:  # still the first one's
            await WsClient(ws).expect("connected")
        assert await first.metric("kektech_broadcaster_connections_opened_total") == 2


def group_to_give() -> grp.struct_group:
    """A group other than the process's own that it may give its files to: any group when
    root (as in CI), else one of its supplementary groups."""
    own, root = os.getegid(), os.geteuid() == 0
    groups = [
        group
        for group in grp.getgrall()
        if group.gr_gid != own and (root or group.gr_gid in os.getgroups())
    ]
    if not groups:
        pytest.skip("not root, and in no group but its own: no group to give a socket to")
    return min(groups, key=lambda group: group.gr_gid)


async def test_unix_sockets_go_to_ws_unix_socket_group(start: Start, tmp_path: Path) -> None:
    """With WS_UNIX_SOCKET_GROUP every instance's socket belongs to that group (the one Nginx's
    user shares, so that it need not join the broadcaster's), mode 0660, and serves clients."""
    group = group_to_give()
    path = str(tmp_path / "ws.sock")
    async with (
        start(ws_unix_socket=path, ws_unix_socket_group=group.gr_name) as first,
        start(
            ws_unix_socket=path, ws_unix_socket_group=group.gr_name, broadcaster_instance=1
        ) as second,
    ):
        for server in (first, second):
            info = os.stat(server.settings.ws_unix_socket)
            assert (info.st_gid, info.st_mode & 0o777) == (group.gr_gid, 0o660)
            async with unix_connect(server.settings.ws_unix_socket, "ws://localhost/ws") as ws:
                await WsClient(ws).expect("connected")


def test_the_socket_has_its_mode_and_group_before_anyone_can_connect(tmp_path: Path) -> None:
    """The socket file gets its mode and group before it listens (until then a connect is
    refused), so nobody connects through the umask's mode or the process's group meanwhile."""
    group = group_to_give()
    path = str(tmp_path / "ws.sock")
    with (
        _bind_unix(path, group) as bound,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe,
    ):
        info = os.stat(path)
        assert (info.st_gid, info.st_mode & 0o777) == (group.gr_gid, 0o660)
        with pytest.raises(ConnectionRefusedError):
            probe.connect(path)
        bound.listen()
        probe.connect(path)


async def test_an_unknown_socket_group_stops_the_start(start: Start, tmp_path: Path) -> None:
    """A WS_UNIX_SOCKET_GROUP this host does not have stops the start with a ConfigError naming
    it, before any socket file is made."""
    path = tmp_path / "ws.sock"
    with pytest.raises(ConfigError) as caught:
        async with start(ws_unix_socket=str(path), ws_unix_socket_group="kektech-no-such-group"):
            pass
    assert str(caught.value) == (
        "invalid setting WS_UNIX_SOCKET_GROUP: this host has no group kektech-no-such-group"
    )
    assert not path.exists()


async def test_a_socket_group_the_process_may_not_use_stops_the_start(
    redis_server: Redis, stream_key: str, tmp_path: Path
) -> None:
    """A broadcaster whose user is not in WS_UNIX_SOCKET_GROUP (a PM2 daemon started before
    `usermod -aG` keeps its old groups) exits 1 at start, logging what to do, and leaves no
    socket file. As root it runs without CAP_CHOWN, what lets root give files to any group."""
    argv = [sys.executable, "-m", "broadcaster"]
    own = {os.getegid(), *os.getgroups()}
    if os.geteuid() == 0:
        argv = ["setpriv", "--inh-caps=-all", "--bounding-set=-chown", "--clear-groups", *argv]
        own = {os.getegid()}
    group = min((g for g in grp.getgrall() if g.gr_gid not in own), key=lambda g: g.gr_gid)
    path = tmp_path / "ws.sock"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "REDIS_URL": redis_server.url,
        "REDIS_STREAM_KEY": stream_key,
        "WS_PORT": str(free_port()),
        "BROADCASTER_HTTP_PORT": str(free_port()),
        "LOG_FORMAT": "json",
        "WS_UNIX_SOCKET": str(path),
        "WS_UNIX_SOCKET_GROUP": group.gr_name,
    }
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(15):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1, output.decode()
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith(b"{")]
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert [line["error"] for line in lines if line["event"] == "broadcaster stopped"] == [
        f"invalid setting WS_UNIX_SOCKET_GROUP: user {user} may not give its socket to group "
        f"{group.gr_name}: add it (usermod -aG {group.gr_name} {user}), then restart the PM2 "
        f"daemon (systemctl restart pm2-{user}), whose processes keep the groups it had"
    ]
    assert not path.exists()


@pytest.mark.parametrize("taken", ["ws", "ops"])
async def test_a_port_taken_stops_the_start_naming_its_settings(start: Start, taken: str) -> None:
    """A WS_PORT or BROADCASTER_HTTP_PORT another process holds stops the start with the
    OS's error naming the settings, which the OS's message does not (two ports, one
    message: which was it?)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        setting = {"ws": "ws_port", "ops": "broadcaster_http_port"}[taken]
        with pytest.raises(OSError, match="cannot listen on") as caught:
            async with start(**{setting: port}):
                pass
    names = {"ws": "WS_HOST, WS_PORT", "ops": "BROADCASTER_HTTP_HOST, BROADCASTER_HTTP_PORT"}
    assert f"cannot listen on 127.0.0.1:{port} ({names[taken]}): " in str(caught.value)


async def test_a_unix_socket_that_cannot_be_bound_stops_the_start_naming_it(
    start: Start, tmp_path: Path
) -> None:
    """A WS_UNIX_SOCKET that cannot be bound (here its directory is missing) stops the start
    with the OS's error naming the setting and the path, which the OS's message does not."""
    path = tmp_path / "missing" / "ws.sock"
    with pytest.raises(FileNotFoundError) as caught:
        async with start(ws_unix_socket=str(path)):
            pass
    assert str(caught.value) == (
        f"[Errno 2] cannot bind WS_UNIX_SOCKET {path}: No such file or directory"
    )


async def test_a_unix_socket_that_cannot_listen_is_closed_and_removed(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the bound Unix socket cannot listen (the kernel refuses it: here ENOBUFS, made up),
    the start stops with an error naming WS_UNIX_SOCKET and its path, the socket is closed
    and its file removed."""
    path = tmp_path / "ws.sock"
    listen = socket.socket.listen
    refused: list[socket.socket] = []

    def refuse_unix(sock: socket.socket, *args: int) -> None:
        if sock.family == socket.AF_UNIX:
            refused.append(sock)  # held here, so that the collector cannot close it for us
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        listen(sock, *args)

    monkeypatch.setattr(socket.socket, "listen", refuse_unix)
    try:
        with pytest.raises(OSError, match="WS_UNIX_SOCKET") as caught:
            async with start(ws_unix_socket=str(path)):
                pass
        assert [sock.fileno() for sock in refused] == [-1], "the bound socket was left open"
    finally:
        for sock in refused:
            sock.close()
    assert not path.exists()
    assert str(caught.value) == (
        f"[Errno {errno.ENOBUFS}] cannot listen on WS_UNIX_SOCKET {path}: No buffer space available"
    )


async def test_the_per_ip_limit_counts_an_ipv6_64(start: Start, tmp_path: Path) -> None:
    """Two addresses of one IPv6 /64 (as Nginx reports them) share the per-IP limit."""
    path = str(tmp_path / "ws.sock")
    async with start(ws_unix_socket=path, ws_max_connections_per_ip=1):
        first = {"X-Forwarded-For": "2001:db8:1:2::5"}
        async with unix_connect(path, "ws://localhost/ws", additional_headers=first):
            same_64 = {"X-Forwarded-For": "2001:db8:1:2:abcd::6"}
            with pytest.raises(InvalidStatus) as caught:
                async with unix_connect(path, "ws://localhost/ws", additional_headers=same_64):
                    pass
            assert caught.value.response.status_code == 429
            other_64 = {"X-Forwarded-For": "2001:db8:1:3::5"}
            async with unix_connect(path, "ws://localhost/ws", additional_headers=other_64):
                pass


@pytest.mark.parametrize(("args", "code"), [(["--help"], 0), (["--port", "1"], 2)])
def test_arguments_are_answered_not_ignored(args: list[str], code: int, tmp_path: Path) -> None:
    """`python -m broadcaster --help` printed nothing and started a server on WS_PORT (beside
    PM2's, on the VPS); an argument it does not take is refused. Neither binds a port."""
    port = free_port()
    env = {"PATH": os.environ["PATH"], "WS_PORT": str(port), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "broadcaster", *args],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == code, done.stderr
    assert "usage: python -m broadcaster" in done.stdout + done.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # nothing took it
