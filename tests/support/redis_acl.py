"""A real redis-server running the ACL file that deploy/redis/render-acl.sh generates."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devnet.process import REPO_ROOT, free_port

RENDER_ACL = REPO_ROOT / "deploy" / "redis" / "render-acl.sh"
USERS = ("indexer", "broadcaster", "ops", "admin")
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class AclRedis:
    """Where the server listens and the generated password of each ACL user."""

    port: int
    passwords: dict[str, str]
    acl_file: Path

    def url(self, user: str | None = None, password: str | None = None) -> str:
        """redis:// URL logged in as `user` (None: no credentials, the default user)."""
        if user is None:
            return f"redis://127.0.0.1:{self.port}/0"
        secret = self.passwords[user] if password is None else password
        return f"redis://{user}:{secret}@127.0.0.1:{self.port}/0"


def render_acl(passwords: dict[str, str], *, stream_key: str) -> str:
    """Run the deploy renderer the way provision.sh does: passwords in the environment."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "REDIS_STREAM_KEY": stream_key,
        **{f"{user.upper()}_REDIS_PASSWORD": passwords[user] for user in USERS},
    }
    return subprocess.run(
        ["bash", str(RENDER_ACL)], env=env, check=True, capture_output=True, text=True
    ).stdout


def _authenticated_pong(port: int, password: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(f"AUTH admin {password}\r\nPING\r\n".encode())
            reply = b""
            while reply.count(b"\r\n") < 2:
                chunk = sock.recv(64)
                if not chunk:
                    return False
                reply += chunk
            return reply == b"+OK\r\n+PONG\r\n"
    except OSError:
        return False


@contextmanager
def acl_redis(workdir: Path, *, stream_key: str = "kektech:events") -> Iterator[AclRedis]:
    """Start redis-server on a free loopback port with the generated ACL file; stop it after."""
    passwords = {user: secrets.token_hex(16) for user in USERS}
    acl_file = workdir / "users.acl"
    acl_file.write_text(render_acl(passwords, stream_key=stream_key))
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    argv += ["--save", "", "--appendonly", "no", "--aclfile", str(acl_file)]
    log_path = workdir / "redis.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _authenticated_pong(port, passwords["admin"]):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server with the ACL file did not start:\n"
                    f"{log_path.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.05)
        yield AclRedis(port, passwords, acl_file)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
