"""Helpers for broadcaster tests: an event producer that writes the stream exactly as the
indexer does, readers of the stream's entries, WebSocket test clients, and a broadcaster on
free ports, in-process or as a process of its own."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis.typing import EncodableT, FieldT, StreamRangeResponse
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from broadcaster.connection import Connection
from broadcaster.service import run
from devnet.process import REPO_ROOT, free_port
from devnet.redis_server import Redis
from shared.broadcaster_settings import BroadcasterSettings
from shared.channels import channels_for
from shared.config_types import url_host
from shared.envelope import ContractKind, EventEnvelope, normalize_timestamp
from tests.support.handshake import handshake_request

MARKET = "0x31d2bc49a6fd4a066f5f8ac61acd0e6c9105dd84"
OTHER_MARKET = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8"
FACTORY = "0x5fbdb2315678afecb367f032d93f642f64180aa3"
BETTOR = "0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc"
WITHIN = 5.0

# One stream entry as a client without decode_responses reads it: (ID, fields), all bytes.
StreamEntry = tuple[bytes, dict[bytes, bytes]]

# Event name -> emitting contract kind, and whether the market is the emitter.
KINDS: dict[str, ContractKind] = {
    "BetPlaced": "market",
    "MarketResolved": "market",
    "WinningsClaimed": "market",
    "MarketCreated": "factory",
    "MarketApproved": "factory",
    "FactoryPaused": "factory",
}


def envelope(
    seq: int, name: str = "BetPlaced", *, market: str | None = MARKET, pad: int = 0
) -> EventEnvelope:
    """A valid envelope as the indexer builds it, unique per seq (`pad` bytes bigger)."""
    kind = KINDS[name]
    if name == "FactoryPaused":
        market = None
    contract = market if kind == "market" and market is not None else FACTORY
    args: dict[str, Any] = {"timestamp": str(1762430400 + seq)}
    if name == "BetPlaced":
        args |= {"bettor": BETTOR, "outcome": "1", "outcomeName": "OUTCOME1", "amount": "1000"}
    if name == "MarketCreated":
        args |= {"marketAddress": market, "question": f"Will test {seq} pass?"}
    elif kind != "market" and market is not None:
        args["market"] = market  # the argument naming the market, as MarketApproved's
    if pad:
        args["memo"] = "x" * pad
    return EventEnvelope(
        type=name,
        seq=seq,
        chain_id=32323,
        contract=contract,
        contract_kind=kind,
        market_address=market,
        block_number=100 + seq,
        block_hash="0x" + f"{seq:064x}",
        transaction_hash="0x" + f"{seq + 2**200:064x}",
        log_index=0,
        timestamp=normalize_timestamp(1762430400 + seq),
        args=args,
    )


class EventProducer:
    """Appends events to a stream the way indexer/publisher.py does (ID <seq>-0, 3 fields)."""

    def __init__(self, redis: aioredis.Redis, key: str, *, maxlen: int = 100_000) -> None:
        self.redis = redis
        self.key = key
        self.maxlen = maxlen
        self.seq = 0

    async def publish(
        self,
        name: str = "BetPlaced",
        *,
        market: str | None = MARKET,
        count: int = 1,
        pad: int = 0,
    ) -> list[EventEnvelope]:
        """Append `count` events in one MULTI/EXEC; return their envelopes.

        Retried like the indexer's publisher: redis-py does not retry a transaction, and the
        first command after a Redis restart meets the old, closed connection.
        """
        envelopes = [envelope(self.seq + i + 1, name, market=market, pad=pad) for i in range(count)]
        for attempt in range(50):
            try:
                await self._append(envelopes)
                break
            except redis.exceptions.ConnectionError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        self.seq += count
        return envelopes

    async def _append(self, envelopes: list[EventEnvelope]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            for env in envelopes:
                assert env.seq is not None  # envelope() numbers every event
                channels = channels_for(env.type, env.contract_kind, env.market_address)
                fields: dict[FieldT, EncodableT] = {
                    "seq": env.seq,
                    "channels": " ".join(channels),
                    "event": env.to_json_bytes(),
                }
                pipe.xadd(
                    self.key,
                    fields,
                    id=f"{env.seq}-0",
                    maxlen=self.maxlen,
                    approximate=True,
                )
            await pipe.execute()

    async def publish_raw(
        self, fields: Mapping[FieldT, EncodableT], *, seq: int | None = None
    ) -> int:
        """Append an arbitrary entry (for invalid-entry tests); return its seq."""
        self.seq = self.seq + 1 if seq is None else seq
        await self.redis.xadd(self.key, dict(fields), id=f"{self.seq}-0")
        return self.seq

    async def recreate(self) -> None:
        """Delete the stream and number again from seq 1, as a store rebuilt from scratch would."""
        await self.redis.delete(self.key)
        self.seq = 0

    async def lose(self) -> list[StreamEntry]:
        """Delete the stream, as a Redis restarted without it would have lost it; return its
        entries as they were, for rewrite()."""
        entries = await read_stream(self.redis, self.key)
        await self.redis.delete(self.key)
        return entries

    async def rewrite(self, entries: Sequence[StreamEntry], *, pause: float = 0.0) -> None:
        """Write entries again as they were (the indexer's refill from its outbox, or what an
        older snapshot held), `pause` seconds after each."""
        for entry_id, fields in entries:
            await self.redis.xadd(self.key, fields, id=entry_id)  # type: ignore[arg-type]
            if pause:
                await asyncio.sleep(pause)

    async def trim_to(self, keep: int) -> None:
        """Trim the stream exactly, as MAXLEN would eventually."""
        await self.redis.xtrim(self.key, maxlen=keep, approximate=False)


async def read_stream(client: aioredis.Redis, key: str) -> list[StreamEntry]:
    """Every entry of the stream (XRANGE), oldest first."""
    return _stream_entries(await client.xrange(key))


async def read_stream_after(
    client: aioredis.Redis, key: str, after: str, *, block: int, count: int
) -> list[StreamEntry]:
    """Up to `count` entries after ID `after` (XREAD, waiting up to `block` ms for one)."""
    reply = await client.xread({key: after}, block=block, count=count)
    # redis-py's annotation covers RESP3 and decoded replies too; a default client gets
    # RESP2's [[key, entries]] ([] after an idle block).
    assert isinstance(reply, list), reply
    return [entry for _, entries in reply for entry in _stream_entries(entries)]


def _stream_entries(raw: StreamRangeResponse | None) -> list[StreamEntry]:
    """redis-py's entries narrowed to what a client without decode_responses gets: bytes."""
    return [(_as_bytes(entry_id), _bytes_fields(fields)) for entry_id, fields in raw or []]


