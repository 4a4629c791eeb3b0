"""A TCP proxy on a free 127.0.0.1 port, for network conditions the real services never show
on loopback: `delay` adds a round-trip time (half of it each way, as a remote database or
Redis across a network), `freeze()` silences the open connections without closing them, as a
dead network path (a half-open socket) would; `freeze_before = b"..."` does it the moment a
client sends those bytes, before they pass (e.g. b"COMMIT": the path dies with a transaction
open on the server); `stall_before = b"..."` instead stops reading from that client there, so
its writes block once the socket buffers are full, as on a path that stops taking data;
`freeze_new = True` silences the connections opened from then on, from their start. All
may be changed while the proxy runs. `frozen` says whether a freeze happened, and
`closed_while_frozen` counts the silenced connections their client gave up on and closed
(redis-py does, for one, when a command times out).

    async with TcpProxy(postgres.port) as proxy:
        proxy.delay = 0.005  # every round trip through proxy.port now takes 5 ms more
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self

__all__ = ["TcpProxy"]

CHUNK = 65536


class _Link:
    """One proxied connection: its two sockets and whether it was frozen."""

    def __init__(self, *writers: asyncio.StreamWriter) -> None:
        self.writers = writers
        self.frozen = False


class TcpProxy:
    """Forwards connections to 127.0.0.1:`target_port`, each byte in order, `delay`/2 late."""

    def __init__(
        self, target_port: int, *, delay: float = 0.0, receive_buffer: int | None = None
    ) -> None:
        self.target_port = target_port
        self.delay = delay
        # SO_RCVBUF of the client side, set before connections are accepted (it bounds what
        # a stalled connection can take: the kernel would otherwise grow it to megabytes).
        self.receive_buffer = receive_buffer
        self.freeze_before: bytes | None = None
        self.stall_before: bytes | None = None
        self.freeze_new = False
        self.closed_while_frozen = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.receive_buffer is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        listener.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._accept, sock=listener)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for link in self._links:
            for writer in link.writers:
                writer.transport.abort()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    def freeze(self) -> None:
        """From now on nothing more passes on the connections already open."""
        for link in self._links:
            link.frozen = True

    @property
    def frozen(self) -> bool:
        """Whether some connection was silenced (by freeze(), freeze_before or freeze_new)."""
        return any(link.frozen for link in self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        link.frozen = self.freeze_new
        self._links.append(link)
        self._spawn(self._pipe(reader, up_writer, link, from_client=True))
        self._spawn(self._pipe(up_reader, writer, link, from_client=False))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        pipe = asyncio.create_task(coro)
        self._pipes.add(pipe)
        pipe.add_done_callback(self._pipes.discard)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        link: _Link,
        *,
        from_client: bool,
    ) -> None:
        """Copy source to sink; chunks are queued with their due time so order is kept."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        deliver = asyncio.create_task(self._deliver(queue, sink, link))
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await source.read(CHUNK):
                    if from_client and self.freeze_before and self.freeze_before in data:
                        self.freeze()
                    if from_client and self.stall_before and self.stall_before in data:
                        await self._stall(link)
                    queue.put_nowait((loop.time() + self.delay / 2, data))
            if from_client and link.frozen:
                self.closed_while_frozen += 1
            queue.put_nowait((loop.time() + self.delay / 2, b""))  # end of stream
            await deliver
        finally:
            deliver.cancel()

    @staticmethod
    async def _stall(link: _Link) -> None:
        """Read nothing more from this link's client until the proxy closes (which cancels
        its pipes); the client's writes block once the socket buffers are full."""
        client = link.writers[0].transport
        assert isinstance(client, asyncio.ReadTransport)
        client.pause_reading()
        await asyncio.Future()

    @staticmethod
    async def _deliver(
        queue: asyncio.Queue[tuple[float, bytes]], sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if link.frozen:
                    continue
                if not data:
                    if sink.can_write_eof():
                        sink.write_eof()
                    return
                sink.write(data)
