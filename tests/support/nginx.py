"""The repository's nginx.conf run for real: rendered with test paths and ports only, a
throwaway self-signed certificate, /usr/sbin/nginx in the foreground, and small clients
that reach it as ws.kektech.xyz from a chosen loopback address."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from devnet.process import free_port
from tests.broadcaster.support import EventProducer, Running, WsClient, running, settings_for
from tests.broadcaster.support import ws_client as plain_ws_client
from tests.support.handshake import handshake_request

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "nginx.conf"
NGINX = "/usr/sbin/nginx"
HOST = "ws.kektech.xyz"
START_TIMEOUT = 10.0
# The field a test edge takes client addresses from (see with_claimed_addresses).
CLAIMED_IP_HEADER = "X-Test-Client-IP"
STOP_TIMEOUT = 5.0

# What the production file names, as the tests replace it (see render()).
PROD_CERT_DIR = "/etc/letsencrypt/live/ws.kektech.xyz/"
PROD_LOG_DIR = "/var/log/nginx/"
PROD_WEBROOT = "/var/www/certbot"
PROD_PID = "/run/nginx.pid"
PROD_USER_LINE = "user www-data;\n"
PROD_WS_PORTS = (3180, 3181)
PROD_HEALTH_PORTS = (9465, 9466)


@dataclass(frozen=True)
class Layout:
    """Where a rendered edge lives: one directory, readable by nginx's workers."""

    root: Path
    https_port: int
    http_port: int
    ws_ports: tuple[int, ...]
    health_ports: tuple[int, ...]

    @property
    def conf(self) -> Path:
        return self.root / "nginx.conf"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def cert(self) -> Path:
        return self.certs / "fullchain.pem"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def webroot(self) -> Path:
        return self.root / "certbot"


def substitutions(layout: Layout) -> list[tuple[str, str]]:
    """The only changes the tests make to nginx.conf: paths, ports, and the user line."""
    pairs = [
        ("listen 443", f"listen 127.0.0.1:{layout.https_port}"),
        ("listen [::]:443", f"listen [::1]:{layout.https_port}"),
        ("listen 80", f"listen 127.0.0.1:{layout.http_port}"),
        ("listen [::]:80", f"listen [::1]:{layout.http_port}"),
        (PROD_CERT_DIR, f"{layout.certs}/"),
        (PROD_LOG_DIR, f"{layout.logs}/"),
        (PROD_WEBROOT, str(layout.webroot)),
        (PROD_PID, str(layout.root / "nginx.pid")),
    ]
    pairs += [
        (f"127.0.0.1:{prod}", f"127.0.0.1:{port}")
        for prod, port in zip(PROD_WS_PORTS, layout.ws_ports, strict=True)
    ]
    pairs += [
        (f"127.0.0.1:{prod}", f"127.0.0.1:{port}")
        for prod, port in zip(PROD_HEALTH_PORTS, layout.health_ports, strict=True)
    ]
    if os.geteuid() != 0:
        # Only root can switch workers to www-data; unprivileged, they run as the caller.
        pairs.append((PROD_USER_LINE, ""))
    return pairs


def render(template: str, layout: Layout) -> str:
    """nginx.conf with the test's paths and ports; fails if the template lost one of them.

    All substitutions are made in one pass over the template: one after the other, a later
    one could match inside what an earlier one wrote (a test port such as 31805 contains
    the production upstream "127.0.0.1:3180", which then became a port above 65535).
    """
    pairs = substitutions(layout)
    for old, _ in pairs:
        assert old in template, f"nginx.conf no longer contains {old!r}"
    return substitute(template, pairs)


def substitute(text: str, pairs: Sequence[tuple[str, str]]) -> str:
    """Replace each `old` of pairs by its `new`, all in one pass over text."""
    replacements = dict(pairs)
    pattern = "|".join(re.escape(old) for old in sorted(replacements, key=len, reverse=True))
    return re.sub(pattern, lambda found: replacements[found[0]], text)


def make_certificate(certs: Path) -> None:
    """A throwaway self-signed certificate for ws.kektech.xyz and 127.0.0.1 (EC P-256)."""
    certs.mkdir(parents=True, exist_ok=True)
    key, cert = certs / "privkey.pem", certs / "fullchain.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={HOST}",
            "-addext",
            f"subjectAltName=DNS:{HOST},IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )


