"""`kektech doctor`: walk the deployment checklist and print one verdict per check, with a fix.

Every check runs at the same time as the others, each bounded by OPS_TIMEOUT, so a dependency
that hangs costs one timeout, not the whole run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from indexer.sources import backfill_command
from ops.errors import CertificateInvalid, ProbeError
from ops.probes.http import get, parse_metrics
from ops.probes.nginx import check_config
from ops.probes.pm2 import START_FIX, Pm2Process, list_processes
from ops.probes.postgres import probe_postgres
from ops.probes.redis import probe_redis
from ops.probes.rpc import ChainInfo, endpoint_label, probe_rpc
from ops.probes.tls import fetch_certificate
from ops.settings import OpsSettings, parse_endpoint
from ops.verdicts import Level, Verdict
from shared.config_types import url_host

__all__ = ["CHECKS", "diagnose"]

INDEXER_APP = "kektech-event-indexer"
BROADCASTER_APP = "kektech-websocket-server"
# Slack on top of each probe's own timeout, for the bookkeeping around it.
GUARD_SECONDS = 1.0
SEQUENTIAL_PROBES = 2  # most probes one check makes one after the other
CERT_FIX = (
    "sudo certbot renew (see `systemctl list-timers certbot`), then sudo systemctl reload nginx"
)

Check = Callable[[OpsSettings], Awaitable[list[Verdict]]]


async def check_rpc(settings: OpsSettings) -> list[Verdict]:
    """Each RPC_PROVIDER_URL answers, on CHAIN_ID; the indexer fails over between them."""
    urls = settings.rpc_urls()
    results = await asyncio.gather(
        *(
            probe_rpc(url, index=index, within=settings.ops_timeout)
            for index, url in enumerate(urls)
        ),
        return_exceptions=True,
    )
    # Only a node on the right chain is one the indexer can fail over to.
    reachable = sum(isinstance(r, ChainInfo) and r.chain_id == settings.chain_id for r in results)
    verdicts = []
    for index, (url, result) in enumerate(zip(urls, results, strict=True)):
        name = f"rpc {endpoint_label(index, url)}"
        if isinstance(result, ChainInfo):
            if result.chain_id != settings.chain_id:
                verdicts.append(
                    Verdict(
                        Level.FAIL,
                        name,
                        f"eth_chainId is {result.chain_id}, CHAIN_ID is {settings.chain_id}",
                        "point RPC_PROVIDER_URL at a node of chain "
                        f"{settings.chain_id}, or correct CHAIN_ID in .env",
                    )
                )
            else:
                verdicts.append(
                    Verdict(Level.OK, name, f"chain {result.chain_id}, head block {result.head}")
                )
        elif isinstance(result, ProbeError):
            level = Level.WARN if reachable else Level.FAIL
            others = " (the indexer fails over to a working URL)" if reachable else ""
            verdicts.append(
                Verdict(
                    level,
                    name,
                    f"unreachable: {result}{others}",
                    "check the URL and its API key in RPC_PROVIDER_URL and the provider's status",
                )
            )
        else:
            raise result  # a bug
    return verdicts


async def check_redis(settings: OpsSettings) -> list[Verdict]:
    """Redis answers PING and holds the event stream."""
    key = settings.redis_stream_key
    try:
        info = await probe_redis(
            settings.redis_url.get_secret_value(), stream_key=key, within=settings.ops_timeout
        )
    except ProbeError as exc:
        fix = exc.fix or "sudo systemctl status redis-server; check the host and port in REDIS_URL"
        return [Verdict(Level.FAIL, "redis", str(exc), fix)]
    if info.length is None:
        return [
            Verdict(
                Level.WARN,
                "redis",
                f"PING ok, but stream {key} does not exist yet",
                "start the indexer (it creates the stream with its first event); "
                "check REDIS_STREAM_KEY",
            )
        ]
    return [Verdict(Level.OK, "redis", f"PING ok, stream {key} holds {info.length} entries")]


async def check_postgres(settings: OpsSettings) -> list[Verdict]:
    """Postgres is reachable, takes writes, and every migration in indexer/migrations/ is
    applied."""
    try:
        info = await probe_postgres(
            settings.database_url.get_secret_value(),
            statement_cache_size=settings.db_statement_cache_size,
            within=settings.ops_timeout,
        )
    except ProbeError as exc:
        return [
            Verdict(
                Level.FAIL,
                "postgres",
                str(exc),
                "check DATABASE_URL (host, port, user, password, database); "
                "sudo systemctl status postgresql or the Supabase dashboard",
            )
        ]
    if info.read_only:
        return [
            Verdict(
                Level.FAIL,
                "postgres",
                "read-only: it takes no writes (a standby, or Supabase's read-only mode once its"
                " disk is nearly full), so the indexer waits",
                "see the Supabase dashboard (disk size) or the server "
                "(SELECT pg_is_in_recovery(); SHOW default_transaction_read_only)",
            )
        ]
    version = f"schema version {info.schema_version} of {info.latest_version}"
    if info.schema_version < info.latest_version:
        return [
            Verdict(
                Level.FAIL,
                "postgres",
                f"not migrated: {version}",
                "cd /opt/kektech && .venv/bin/python -m indexer migrate "
                "(starting the indexer also migrates)",
            )
        ]
    if info.schema_version > info.latest_version:
        return [
            Verdict(
                Level.WARN,
                "postgres",
                f"the database is newer than this code: {version}",
                "deploy the current code (git pull, then the update script)",
            )
        ]
    cursor = "no cursor yet" if info.cursor is None else f"cursor at block {info.cursor}"
    said = f"migrated ({version}), {cursor}"
    if info.backfills and info.began is not None:
        added = ", ".join(
            f"{kind} {address} (from block {since})" for address, kind, since in info.backfills
        )
        # One backfill up to the latest of them covers them all (sources.mark_backfilled).
        backfill = backfill_command(info.began, max(since for _, _, since in info.backfills))
        return [
            Verdict(
                Level.WARN,
                "postgres",
                f"{said}; added after indexing began, their earlier events not stored until"
                f" backfilled: {added}",
                f"pm2 stop {INDEXER_APP}; {backfill}; pm2 start {INDEXER_APP}",
            )
        ]
    return [Verdict(Level.OK, "postgres", said)]


async def check_indexer(settings: OpsSettings) -> list[Verdict]:
    """The indexer answers /ready, leads, keeps up with the chain and reaches Redis."""
    base = f"http://{url_host(settings.indexer_http_host)}:{settings.indexer_http_port}"
    restart = f"pm2 logs {INDEXER_APP} --lines 100; pm2 restart {INDEXER_APP}"
    try:
        ready = await get(base + "/ready", within=settings.ops_timeout)
        metrics = parse_metrics(
            (await get(base + "/metrics", within=settings.ops_timeout)).body.decode()
        )
    except ProbeError as exc:
        return [Verdict(Level.FAIL, "indexer", f"not answering: {exc}", f"pm2 status; {restart}")]
    body = ready.json()
    if not isinstance(body.get("role"), str) or not isinstance(body.get("ready"), bool):
        # Every answer of the indexer's /ready carries both, 200 or 503.
        return [
            Verdict(
                Level.FAIL,
                "indexer",
                f"answers HTTP {ready.status} without an indexer's /ready report",
                "check INDEXER_HTTP_HOST and INDEXER_HTTP_PORT: another program listens there",
            )
        ]
    role = body["role"]
    head, cursor = body.get("head"), body.get("cursor")
    # Measured from where the indexer aims: CONFIRMATIONS blocks below the head.
    target = head - settings.confirmations if isinstance(head, int) else None
    lag = max(0, target - cursor) if target is not None and isinstance(cursor, int) else None
    backlog = int(metrics.get("kektech_indexer_publish_backlog", 0))
    where = f"cursor {cursor}, head {head}, lag {lag}, publish backlog {backlog}"
    waiting = body.get("waiting_for")
    if role == "leader" and isinstance(waiting, str):  # its lease went unrenewed
        return [
            Verdict(
                Level.FAIL,
                "indexer",
                f"leader waits for: {waiting}",
                "see the postgres check; the indexer ends by itself within DB_COMMAND_TIMEOUT "
                "and PM2 restarts it",
            )
        ]
    # Only the leader publishes, so only its gauge says whether Redis answers.
    if role == "leader" and metrics.get("kektech_indexer_redis_up", 1) == 0:
        return [
            Verdict(
                Level.FAIL,
                "indexer",
                f"cannot reach Redis ({where})",
                "see the redis check; events wait in the outbox until Redis is back",
            )
        ]
    if ready.status == 200:
        return [Verdict(Level.OK, "indexer", f"ready, {where}")]
    if role == "starting" and isinstance(waiting, str):
        return [
            Verdict(
                Level.FAIL,
                "indexer",
                f"start-up waits for: {waiting}",
                "see the postgres and rpc checks; the indexer goes on by itself once they pass",
            )
        ]
    if role == "standby":
        return [
            Verdict(
                Level.WARN,
                "indexer",
                "standby: another indexer holds the write lease",
                "expected only if a second indexer runs; see: "
                "cd /opt/kektech && .venv/bin/python -m indexer status",
            )
        ]
    if lag is not None and lag > settings.doctor_max_lag_blocks:
        return [
            Verdict(
                Level.FAIL,
                "indexer",
                f"behind the chain by {lag} blocks (more than {settings.doctor_max_lag_blocks})",
                f"check the rpc verdicts and {restart}",
            )
        ]
    if role == "starting":  # its first try at the database and RPC endpoint: not over yet
        return [
            Verdict(
                Level.WARN,
                "indexer",
                "starting: still connecting to its database and RPC endpoint",
                f"see the postgres and rpc checks; pm2 logs {INDEXER_APP} --lines 100",
            )
        ]
    return [Verdict(Level.WARN, "indexer", f"not ready yet ({role}): {where}", restart)]


async def check_broadcasters(settings: OpsSettings) -> list[Verdict]:
    """Each broadcaster instance answers /healthz and reads the stream."""
    host = url_host(settings.doctor_broadcaster_host)
    ports = settings.doctor_broadcaster_ports
    answers = await asyncio.gather(
        *(get(f"http://{host}:{port}/healthz", within=settings.ops_timeout) for port in ports),
        return_exceptions=True,
    )
    restart = f"pm2 logs {BROADCASTER_APP} --lines 100; pm2 restart {BROADCASTER_APP}"
    verdicts = []
    for port, answer in zip(ports, answers, strict=True):
        name = f"broadcaster :{port}"
        if isinstance(answer, ProbeError):
            verdicts.append(
                Verdict(Level.FAIL, name, f"not answering: {answer}", f"pm2 status; {restart}")
            )
            continue
        if isinstance(answer, BaseException):
            raise answer  # a bug
        body = answer.json()
        if answer.status != 200 and body.get("redis") == "up" and body.get("reading") is False:
            verdicts.append(
                Verdict(
                    Level.FAIL,
                    name,
                    f"unhealthy (HTTP {answer.status}): Redis answers, but the stream cannot"
                    f" be read (relays nothing; seq {body.get('seq')},"
                    f" stream {body.get('streamSeq')})",
                    f"pm2 logs {BROADCASTER_APP} --lines 100 ('redis read failed'): a Redis"
                    " too slow for BROADCASTER_REDIS_TIMEOUT, or refusing the reads",
                )
            )
            continue
        if answer.status != 200:
            verdicts.append(
                Verdict(
                    Level.FAIL,
                    name,
                    f"unhealthy (HTTP {answer.status}): Redis {body.get('redis', '?')}",
                    "see the redis check; the broadcaster reconnects by itself",
                )
            )
            continue
        if body.get("redis") != "up":  # a 200 from something else on that port
            verdicts.append(
                Verdict(
                    Level.FAIL,
                    name,
                    "answers HTTP 200 without a broadcaster's health report",
                    "check DOCTOR_BROADCASTER_PORTS: another program listens there",
                )
            )
            continue
        if body.get("refillAwaited"):
            verdicts.append(
                Verdict(
                    Level.WARN,
                    name,
                    "relays nothing: its stream lacks entries it relayed (Redis lost them),"
                    f" waiting for the indexer to write them again; seq {body.get('seq')},"
                    f" stream at {body.get('streamSeq')}",
                    f"see the indexer check; pm2 logs {INDEXER_APP} --lines 100",
                )
            )
            continue
        verdicts.append(
            Verdict(
                Level.OK,
                name,
                f"healthy: Redis up, {body.get('connections')} connections, "
                f"seq {body.get('seq')}, behind {body.get('behind')}",
            )
        )
    return verdicts


# The PM2 status of an instance started and not ready yet (wait_ready). Not "waiting
# restart": PM2 7 also leaves an app it gave up on in that status.
STARTING = frozenset({"launching"})


async def check_pm2(settings: OpsSettings) -> list[Verdict]:
    """Every app of OPS_PM2_APPS runs under PM2 and each of its instances is online."""
    try:
        processes = await list_processes(
            settings.ops_pm2_bin, home=settings.pm2_home_path(), within=settings.ops_timeout
        )
    except ProbeError as exc:
        return [Verdict(Level.FAIL, "pm2", str(exc), exc.fix)]
    verdicts = []
    for app in settings.ops_pm2_apps:
        mine = [p for p in processes if p.name == app]
        name = f"pm2 {app}"
        if not mine:
            verdicts.append(Verdict(Level.FAIL, name, "not in the PM2 process list", START_FIX))
            continue
        down = [p for p in mine if p.status not in {"online", *STARTING}]
        starting = [p for p in mine if p.status in STARTING]
        summary = _instances(mine)
        if starting and not down:
            # Started and not ready yet (wait_ready): most often waiting for a dependency,
            # which the checks of those name; a restart would only start the wait again.
            verdicts.append(
                Verdict(
                    Level.WARN,
                    name,
                    f"{len(starting)} of {len(mine)} instances starting: {summary}",
                    f"see the checks of what it needs (indexer, rpc, postgres, redis); "
                    f"pm2 logs {app} --lines 100",
                )
            )
        elif down:
            verdicts.append(
                Verdict(
                    Level.FAIL,
                    name,
                    f"{len(down)} of {len(mine)} instances not online: {summary}",
                    f"pm2 logs {app} --lines 100; pm2 restart {app}",
                )
            )
        else:
            verdicts.append(Verdict(Level.OK, name, f"{len(mine)} online: {summary}"))
    return verdicts


def _instances(processes: Sequence[Pm2Process]) -> str:
    return ", ".join(f"#{p.pm_id} {p.status} ({p.restarts} restarts)" for p in processes)


async def check_nginx(settings: OpsSettings) -> list[Verdict]:
    """`nginx -t` passes on the configuration Nginx loads."""
    conf = settings.doctor_nginx_conf
    try:
        result = await check_config(settings.doctor_nginx_bin, conf, within=settings.ops_timeout)
    except ProbeError as exc:
        return [Verdict(Level.FAIL, "nginx", str(exc), exc.fix)]
    if result.ok:
        return [Verdict(Level.OK, "nginx", f"{conf}: {result.message}")]
    if result.permission_denied:
        return [
            Verdict(
                Level.WARN,
                "nginx",
                f"cannot test {conf} as this user: {result.message}",
                "run sudo nginx -t",
            )
        ]
    return [
        Verdict(
            Level.FAIL,
            "nginx",
            f"{conf}: {result.message}",
            "correct the file and line named, then sudo nginx -t && sudo systemctl reload nginx",
        )
    ]


async def check_tls(settings: OpsSettings) -> list[Verdict]:
    """The public endpoint's certificate verifies and is not about to expire."""
    host, port = parse_endpoint(settings.ops_tls_endpoint)
    name = f"tls {host}:{port}"
    try:
        cert = await fetch_certificate(
            host, port, ca_file=settings.ops_tls_ca_file, within=settings.ops_timeout
        )
    except CertificateInvalid as exc:
        return [Verdict(Level.FAIL, name, str(exc), CERT_FIX)]
    except ProbeError as exc:
        fix = exc.fix or f"sudo systemctl status nginx; sudo ufw status ({port} must be allowed)"
        return [Verdict(Level.FAIL, name, str(exc), fix)]
    days = cert.days_left(datetime.now(UTC))
    detail = f"certificate expires {cert.not_after:%Y-%m-%d %H:%M} UTC, in {days:.1f} days"
    if days < settings.doctor_tls_fail_days:
        return [Verdict(Level.FAIL, name, detail, CERT_FIX)]
    if days < settings.doctor_tls_warn_days:
        return [Verdict(Level.WARN, name, detail, CERT_FIX)]
    return [Verdict(Level.OK, name, detail)]


