"""`kektech doctor`: all OK against running services; each dependency broken for real is named
in a FAIL (or WARN) line with its fix."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from devnet.anvil_node import Anvil
from devnet.chain import Deployment, DevChain
from devnet.driver import ActivityDriver
from devnet.postgres_server import Postgres
from devnet.redis_server import Redis
from indexer.database import Database
from indexer.schema import latest_schema_version, migrate
from tests.broadcaster.support import EventProducer, running, settings_for
from tests.support.database import connected
from tests.support.indexer_process import IndexerProcess, indexer_env
from tests.support.ops import (
    dead_port,
    make_certificate,
    other_http_server,
    pm2_daemon,
    run_kektech,
    tls_server,
    waiting_indexer_env,
    write_script,
)
from tests.support.rpc_proxy import RpcFaultProxy
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

NGINX = "/usr/sbin/nginx"
STEADY = "import time\nwhile True:\n    time.sleep(60)\n"
API_KEY = "abcdefghijklmnopqrstuvwxyz123456"
RPC_PASSWORD = "Sup3rSecretPassw0rd"


def nginx_conf(directory: Path, body: str = "") -> Path:
    """A minimal nginx.conf whose files all live in directory; body goes into http {}."""
    path = directory / "nginx.conf"
    path.write_text(
        f"pid {directory}/nginx.pid;\nerror_log {directory}/error.log;\nevents {{}}\n"
        f"http {{\n    access_log off;\n{body}}}\n"
    )
    return path


@contextlib.asynccontextmanager
async def hanging_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never says a word; yields its port."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(180)
async def test_all_ok_against_running_services(
    anvil: Anvil,
    dev_chain: DevChain,
    deployment: Deployment,
    database_url: str,
    redis_server: Redis,
    tmp_path: Path,
) -> None:
    """Every check is OK with the services up, and no secret of the settings is printed."""
    stream_key = f"test:{os.getpid()}:doctor"
    await ActivityDriver(dev_chain, deployment, seed=71, txs_per_block=3).run(blocks=2)
    env = indexer_env(
        database_url=database_url,
        redis_url=redis_server.url,
        rpc_url=anvil.rpc_url,
        deployment=deployment,
        stream_key=stream_key,
    )
    cert, key = make_certificate(tmp_path, days=90)
    first = settings_for(redis_server.url, stream_key)
    second = settings_for(redis_server.url, stream_key)
    async with (
        aioredis.Redis.from_url(redis_server.url) as redis,
        pm2_daemon() as pm2,
        running(first),
        running(second),
        tls_server(cert, key) as tls_port,
    ):
        with IndexerProcess(env, log_dir=tmp_path) as indexer:
            await indexer.wait_ready()

            async def published() -> bool:
                return int(await redis.xlen(stream_key)) > 0

            await eventually(published, within=30, what="the indexer published")
            steady = write_script(tmp_path / "steady.py", STEADY)
            await pm2.start("kektech-event-indexer", steady)
            await pm2.start("kektech-websocket-server", steady)
            doctor_env = {
                **env,
                **pm2.env,
                "RPC_PROVIDER_URL": anvil.rpc_url.replace("http://", f"http://ops:{RPC_PASSWORD}@")
                + f"/?apikey={API_KEY}",
                "DOCTOR_BROADCASTER_PORTS": (
                    f"{first.broadcaster_http_port},{second.broadcaster_http_port}"
                ),
                "DOCTOR_NGINX_BIN": NGINX,
                "DOCTOR_NGINX_CONF": str(nginx_conf(tmp_path)),
                "OPS_TLS_ENDPOINT": f"127.0.0.1:{tls_port}",
                "OPS_TLS_CA_FILE": str(cert),
            }
            result = await run_kektech("doctor", env=doctor_env, cwd=tmp_path)
    assert result.code == 0, result
    assert result.checks == [
        f"rpc #0 127.0.0.1:{anvil.port}",
        "redis",
        "postgres",
        "indexer",
        f"broadcaster :{first.broadcaster_http_port}",
        f"broadcaster :{second.broadcaster_http_port}",
        "pm2 kektech-event-indexer",
        "pm2 kektech-websocket-server",
        "nginx",
        f"tls 127.0.0.1:{tls_port}",
    ], result
    assert all(line.startswith("OK    ") for line in result.lines), result
    assert "chain 32323, head block" in result.line(f"rpc #0 127.0.0.1:{anvil.port}")
    latest = latest_schema_version()
    assert f"migrated (schema version {latest} of {latest}), cursor at block" in result.line(
        "postgres"
    )
    assert API_KEY not in result.stdout + result.stderr
    assert RPC_PASSWORD not in result.stdout + result.stderr


async def test_wrong_chain_id_fails(anvil: Anvil, tmp_path: Path) -> None:
    """An RPC node on another chain than CHAIN_ID is a FAIL naming both ids."""
    env = {"RPC_PROVIDER_URL": anvil.rpc_url, "CHAIN_ID": "1"}
    result = await run_kektech("doctor", "--only", "rpc", env=env, cwd=tmp_path)
    assert result.code == 1, result
    line = result.line(f"rpc #0 127.0.0.1:{anvil.port}")
    assert line.startswith("FAIL  ")
    assert "eth_chainId is 32323, CHAIN_ID is 1 -> fix: point RPC_PROVIDER_URL at a node" in line


async def test_dead_rpc_fails_alone_and_warns_beside_a_working_one(
    anvil: Anvil, tmp_path: Path
) -> None:
    """A dead RPC URL is a FAIL when it is the only one, a WARN when the indexer can fail over."""
    dead = f"http://127.0.0.1:{dead_port()}"
    alone = await run_kektech(
        "doctor", "--only", "rpc", env={"RPC_PROVIDER_URL": dead}, cwd=tmp_path
    )
    assert alone.code == 1, alone
    assert alone.stdout.startswith(f"FAIL  rpc #0 {dead.removeprefix('http://')}  unreachable")
    assert "-> fix: check the URL and its API key" in alone.stdout

    env = {"RPC_PROVIDER_URL": f"{anvil.rpc_url},{dead}"}
    both = await run_kektech("doctor", "--only", "rpc", env=env, cwd=tmp_path)
    assert both.code == 0, both
    assert both.lines[0].startswith("OK    rpc #0")
    assert both.lines[1].startswith(f"WARN  rpc #1 {dead.removeprefix('http://')}  unreachable")
    assert "fails over to a working URL" in both.lines[1]

    # A node on another chain is no URL to fail over to: the dead one is a FAIL then.
    wrong_chain = await run_kektech(
        "doctor", "--only", "rpc", env=env | {"CHAIN_ID": "1"}, cwd=tmp_path
    )
    assert wrong_chain.code == 1, wrong_chain
    assert wrong_chain.lines[1].startswith("FAIL  rpc #1"), wrong_chain
    assert "fails over" not in wrong_chain.lines[1]


async def test_a_failing_rpc_url_is_named_by_its_own_index(tmp_path: Path) -> None:
    """The detail of a failing URL names the endpoint as the line does (#1 for the second
    URL), not as #0, the index it had in the one-URL client that probed it."""
    first, second = f"127.0.0.1:{dead_port()}", f"127.0.0.1:{dead_port()}"
    env = {"RPC_PROVIDER_URL": f"http://{first},http://{second}"}
    result = await run_kektech("doctor", "--only", "rpc", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert f"last: connect at #0 {first}: " in result.line(f"rpc #0 {first}"), result
    assert f"last: connect at #1 {second}: " in result.line(f"rpc #1 {second}"), result


async def test_a_slow_node_within_the_timeout_is_ok(anvil: Anvil, tmp_path: Path) -> None:
    """Each probe may take up to OPS_TIMEOUT, and the rpc check makes two in a row: a node
    answering each in 3.5 s (timeout 6 s) is OK, not cut off as a whole after one timeout
    (7 s in all). The margin of each probe to its timeout is wide: a loaded machine may add
    a second or two to an answer."""
    async with RpcFaultProxy(anvil.rpc_url, seed=1) as proxy:
        proxy.delay = 3.5
        env = {"RPC_PROVIDER_URL": proxy.url, "OPS_TIMEOUT": "6"}
        result = await run_kektech("doctor", "--only", "rpc", env=env, cwd=tmp_path)
    assert result.code == 0, result
    assert result.lines[0].startswith("OK    rpc #0"), result


async def test_stopped_redis_fails(tmp_path: Path) -> None:
    """A Redis that was stopped is a FAIL saying the connection failed, with the fix."""
    with Redis() as stopped:
        url = stopped.url
    result = await run_kektech("doctor", "--only", "redis", env={"REDIS_URL": url}, cwd=tmp_path)
    assert result.code == 1, result
    line = result.line("redis")
    assert line.startswith("FAIL  redis  cannot connect: ")
    assert "-> fix: sudo systemctl status redis-server" in line


async def test_missing_stream_warns(redis_server: Redis, tmp_path: Path) -> None:
    """A reachable Redis without the event stream is a WARN (exit 0) pointing at the indexer."""
    env = {"REDIS_URL": redis_server.url, "REDIS_STREAM_KEY": f"test:{os.getpid()}:absent"}
    result = await run_kektech("doctor", "--only", "redis", env=env, cwd=tmp_path)
    assert result.code == 0, result
    assert result.line("redis").startswith("WARN  redis  PING ok, but stream test:")
    assert "-> fix: start the indexer" in result.stdout


async def test_unmigrated_database_fails(database_url: str, tmp_path: Path) -> None:
    """An empty database is a FAIL saying which schema version it has, with the migrate fix."""
    env = {"DATABASE_URL": database_url}
    result = await run_kektech("doctor", "--only", "postgres", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert result.line("postgres") == (
        f"FAIL  postgres  not migrated: schema version 0 of {latest_schema_version()} "
        "-> fix: cd /opt/kektech && .venv/bin/python -m indexer migrate "
        "(starting the indexer also migrates)"
    )


async def test_contracts_waiting_for_their_backfill_are_a_warning(
    database_url: str, tmp_path: Path
) -> None:
    """A migrated database where contracts added after indexing began still need their
    backfill is a WARN naming them, with the one backfill that covers them all (the service
    stopped around it): the indexer only logs it at its start."""
    factory, manager = "0x" + "f2" * 20, "0x" + "e1" * 20
    async with Database.open(database_url, command_timeout=10.0) as db:
        await migrate(db)
        await db.execute(
            "INSERT INTO indexer_state (id, chain_id, block_number, block_hash, began_at)"
            " VALUES (1, 32323, 900, $1, 100)",
            "0x" + "ab" * 32,
        )
        await db.execute(
            "INSERT INTO sources (address, kind, since_block) VALUES"
            " ($1, 'factory', 100), ($2, 'factory', 501), ($3, 'resolution_manager', 801)",
            "0x" + "f1" * 20,
            factory,
            manager,
        )
    env = {"DATABASE_URL": database_url}
    result = await run_kektech("doctor", "--only", "postgres", env=env, cwd=tmp_path)
    assert result.code == 0, result
    assert result.line("postgres") == (
        f"WARN  postgres  migrated (schema version {latest_schema_version()} of"
        f" {latest_schema_version()}), cursor at block 900; added after indexing began, their"
        f" earlier events not stored until backfilled: resolution_manager {manager} (from block"
        f" 801), factory {factory} (from block 501) -> fix: pm2 stop kektech-event-indexer;"
        " cd /opt/kektech && .venv/bin/python -m indexer backfill --from 100 --to 800;"
        " pm2 start kektech-event-indexer"
    )


async def test_another_applications_database_fails(database_url: str, tmp_path: Path) -> None:
    """A DATABASE_URL naming another application's database (its own schema_migrations) is a
    FAIL saying so, not a connection failure."""
    async with connected(database_url) as admin:
        await admin.execute("CREATE TABLE schema_migrations (version bigint, dirty boolean)")
    env = {"DATABASE_URL": database_url}
    result = await run_kektech("doctor", "--only", "postgres", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert result.line("postgres").startswith(
        "FAIL  postgres  the database has a schema_migrations table of another application"
        " (dirty boolean, version bigint)"
    ), result


async def test_a_read_only_database_fails(database_url: str, tmp_path: Path) -> None:
    """A database that answers but takes no writes is a FAIL, though migrated: the indexer
    waits on it (or stopped on it), and reads alone said "migrated", as if all were well."""
    async with connected(database_url) as admin:
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    env = {"DATABASE_URL": database_url}
    result = await run_kektech("doctor", "--only", "postgres", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert result.line("postgres") == (
        "FAIL  postgres  read-only: it takes no writes (a standby, or Supabase's read-only mode"
        " once its disk is nearly full), so the indexer waits"
        " -> fix: see the Supabase dashboard (disk size) or the server"
        " (SELECT pg_is_in_recovery(); SHOW default_transaction_read_only)"
    )


@pytest.mark.timeout(120)
async def test_indexer_that_cannot_publish_fails(
    anvil: Anvil, dev_chain: DevChain, deployment: Deployment, database_url: str, tmp_path: Path
) -> None:
    """Redis stopped under a running indexer: the indexer check FAILs, events wait in Postgres."""
    with Redis() as own:
        env = indexer_env(
            database_url=database_url,
            redis_url=own.url,
            rpc_url=anvil.rpc_url,
            deployment=deployment,
            stream_key="kektech:events",
        )
        with IndexerProcess(env, log_dir=tmp_path) as indexer:
            await indexer.wait_ready()
            own.stop()
            await ActivityDriver(dev_chain, deployment, seed=74, txs_per_block=3).run(blocks=1)

            async def backlog() -> bool:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(indexer.http_url + "/metrics") as response,
                ):
                    text = await response.text()
                return "kektech_indexer_publish_backlog 0.0" not in text

            await eventually(backlog, within=30, what="a publish backlog")
            result = await run_kektech("doctor", "--only", "redis,indexer", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert result.line("redis").startswith("FAIL  redis  cannot connect")
    indexer_line = result.line("indexer")
    assert indexer_line.startswith("FAIL  indexer  cannot reach Redis (cursor ")
    assert "-> fix: see the redis check; events wait in the outbox" in indexer_line


@pytest.mark.timeout(120)
async def test_a_standby_indexer_is_a_warning_not_a_redis_failure(
    anvil: Anvil, deployment: Deployment, database_url: str, redis_server: Redis, tmp_path: Path
) -> None:
    """A second indexer waiting for the write lease publishes nothing, so its Redis gauge says
    nothing about Redis: doctor reports it as a standby (WARN, exit 0), not as cut off."""

    def env() -> dict[str, str]:
        return indexer_env(
            database_url=database_url,
            redis_url=redis_server.url,
            rpc_url=anvil.rpc_url,
            deployment=deployment,
            stream_key="kektech:events",
        )

    with IndexerProcess(env(), log_dir=tmp_path) as leader:
        await leader.wait_ready()
        standby_env = env()
        with IndexerProcess(standby_env, log_dir=tmp_path) as standby:

            async def waiting() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    return (await standby.get("/ready"))[1].get("role") == "standby"
                return False

            await eventually(waiting, within=30, what="the second indexer waits as standby")
            result = await run_kektech("doctor", "--only", "indexer", env=standby_env, cwd=tmp_path)
    assert result.code == 0, result
    assert result.line("indexer").startswith("WARN  indexer  standby"), result


async def test_an_indexer_waiting_for_its_database_fails_with_the_reason(
    anvil: Anvil, deployment: Deployment, redis_server: Redis, tmp_path: Path
) -> None:
    """An indexer whose start-up waits for an unreachable database answers on /healthz but
    indexes nothing: doctor FAILs it, saying what it waits for."""
    env = waiting_indexer_env(anvil, deployment, redis_server)
    with IndexerProcess(env, log_dir=tmp_path) as indexer:
        await indexer.wait_waiting_for("database")
        result = await run_kektech("doctor", "--only", "indexer", env=env, cwd=tmp_path)
    assert result.code == 1, result
    line = result.line("indexer")
    assert line.startswith("FAIL  indexer  start-up waits for: database unreachable"), result
    assert "-> fix: see the postgres and rpc checks" in line


async def test_an_indexer_in_its_first_start_up_attempt_is_not_to_be_restarted(
    deployment: Deployment, database_url: str, redis_server: Redis, tmp_path: Path
) -> None:
    """An indexer still in its first try at its dependencies (here an RPC endpoint that
    never answers, within RPC_TIMEOUT) is a WARN whose fix is to look at them: a restart, the
    fix it gave, only begins the wait again."""
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = indexer_env(
            database_url=database_url,
            redis_url=redis_server.url,
            rpc_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            deployment=deployment,
            stream_key="kektech:events",
            RPC_TIMEOUT="60",
        )
        with IndexerProcess(env, log_dir=tmp_path) as indexer:

            async def starting() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    return (await indexer.get("/ready"))[1].get("role") == "starting"
                return False

            await eventually(starting, within=30, what="the indexer answering while it starts")
            result = await run_kektech("doctor", "--only", "indexer", env=env, cwd=tmp_path)
    assert result.code == 0, result
    line = result.line("indexer")
    assert line == (
        "WARN  indexer  starting: still connecting to its database and RPC endpoint"
        " -> fix: see the postgres and rpc checks; pm2 logs kektech-event-indexer --lines 100"
    ), result


async def test_a_leader_whose_database_stopped_answering_fails_with_the_reason(
    anvil: Anvil,
    deployment: Deployment,
    postgres: Postgres,
    database_url: str,
    redis_server: Redis,
    tmp_path: Path,
) -> None:
    """The path to the database of a running leader freezes: until DB_COMMAND_TIMEOUT ends
    it, the indexer still answers, as the leader, but its lease went unrenewed and a standby
    may hold it: doctor FAILs it with that reason (it said nothing but the lag, later)."""
    async with TcpProxy(postgres.port) as proxy:
        env = indexer_env(
            database_url=database_url.replace(f":{postgres.port}/", f":{proxy.port}/"),
            redis_url=redis_server.url,
            rpc_url=anvil.rpc_url,
            deployment=deployment,
            stream_key="kektech:events",
            LEASE_TTL="2",
        )
        with IndexerProcess(env, log_dir=tmp_path) as indexer:
            await indexer.wait_ready()
            proxy.freeze()
            await indexer.wait_waiting_for("write lease", within=10)
            result = await run_kektech("doctor", "--only", "indexer", env=env, cwd=tmp_path)
    assert result.code == 1, result
    line = result.line("indexer")
    assert line.startswith("FAIL  indexer  leader waits for: the database: the write lease"), line
    assert "-> fix: see the postgres check" in line


async def test_services_not_running_fail(tmp_path: Path) -> None:
    """An indexer and a broadcaster that do not run are FAILs with the PM2 commands to fix."""
    env = {
        "INDEXER_HTTP_PORT": str(dead_port()),
        "DOCTOR_BROADCASTER_PORTS": str(port := dead_port()),
    }
    result = await run_kektech("doctor", "--only", "indexer,broadcaster", env=env, cwd=tmp_path)
    assert result.code == 1, result
    indexer = result.line("indexer")
    assert indexer.startswith("FAIL  indexer  not answering: nothing answers at")
    assert "pm2 restart kektech-event-indexer" in indexer
    broadcaster = result.line(f"broadcaster :{port}")
    assert broadcaster.startswith(f"FAIL  broadcaster :{port}  not answering")
    assert "pm2 restart kektech-websocket-server" in broadcaster


async def test_nginx_syntax_error_fails(tmp_path: Path) -> None:
    """A configuration nginx -t rejects is a FAIL quoting nginx's error and file:line."""
    conf = nginx_conf(tmp_path, "    server {\n        listen 127.0.0.1:1;\n        bogus on;\n")
    env = {"DOCTOR_NGINX_BIN": NGINX, "DOCTOR_NGINX_CONF": str(conf)}
    result = await run_kektech("doctor", "--only", "nginx", env=env, cwd=tmp_path)
    assert result.code == 1, result
    line = result.line("nginx")
    assert line.startswith(f'FAIL  nginx  {conf}: [emerg] unknown directive "bogus" in {conf}:')
    assert "-> fix: correct the file and line named, then sudo nginx -t" in line


@pytest.mark.skipif(not Path(NGINX).is_file(), reason="needs nginx in /usr/sbin")
async def test_nginx_in_usr_sbin_is_found_off_path(tmp_path: Path) -> None:
    """The app user's PATH on Debian lacks /usr/sbin, where the nginx package puts nginx:
    DOCTOR_NGINX_BIN=nginx (the default) is found there all the same."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "DOCTOR_NGINX_CONF": str(nginx_conf(tmp_path))}
    result = await run_kektech("doctor", "--only", "nginx", env=env, cwd=tmp_path)
    assert result.code == 0, result
    assert result.line("nginx").startswith("OK    nginx  "), result


# What nginx 1.22 with OpenSSL 3 says when the certificate's directory is root-only (certbot
# keeps /etc/letsencrypt/live 0700) and `nginx -t` runs as the kektech user.
CERTIFICATE_DENIED = (
    'nginx: [emerg] cannot load certificate "/etc/letsencrypt/live/ws.kektech.xyz/fullchain.pem":'
    " BIO_new_file() failed (SSL: error:8000000D:system library::Permission denied:calling"
    " fopen(/etc/letsencrypt/live/ws.kektech.xyz/fullchain.pem, r)"
    " error:10080002:BIO routines::system lib)"
)


async def test_nginx_test_refused_a_root_only_certificate_warns(tmp_path: Path) -> None:
    """`nginx -t` run without root fails on the root-only certificate (OpenSSL 3's wording,
    not nginx's own "(13: Permission denied)"): a WARN to run it with sudo, not a FAIL."""
    fake = tmp_path / "nginx"
    fake.write_text(
        "#!/bin/sh\n"
        f"echo '{CERTIFICATE_DENIED}' >&2\n"
        "echo 'nginx: configuration file /etc/nginx/nginx.conf test failed' >&2\n"
        "exit 1\n"
    )
    fake.chmod(0o755)
    env = {"DOCTOR_NGINX_BIN": str(fake), "DOCTOR_NGINX_CONF": str(nginx_conf(tmp_path))}
    result = await run_kektech("doctor", "--only", "nginx", env=env, cwd=tmp_path)
    assert result.code == 0, result
    line = result.line("nginx")
    assert line.startswith("WARN  nginx  cannot test"), line
    assert "-> fix: run sudo nginx -t" in line


@pytest.mark.parametrize(("days", "level", "code"), [(3, "FAIL", 1), (10, "WARN", 0)])
async def test_expiring_certificate(tmp_path: Path, days: int, level: str, code: int) -> None:
    """A certificate with under 7 days left is a FAIL, under 14 days a WARN, with certbot fix."""
    cert, key = make_certificate(tmp_path, days=days)
    async with tls_server(cert, key) as port:
        env = {"OPS_TLS_ENDPOINT": f"127.0.0.1:{port}", "OPS_TLS_CA_FILE": str(cert)}
        result = await run_kektech("doctor", "--only", "tls", env=env, cwd=tmp_path)
    assert result.code == code, result
    line = result.line(f"tls 127.0.0.1:{port}")
    assert line.startswith(f"{level:<4}  tls 127.0.0.1:{port}  certificate expires ")
    assert "-> fix: sudo certbot renew" in line


async def test_untrusted_certificate_fails(tmp_path: Path) -> None:
    """A certificate that does not verify against the CA store is a FAIL."""
    cert, key = make_certificate(tmp_path, days=90)
    async with tls_server(cert, key) as port:
        env = {"OPS_TLS_ENDPOINT": f"127.0.0.1:{port}"}  # the system CAs never signed it
        result = await run_kektech("doctor", "--only", "tls", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert "does not verify: self-signed certificate" in result.line(f"tls 127.0.0.1:{port}")


async def test_a_tls_endpoint_not_reached_gets_the_fix_for_its_cause(tmp_path: Path) -> None:
    """A name that does not resolve is a DNS matter, not Nginx's or the firewall's; a port
    that refuses names its own port in the firewall fix (it said 443 whatever the port)."""
    env = {"OPS_TLS_ENDPOINT": "no-such-host.invalid:443"}
    result = await run_kektech("doctor", "--only", "tls", env=env, cwd=tmp_path)
    line = result.line("tls no-such-host.invalid:443")
    assert line.startswith("FAIL  tls no-such-host.invalid:443  cannot look up no-such-host."), line
    assert "-> fix: check the DNS record of no-such-host.invalid" in line
    port = dead_port()
    result = await run_kektech(
        "doctor", "--only", "tls", env={"OPS_TLS_ENDPOINT": f"127.0.0.1:{port}"}, cwd=tmp_path
    )
    assert result.line(f"tls 127.0.0.1:{port}").endswith(
        f"-> fix: sudo systemctl status nginx; sudo ufw status ({port} must be allowed)"
    )


async def test_pm2_daemon_not_running_fails(tmp_path: Path) -> None:
    """Without a PM2 daemon doctor says so (and starts none) and tells how to bring it back."""
    async with pm2_daemon() as pm2:
        result = await run_kektech("doctor", "--only", "pm2", env=pm2.env, cwd=tmp_path)
        assert not (pm2.home / "pm2.pid").exists()
    assert result.code == 1, result
    line = result.line("pm2")
    assert line.startswith(f"FAIL  pm2  the PM2 daemon is not running (PM2_HOME={pm2.home})")
    assert "-> fix: pm2 resurrect" in line


async def test_a_pm2_pid_file_left_by_a_killed_daemon_is_no_daemon(tmp_path: Path) -> None:
    """A daemon killed outright (the OOM killer) leaves its pm2.pid, whose PID another process
    may have since: that is no daemon, so doctor says it is not running, and starts none
    (`pm2 jlist` would start an empty one, hiding apps still running unsupervised)."""
    async with pm2_daemon() as pm2:
        other = await asyncio.create_subprocess_exec("sleep", "60")
        try:
            pm2.home.mkdir(exist_ok=True)
            (pm2.home / "pm2.pid").write_text(str(other.pid))
            result = await run_kektech("doctor", "--only", "pm2", env=pm2.env, cwd=tmp_path)
            assert not (pm2.home / "rpc.sock").exists()
        finally:
            other.kill()
            await other.wait()
    assert result.code == 1, result
    line = result.line("pm2")
    assert line.startswith(f"FAIL  pm2  the PM2 daemon is not running (PM2_HOME={pm2.home})")


async def test_a_pm2_app_still_starting_is_a_warning_without_a_restart(tmp_path: Path) -> None:
    """An instance started and not ready yet (PM2's "launching": an indexer waiting for its
    RPC endpoint or database) was a FAIL whose fix, `pm2 restart`, only began the wait again:
    a WARN now, pointing at the checks of what it needs."""
    async with pm2_daemon() as pm2:
        script = write_script(tmp_path / "s.py", STEADY)  # never says it is ready
        starting = asyncio.create_task(
            pm2.start("kektech-event-indexer", script, "--wait-ready", "--listen-timeout", "15000")
        )

        async def launching() -> bool:
            result = await run_kektech("doctor", "--only", "pm2", env=pm2.env, cwd=tmp_path)
            if "pm2 kektech-event-indexer" not in result.checks:
                return False  # `pm2 start` has not brought its daemon up yet
            return "launching" in result.line("pm2 kektech-event-indexer")

        await eventually(launching, within=10, what="the app launching")
        result = await run_kektech("doctor", "--only", "pm2", env=pm2.env, cwd=tmp_path)
        await starting  # PM2 takes it for ready once listen_timeout has passed
    assert result.line("pm2 kektech-event-indexer") == (
        "WARN  pm2 kektech-event-indexer  1 of 1 instances starting: #0 launching (0 restarts)"
        " -> fix: see the checks of what it needs (indexer, rpc, postgres, redis);"
        " pm2 logs kektech-event-indexer --lines 100"
    )


async def test_pm2_apps_missing_or_stopped_fail(tmp_path: Path) -> None:
    """An app absent from PM2, or stopped, is a FAIL naming it and the command to fix it."""
    async with pm2_daemon() as pm2:
        await pm2.start("kektech-event-indexer", write_script(tmp_path / "s.py", STEADY))
        await pm2.run("stop", "kektech-event-indexer")
        result = await run_kektech("doctor", "--only", "pm2", env=pm2.env, cwd=tmp_path)
    assert result.code == 1, result
    assert result.line("pm2 kektech-event-indexer") == (
        "FAIL  pm2 kektech-event-indexer  1 of 1 instances not online: #0 stopped (0 restarts)"
        " -> fix: pm2 logs kektech-event-indexer --lines 100; pm2 restart kektech-event-indexer"
    )
    assert result.line("pm2 kektech-websocket-server") == (
        "FAIL  pm2 kektech-websocket-server  not in the PM2 process list"
        " -> fix: start the apps: cd /opt/kektech && pm2 start ecosystem.config.js && pm2 save"
    )


async def test_hanging_dependencies_cannot_hang_doctor(tmp_path: Path) -> None:
    """Dependencies that accept connections and never answer fail after OPS_TIMEOUT."""
    TIMEOUT = 3  # noqa: N806
    async with hanging_server() as port:
        env = {
            "OPS_TIMEOUT": str(TIMEOUT),
            "RPC_PROVIDER_URL": f"http://127.0.0.1:{port}",
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "DATABASE_URL": f"postgresql://kektech@127.0.0.1:{port}/kektech",
            "INDEXER_HTTP_PORT": str(port),
            "DOCTOR_BROADCASTER_PORTS": str(port),
            "OPS_TLS_ENDPOINT": f"127.0.0.1:{port}",
        }
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await run_kektech(
            "doctor", "--only", "rpc,redis,postgres,indexer,broadcaster,tls", env=env, cwd=tmp_path
        )
        took = loop.time() - started
    assert result.code == 1, result
    assert len(result.lines) == 6
    assert all(line.startswith("FAIL  ") for line in result.lines), result
    assert all(f"within {TIMEOUT}" in line for line in result.lines), result
    # Concurrent checks, each bounded: about one timeout plus start-up (4.3 s here), far from
    # the checks in a row. One timeout less than that leaves a slow start-up 10 s of room.
    in_a_row = len(result.lines) * TIMEOUT
    assert took < in_a_row - TIMEOUT, f"{took:.1f} s\n{result}"


async def test_a_broadcaster_waiting_for_its_stream_to_be_written_again_is_a_warning(
    redis_server: Redis, tmp_path: Path
) -> None:
    """A broadcaster whose stream lost entries it relayed (Redis restarted empty) relays
    nothing until the indexer writes them again: a WARN pointing at the indexer, not OK."""
    stream_key = f"test:{os.getpid()}:refill"
    async with (
        aioredis.from_url(redis_server.url) as redis,
        running(settings_for(redis_server.url, stream_key)) as broadcaster,
    ):
        producer = EventProducer(redis, stream_key)
        await producer.publish(count=3)
        await broadcaster.wait_health(seq=3)
        await producer.lose()
        await broadcaster.wait_health(refillAwaited=True, within=10)
        env = {"DOCTOR_BROADCASTER_PORTS": str(broadcaster.settings.broadcaster_http_port)}
        result = await run_kektech("doctor", "--only", "broadcaster", env=env, cwd=tmp_path)
    line = result.line(f"broadcaster :{broadcaster.settings.broadcaster_http_port}")
    assert line.startswith("WARN  "), result
    assert "relays nothing: its stream lacks entries it relayed" in line
    assert "pm2 logs kektech-event-indexer" in line


async def test_a_broadcaster_that_cannot_read_its_stream_fails_with_the_reason(
    redis_server: Redis, tmp_path: Path
) -> None:
    """Redis answers, but too slowly for the broadcaster's reads (round trips of 0.6 s, a
    1 s BROADCASTER_REDIS_TIMEOUT): a FAIL that says the stream cannot be read and points at
    the broadcaster's logs, not at the redis check, which is OK."""
    stream_key = f"test:{os.getpid()}:unread"
    async with (
        aioredis.from_url(redis_server.url) as redis,
        TcpProxy(redis_server.port) as proxy,
    ):
        await EventProducer(redis, stream_key).publish()
        url = f"redis://127.0.0.1:{proxy.port}/0"
        async with running(settings_for(url, stream_key, broadcaster_redis_timeout=1.0)) as b:
            proxy.delay = 0.6
            await b.wait_health(reading=False, redis="up", within=30)
            env = {"DOCTOR_BROADCASTER_PORTS": str(b.settings.broadcaster_http_port)}
            result = await run_kektech("doctor", "--only", "broadcaster", env=env, cwd=tmp_path)
    line = result.line(f"broadcaster :{b.settings.broadcaster_http_port}")
    assert line.startswith("FAIL  "), result
    assert "Redis answers, but the stream cannot be read" in line
    assert "BROADCASTER_REDIS_TIMEOUT" in line


async def test_another_program_on_a_broadcaster_port_is_not_taken_for_it(tmp_path: Path) -> None:
    """An HTTP 200 that is not a broadcaster's health report (another program listens on
    the port) is a FAIL, not a healthy broadcaster."""
    async with other_http_server() as port:
        env = {"DOCTOR_BROADCASTER_PORTS": str(port)}
        result = await run_kektech("doctor", "--only", "broadcaster", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert "answers HTTP 200 without a broadcaster's health report" in result.lines[0], result


async def test_another_program_on_the_indexer_port_is_not_taken_for_it(tmp_path: Path) -> None:
    """An HTTP 200 on the indexer's port that is not an indexer's /ready report (another
    program listens there) is a FAIL, not a ready indexer."""
    async with other_http_server() as port:
        env = {"INDEXER_HTTP_PORT": str(port)}
        result = await run_kektech("doctor", "--only", "indexer", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert result.line("indexer") == (
        "FAIL  indexer  answers HTTP 200 without an indexer's /ready report"
        " -> fix: check INDEXER_HTTP_HOST and INDEXER_HTTP_PORT: another program listens there"
    ), result


async def test_services_listening_on_ipv6_loopback_are_reached(
    anvil: Anvil, deployment: Deployment, redis_server: Redis, tmp_path: Path
) -> None:
    """An indexer and a broadcaster whose health ports listen on ::1 are probed at
    http://[::1]:port, not at the invalid http://::1:port, which failed both as not
    answering."""
    env = waiting_indexer_env(anvil, deployment, redis_server, INDEXER_HTTP_HOST="::1")
    settings = settings_for(
        redis_server.url, f"test:{os.getpid()}:ipv6", broadcaster_http_host="::1"
    )
    async with running(settings):
        with IndexerProcess(env, log_dir=tmp_path) as indexer:
            await indexer.wait_waiting_for("database")
            doctor_env = {
                **env,
                "DOCTOR_BROADCASTER_HOST": "::1",
                "DOCTOR_BROADCASTER_PORTS": str(settings.broadcaster_http_port),
            }
            result = await run_kektech(
                "doctor", "--only", "indexer,broadcaster", env=doctor_env, cwd=tmp_path
            )
    # The indexer answers: it says what its start-up waits for.
    assert result.line("indexer").startswith(
        "FAIL  indexer  start-up waits for: database unreachable"
    ), result
    broadcaster = result.line(f"broadcaster :{settings.broadcaster_http_port}")
    assert broadcaster.startswith(
        f"OK    broadcaster :{settings.broadcaster_http_port}  healthy: Redis up"
    ), result


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--only", ""), "argument --only: at least one name is required (choose from rpc, "),
        (("--only", " , "), "argument --only: at least one name is required"),
        (("--skip", ""), "argument --skip: at least one name is required"),
        (
            ("--skip", "rpc,redis,postgres,indexer,broadcaster,pm2,nginx,tls"),
            "--skip leaves nothing to check",
        ),
    ],
)
async def test_a_selection_of_no_check_is_a_usage_error(
    tmp_path: Path, args: tuple[str, ...], error: str
) -> None:
    """An empty --only ran every check, and a --skip of every check ran none and passed
    (exit 0, no output): both are refused as usage errors (exit 2) instead."""
    result = await run_kektech("doctor", *args, env={}, cwd=tmp_path)
    assert result.code == 2, result
    assert result.stdout == "", result
    assert f"kektech doctor: error: {error}" in result.stderr, result