def client_context(cert: Path, *, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """A verifying TLS client context that trusts only the throwaway certificate."""
    context = ssl.create_default_context(cafile=str(cert))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


@dataclass
class Nginx:
    """nginx in the foreground on a rendered copy of the repository's nginx.conf."""

    layout: Layout
    process: subprocess.Popen[bytes] | None = None

    def command(self, *extra: str) -> list[str]:
        return [NGINX, "-p", f"{self.layout.root}/", "-c", str(self.layout.conf), *extra]

    def check(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on the rendered file."""
        return subprocess.run(
            self.command("-t"), capture_output=True, text=True, timeout=30, check=False
        )

    def start(self) -> None:
        stderr = (self.layout.logs / "stderr.log").open("wb")
        with stderr:
            # Its own process group: a KILL must reach the workers, not only the master.
            self.process = subprocess.Popen(
                self.command("-g", "daemon off;"),
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._accepting():
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx not accepting after {START_TIMEOUT}s:\n{self.logs()}")
            time.sleep(0.02)

    def _accepting(self) -> bool:
        for port in (self.layout.https_port, self.layout.http_port):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    return False
        return True

    def worker_pids(self, within: float = 10.0) -> list[int]:
        """The worker processes' ids (the master's children), once all of them are started.

        The master listens before it forks the workers (`worker_processes auto`: one per
        CPU), so right after start-up some may not exist yet.
        """
        assert self.process is not None
        pid = self.process.pid
        expected = os.cpu_count() or 1
        deadline = time.monotonic() + within
        while True:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if len(children) >= expected or time.monotonic() > deadline:
                return [int(child) for child in children]
            time.sleep(0.02)

    def stop(self) -> None:
        """Graceful stop (QUIT), then KILL of master and workers if it has not exited in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Workers still relaying WebSockets hold QUIT up; the master is not reaped yet, so
            # its group id is still this nginx's: kill master and workers together.
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)

    def logs(self) -> str:
        """Every log nginx wrote, for failure messages."""
        parts = []
        for path in sorted(self.layout.logs.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


@contextlib.contextmanager
def nginx_edge(
    *, ws_ports: Sequence[int], health_ports: Sequence[int], template: str | None = None
) -> Iterator[Nginx]:
    """Render nginx.conf for these upstream ports, start nginx, stop it and clean up after."""
    # Not pytest's tmp_path: that is private to root (0700) and the workers run as www-data.
    root = Path(tempfile.mkdtemp(prefix="kektech-nginx-"))
    root.chmod(0o755)
    layout = Layout(
        root=root,
        https_port=free_port(),
        http_port=free_port(),
        ws_ports=tuple(ws_ports),
        health_ports=tuple(health_ports),
    )
    server = Nginx(layout)
    try:
        layout.logs.mkdir()
        (layout.webroot / ".well-known" / "acme-challenge").mkdir(parents=True)
        for directory in (layout.webroot, layout.webroot / ".well-known"):
            directory.chmod(0o755)
        (layout.webroot / ".well-known" / "acme-challenge").chmod(0o755)
        make_certificate(layout.certs)
        source = TEMPLATE.read_text() if template is None else template
        layout.conf.write_text(render(source, layout))
        checked = server.check()
        assert checked.returncode == 0, checked.stderr
        server.start()
        yield server
    except BaseException:
        print(server.logs())  # pytest shows it with the failure
        raise
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Edge:
    """nginx in front of broadcaster instances running in this process, and a producer."""

    nginx: Nginx
    broadcasters: list[Running]
    producer: EventProducer
    _ips: Iterator[int] = field(default_factory=lambda: iter(range(10, 250)))

    @property
    def layout(self) -> Layout:
        return self.nginx.layout

    @property
    def wss_url(self) -> str:
        return f"wss://{HOST}:{self.layout.https_port}/ws"

    def new_ip(self) -> str:
        """A loopback source address no other test used: nginx's limits are per IP."""
        return f"127.0.0.{next(self._ips)}"

    def ws_options(self, source: str, **extra: Any) -> dict[str, Any]:
        """websockets.connect arguments: TLS as ws.kektech.xyz to 127.0.0.1, from `source`."""
        return {
            "ssl": client_context(self.layout.cert),
            "host": "127.0.0.1",
            "port": self.layout.https_port,
            "server_hostname": HOST,
            "local_addr": (source, 0),
            "proxy": None,
            **extra,
        }

    def ws_client(
        self, source: str, **extra: Any
    ) -> contextlib.AbstractAsyncContextManager[WsClient]:
        return plain_ws_client(self.wss_url, **self.ws_options(source, **extra))

    async def metric(self, name: str) -> float:
        """A broadcaster metric summed over every instance."""
        return sum([await instance.metric(name) for instance in self.broadcasters])


async def http_get(
    edge: Edge,
    path: str,
    *,
    source: str,
    headers: dict[str, str] | None = None,
    host: str = HOST,
    scheme: str = "https",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request to nginx as `host`; the body as sent (not decompressed)."""
    port = edge.layout.https_port if scheme == "https" else edge.layout.http_port
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    request_headers = {"Host": host, "Accept-Encoding": "identity", **(headers or {})}
    async with (
        aiohttp.ClientSession(connector=connector, auto_decompress=False) as session,
        session.get(
            f"{scheme}://127.0.0.1:{port}{path}",
            headers=request_headers,
            ssl=client_context(edge.layout.cert) if scheme == "https" else False,
            server_hostname=HOST if scheme == "https" else None,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


@contextlib.asynccontextmanager
async def running_edge(
    redis_url: str, stream_key: str, *, template: str | None = None, **broadcaster_overrides: Any
) -> AsyncIterator[Edge]:
    """Two broadcaster instances (as PM2 runs them) behind nginx, and an event producer.

    `template` replaces nginx.conf's text (to show that a test fails on a broken file).
    """
    redis = aioredis.Redis.from_url(redis_url)
    try:
        producer = EventProducer(redis, stream_key)
        await producer.publish()  # the stream exists before the broadcasters follow it
        settings = [settings_for(redis_url, stream_key, **broadcaster_overrides) for _ in range(2)]
        async with running(settings[0]) as first, running(settings[1]) as second:
            with nginx_edge(
                ws_ports=[s.ws_port for s in settings],
                health_ports=[s.broadcaster_http_port for s in settings],
                template=template,
            ) as server:
                yield Edge(server, [first, second], producer)
    finally:
        await redis.aclose()


def with_claimed_addresses(template: str) -> str:
    """nginx.conf that takes the client address of a loopback connection from the
    CLAIMED_IP_HEADER field (realip, which sets the address before any limit counts it): the
    only way to reach nginx from IPv6 addresses a loopback interface does not have."""
    anchor = "    limit_req_status 429;\n"
    assert anchor in template, "nginx.conf no longer sets limit_req_status"
    trust = f"    set_real_ip_from 127.0.0.0/8;\n    real_ip_header {CLAIMED_IP_HEADER};\n"
    return template.replace(anchor, trust + anchor)


async def handshake_statuses(
    edge: Edge, *, source: str, count: int, claimed: Sequence[str] = ()
) -> list[int]:
    """Open `count` TLS connections from one IP, then send every upgrade request at once.

    TLS handshakes first, so that the HTTP requests reach nginx within a millisecond or two:
    an "instant" burst for limit_req, whatever the machine's speed. `claimed`: the address
    each request claims, for an edge rendered with_claimed_addresses.
    """
    if claimed and len(claimed) != count:
        raise ValueError("claim one address per connection")
    context = client_context(edge.layout.cert)
    streams = [
        await asyncio.open_connection(
            "127.0.0.1",
            edge.layout.https_port,
            ssl=context,
            server_hostname=HOST,
            local_addr=(source, 0),
        )
        for _ in range(count)
    ]
    try:
        for i, (_, writer) in enumerate(streams):
            headers = {CLAIMED_IP_HEADER: claimed[i]} if claimed else None
            writer.write(handshake_request(HOST, key="dGhlIHNhbXBsZSBub25jZQ==", headers=headers))
        async with asyncio.timeout(10):
            heads = await asyncio.gather(*(reader.readuntil(b"\r\n") for reader, _ in streams))
        return [int(head.split()[1]) for head in heads]
    finally:
        for _, writer in streams:
            writer.transport.abort()