CHECKS: dict[str, Check] = {
    "rpc": check_rpc,
    "redis": check_redis,
    "postgres": check_postgres,
    "indexer": check_indexer,
    "broadcaster": check_broadcasters,
    "pm2": check_pm2,
    "nginx": check_nginx,
    "tls": check_tls,
}


async def _bounded(check: Check, settings: OpsSettings, *, name: str) -> list[Verdict]:
    """Run one check; a probe that overruns its own timeout still cannot hold the run up."""
    # The longest checks make two probes in a row (rpc: chain id then head; indexer: /ready
    # then /metrics; tls: handshake then close), each bounded by OPS_TIMEOUT.
    limit = SEQUENTIAL_PROBES * settings.ops_timeout + GUARD_SECONDS
    try:
        async with asyncio.timeout(limit):
            return await check(settings)
    except TimeoutError:
        return [Verdict(Level.FAIL, name, f"no result within {limit:g} s", "see the logs")]
    except Exception as exc:  # an answer or a setting no probe expected: the others go on
        return [
            Verdict(
                Level.FAIL,
                name,
                f"the check itself failed: {type(exc).__name__}: {exc}",
                "check this service's settings; if they are right, this is a bug to report",
            )
        ]


async def diagnose(settings: OpsSettings, names: Sequence[str]) -> list[Verdict]:
    """Run the named checks concurrently; verdicts come back in checklist order."""
    async with asyncio.TaskGroup() as tasks:
        running = [
            tasks.create_task(_bounded(CHECKS[name], settings, name=name), name=f"check-{name}")
            for name in names
        ]
    return [verdict for task in running for verdict in task.result()]