def _bytes_fields(fields: dict[bytes | str, bytes | str] | None) -> dict[bytes, bytes]:
    assert fields is not None, "XRANGE and XREAD return no deleted (None) entries"
    return {_as_bytes(name): _as_bytes(value) for name, value in fields.items()}


def _as_bytes(value: bytes | str | None) -> bytes:
    assert isinstance(value, bytes), f"expected bytes (decode_responses=False): {value!r}"
    return value


class WsClient:
    """A real WebSocket client with helpers that wait with a timeout."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}

    async def send(self, message: Mapping[str, Any] | str | bytes) -> None:
        await self.ws.send(
            message if isinstance(message, str | bytes) else orjson.dumps(message).decode()
        )

    async def recv(self, within: float = WITHIN) -> dict[str, Any]:
        async with asyncio.timeout(within):
            raw = await self.ws.recv()
        message = orjson.loads(raw)
        assert isinstance(message, dict)
        return message

    async def expect(self, kind: str, within: float = WITHIN) -> dict[str, Any]:
        message = await self.recv(within)
        assert message["type"] == kind, message
        return message

    async def subscribe(
        self, channel: str, since: int | None = None, *, within: float = WITHIN
    ) -> dict[str, Any]:
        """Subscribe and return the ack; events replayed before the ack are in `replayed`."""
        body: dict[str, Any] = {"type": "subscribe", "channel": channel}
        if since is not None:
            body["since"] = since
        await self.send(body)
        replayed: list[dict[str, Any]] = []
        while True:
            message = await self.recv(within)
            if message["type"] == "subscribed":
                message["replayedEvents"] = replayed
                return message
            assert message["type"] == "event", message
            replayed.append(message)

    async def events(self, count: int, within: float = WITHIN) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(within):
            while len(got) < count:
                got.append(await self.expect("event", within))
        return got

    async def nothing(self, within: float = 0.3) -> None:
        """Assert that no message arrives for a while (used only to show an absence)."""
        with contextlib.suppress(TimeoutError):
            message = await self.recv(within)
            raise AssertionError(f"unexpected message: {message}")

    async def closed(self, within: float = WITHIN) -> tuple[int | None, str | None]:
        """Wait until the server closes the connection; return (code, reason)."""
        _, close = await self.messages_until_closed(within)
        return close

    async def messages_until_closed(
        self, within: float = WITHIN
    ) -> tuple[list[dict[str, Any]], tuple[int | None, str | None]]:
        """Read until the server closes the connection; return what came and (code, reason)."""
        received: list[dict[str, Any]] = []
        async with asyncio.timeout(within):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    received.append(orjson.loads(await self.ws.recv()))
        await self.ws.wait_closed()
        rcvd = self.ws.protocol.close_rcvd
        return received, ((rcvd.code, rcvd.reason) if rcvd else (None, None))


@contextlib.asynccontextmanager
async def ws_client(url: str, **kwargs: Any) -> AsyncIterator[WsClient]:
    async with connect(url, open_timeout=WITHIN, **kwargs) as ws:
        client = WsClient(ws)
        client.hello = await client.expect("connected")
        yield client


@dataclass
class Running:
    """A broadcaster running in this process."""

    settings: BroadcasterSettings
    task: asyncio.Task[None]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.settings.ws_port}{self.settings.ws_path}"

    @property
    def http(self) -> str:
        host = url_host(self.settings.broadcaster_http_host)
        return f"http://{host}:{self.settings.broadcaster_http_port}"

    @property
    def public_http(self) -> str:
        return f"http://127.0.0.1:{self.settings.ws_port}"

    async def get(self, path: str, base: str | None = None) -> tuple[int, bytes]:
        async with (
            aiohttp.ClientSession() as session,
            session.get((base or self.http) + path) as resp,
        ):
            return resp.status, await resp.read()

    async def health(self) -> dict[str, Any]:
        _, body = await self.get("/healthz")
        result = orjson.loads(body)
        assert isinstance(result, dict)
        return result

    async def wait_health(self, within: float = WITHIN, **expected: object) -> dict[str, Any]:
        """Wait until /healthz reports every expected key/value."""
        async with asyncio.timeout(within):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    body = await self.health()
                    if all(body.get(k) == v for k, v in expected.items()):
                        return body
                await asyncio.sleep(0.02)

    async def wait_metric(self, name: str, value: float, within: float = WITHIN) -> None:
        """Wait until metric() of `name` equals `value`."""
        async with asyncio.timeout(within):
            while True:
                if await self.metric(name) == value:
                    return
                await asyncio.sleep(0.02)

    async def metric(self, name: str) -> float:
        """The sum of a Prometheus metric's samples (all label sets)."""
        _, body = await self.get("/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
        return total


def settings_for(redis_url: str, stream_key: str, **overrides: Any) -> BroadcasterSettings:
    values: dict[str, Any] = {
        "REDIS_URL": redis_url,
        "REDIS_STREAM_KEY": stream_key,
        "WS_PORT": free_port(),
        "BROADCASTER_HTTP_PORT": free_port(),
        "LOG_LEVEL": "WARNING",
        "BROADCASTER_REDIS_TIMEOUT": 2.0,
    }
    values.update({key.upper(): value for key, value in overrides.items()})
    return BroadcasterSettings(_env_file=None, **values)  # type: ignore[call-arg]


def following(health: dict[str, Any]) -> bool:
    """Whether /healthz says the broadcaster follows the stream."""
    return health.get("seq") is not None


@contextlib.asynccontextmanager
async def running(
    settings: BroadcasterSettings,
    *,
    ready: Callable[[dict[str, Any]], bool] = following,
) -> AsyncIterator[Running]:
    """Run the broadcaster until the block exits; wait until its /healthz is `ready` (by
    default: it follows the stream)."""
    task = asyncio.create_task(run(settings), name="broadcaster-under-test")
    instance = Running(settings, task)
    try:
        async with asyncio.timeout(WITHIN):
            while True:
                if task.done():
                    task.result()
                    raise AssertionError("broadcaster stopped during start-up")
                with contextlib.suppress(aiohttp.ClientError):
                    if ready(await instance.health()):
                        break
                await asyncio.sleep(0.02)
        yield instance
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class BroadcasterProcess:
    """A `python -m broadcaster` of a test's own: its process, WebSocket URL and log file."""

    proc: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@contextlib.asynccontextmanager
async def broadcaster_process(
    redis_server: Redis,
    stream_key: str,
    tmp_path: Path,
    preexec_fn: Callable[[], None] | None = None,
    **settings: str,
) -> AsyncIterator[BroadcasterProcess]:
    """Start the broadcaster as PM2 would (JSON logs; `settings` override), wait until
    /healthz answers 200, and kill it after the block if it is still running."""
    port, ops = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "REDIS_URL": redis_server.url,
        "REDIS_STREAM_KEY": stream_key,
        "WS_PORT": str(port),
        "BROADCASTER_HTTP_PORT": str(ops),
        "LOG_FORMAT": "json",
        **settings,
    }
    log_path = tmp_path / "broadcaster.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broadcaster",
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    try:
        async with asyncio.timeout(15):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with (
                        aiohttp.ClientSession() as session,
                        session.get(f"http://127.0.0.1:{ops}/healthz") as resp,
                    ):
                        if resp.status == 200:
                            break
                assert proc.returncode is None, log_path.read_text()
                await asyncio.sleep(0.05)
        yield BroadcasterProcess(proc, port, log_path)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One WebSocket frame as a client sends it (masked)."""
    mask = os.urandom(4)
    length = len(payload)
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A hand-written WebSocket client for what real clients will not do: ignore pings, stop
    reading, send raw bytes. Its receive buffers are tiny so that not reading pushes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls,
        port: int,
        path: str = "/ws",
        *,
        rcvbuf: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        writer: asyncio.StreamWriter | None = None
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
            writer.write(handshake_request(f"127.0.0.1:{port}", path=path, headers=headers))
            async with asyncio.timeout(WITHIN):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
        except BaseException:
            # Cancelled or failed mid-handshake (a flooder stopped at the end of its block):
            # the socket must not be left for the collector to find open.
            if writer is None:
                sock.close()
            else:
                writer.close()
            raise
        return cls(reader, writer)

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        """Send one masked frame (clients must mask); fin=False for all but a message's last."""
        self.writer.write(client_frame(opcode, payload, fin=fin))

    async def read_frame(self) -> tuple[int, bytes]:
        head = await self.reader.readexactly(2)
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return head[0] & 0x0F, await self.reader.readexactly(length)

    async def until_close(self, within: float = WITHIN) -> tuple[int, str, list[bytes]]:
        """Read everything up to the server's close frame; return (code, reason, text frames)."""
        texts: list[bytes] = []
        async with asyncio.timeout(within):
            while True:
                opcode, payload = await self.read_frame()
                if opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if payload else 1005
                    return code, payload[2:].decode(), texts
                if opcode == 0x1:
                    texts.append(payload)

    def close(self) -> None:
        self.writer.transport.abort()

    def server_side(self) -> Connection:
        """This client's connection in the in-process server, to call as the loop would."""
        local = self.writer.get_extra_info("sockname")
        # type(), not isinstance(): the heap may hold a dead weakref.proxy, which raises.
        (connection,) = [
            o
            for o in gc.get_objects()
            if type(o) is Connection and o.is_open() and o.remote_address() == local
        ]
        return connection
