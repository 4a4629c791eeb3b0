"""A throwaway redis-server on loopback."""

from __future__ import annotations

import socket

from devnet.process import Process, Service, wait_until, which


class Redis(Service):
    """A redis-server with append-only persistence, so a restart keeps the data."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = which("redis-server", "install the Debian package redis-server")
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        self._process = Process(self.name, argv, self.workdir / "redis.log")
        self._process.spawn()
        wait_until("redis", self._pong, self._process)

    def _pong(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self._process is not None:
            self._process.kill()
