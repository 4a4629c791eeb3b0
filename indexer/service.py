"""`run(settings)`: the indexer service, owning every resource and task.

Start-up: migrate, take the write lease (or wait as a standby), check the chain and the
cursor, then follow the chain and drain the outbox side by side until cancelled. Shutdown is
cancellation (SIGINT from PM2, or SIGTERM): the batch in flight is rolled back by Postgres, the
lease is released so a restart takes over at once.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from indexer.database import Database
from indexer.errors import DatabaseUnavailable, RpcUnavailable, StoreError
from indexer.follower import FollowConfig, Follower, OnCommit
from indexer.http import serve_http
from indexer.lease import (
    Lease,
    LeaseTerm,
    lease_holder,
    release_lease,
    renew_lease,
    try_acquire_lease,
)
from indexer.metrics import Metrics
from indexer.publisher import Publisher
from indexer.rpc import LogRangeSizer, RpcClient
from indexer.schema import migrate
from indexer.sources import Sources
from shared.indexer_settings import IndexerSettings
from shared.readiness import notify_ready
from shared.redaction import known_secrets, redact_text

log = structlog.get_logger()

REDIS_TIMEOUT = 5.0
RELEASE_TIMEOUT = 2.0
# Back-off of start-up's retries while the database or the RPC endpoint is unavailable. Kept
# short: a try costs a connection attempt, and the time past the dependency's return is
# downtime (with 30 s, an indexer restarted during an outage came back up to 30 s late).
START_RETRY_FIRST = 1.0
START_RETRY_MAX = 5.0


def lease_owner() -> str:
    """This process's identity in the lease: host, pid, a random tag and where pids mean
    something (see _pid_space)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}:{_pid_space()}"


@functools.cache
def _pid_space() -> str:
    """Which pids this process sees: this boot of this machine and this PID namespace.

    Host names are no proof: VPSs keep their image's default name, and containers with host
    networking share the host's. A pid is checked only against holders with the same space.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{boot}|{namespace}".encode()).hexdigest()[:10]


def dead_local_pid(owner: str | None) -> int | None:
    """The pid of `owner` when it was a process of this machine (same pid space) that no
    longer exists (e.g. kill -9); None otherwise."""
    if owner is None:
        return None
    host, pid_text, _, space = (*owner.split(":", 3), "", "", "")[:4]
    if (
        host != socket.gethostname()
        or space != _pid_space()
        or not pid_text.isdigit()
        or int(pid_text) == os.getpid()
    ):
        return None
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return int(pid_text)
    except PermissionError:
        return None
    return None


async def acquire_lease(db: Database, *, owner: str, ttl: float, wait: bool = True) -> Lease | None:
    """Take the write lease; as a standby, wait until it is free (or return None if not `wait`)."""
    announced = False
    while True:
        holder = await lease_holder(db)
        steal = holder.owner if dead_local_pid(holder.owner) is not None else None
        lease = await try_acquire_lease(db, owner, ttl, steal_from=steal)
        if lease is not None:
            log.info("write lease acquired", owner=owner, generation=lease.token, took_over=steal)
            return lease
        if not wait:
            return None
        if not announced:
            log.info(
                "standby: another indexer holds the write lease",
                holder=holder.owner,
                expires=str(holder.expires_at),
            )
            announced = True
        await asyncio.sleep(ttl / 3)


@asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis client without hidden retries: the publisher retries in one place.

    socket_timeout=None, explicitly (redis-py 8 defaults to 5 s): redis-py applies it with
    asyncio.wait_for, which on Python 3.11 can swallow a cancellation, i.e. lose a stop signal;
    the publisher bounds each call itself with asyncio.timeout.
    """
    client = aioredis.Redis.from_url(
        url,
        socket_timeout=None,
        socket_connect_timeout=REDIS_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=10,
    )
    try:
        yield client
    finally:
        await client.aclose()


def open_database(
    settings: IndexerSettings, *, max_size: int = 4
) -> AbstractAsyncContextManager[Database]:
    return Database.open(
        settings.database_url.get_secret_value(),
        statement_cache_size=settings.db_statement_cache_size,
        command_timeout=settings.db_command_timeout,
        max_size=max_size,
    )


def rpc_client(settings: IndexerSettings, *, once_each: bool = False) -> RpcClient:
    """The JSON-RPC client of RPC_PROVIDER_URL. `once_each`: each endpoint is asked once, with
    no retries (a question an operator waits on, such as `status`)."""
    urls = settings.rpc_urls()
    return RpcClient(
        urls,
        timeout=settings.rpc_timeout,
        max_retries=len(urls) - 1 if once_each else settings.rpc_max_retries,
        expected_chain_id=settings.chain_id,
    )


def sources(settings: IndexerSettings) -> Sources:
    if not settings.market_factory_address:  # valid (a chain not yet deployed), rarely meant
        log.warning("no factory configured: MARKET_FACTORY_ADDRESS is empty, no market is indexed")
    return Sources(
        factories=frozenset(settings.market_factory_address),
        resolution_manager=settings.resolution_manager_address,
        reward_distributor=settings.reward_distributor_address,
    )


def follow_config(settings: IndexerSettings) -> FollowConfig:
    return FollowConfig(
        chain_id=settings.chain_id,
        start_block=settings.start_block,
        confirmations=settings.confirmations,
        reorg_window=settings.reorg_window,
        poll_interval=settings.poll_interval,
        lease_ttl=settings.lease_ttl,
        rpc_timeout=settings.rpc_timeout,
        max_addresses=settings.logs_max_addresses,
        batch_events=settings.batch_events,
    )


def build_follower(
    settings: IndexerSettings,
    *,
    rpc: RpcClient,
    db: Database,
    lease: Lease,
    metrics: Metrics,
    on_commit: OnCommit = lambda rows: None,
) -> Follower:
    return Follower(
        rpc=rpc,
        db=db,
        lease=lease,
        sources=sources(settings),
        config=follow_config(settings),
        sizer=log_range_sizer(settings),
        metrics=metrics,
        on_commit=on_commit,
    )


def log_range_sizer(settings: IndexerSettings) -> LogRangeSizer:
    """A fresh eth_getLogs range sizer, as the indexer starts with."""
    return LogRangeSizer(
        settings.logs_range_initial, settings.logs_range_min, settings.logs_range_max
    )


async def keep_lease(db: Database, lease: Lease, term: LeaseTerm) -> None:
    """Renew the lease at once, then every third of its TTL, telling `term`; raises LeaseLost
    if it was taken. Cancel-safe."""
    while True:
        sent = term.now()
        await renew_lease(db, lease, term.ttl)
        term.renewed(sent)
        await asyncio.sleep(term.ttl / 3)


@dataclass(slots=True)
class Health:
    """What /healthz and /ready say: the role, what start-up waits for, the follower's state."""

    role: str = "starting"
    waiting_for: str | None = None
    follower: Follower | None = None
    term: LeaseTerm | None = None  # the leader's: whether its lease is known held
    # The leader's publisher: whether Redis answered its last call (kektech_indexer_redis_up).
    redis_up: Callable[[], bool] | None = None

    def snapshot(self) -> dict[str, Any]:
        state: dict[str, Any] = {"role": self.role, "ready": False}
        if self.waiting_for is not None:
            state["waiting_for"] = self.waiting_for
        if self.follower is not None:
            follower = self.follower
            state.update(
                head=follower.head,
                cursor=follower.cursor if follower.prepared and follower.head >= 0 else None,
                ready=follower.caught_up,
            )
        term = self.term
        lapsed = term.lapsed_for() if term is not None else None
        if term is not None and lapsed is not None:
            # Its renewals get no answer (the database, or a paused process): a standby may
            # hold the lease by now. It writes nothing meanwhile (fencing), and ends once a
            # call fails or DB_COMMAND_TIMEOUT passes.
            state["ready"] = False
            state["waiting_for"] = (
                f"the database: the write lease was last renewed {lapsed:.0f} s ago "
                f"(LEASE_TTL {term.ttl:g} s); a standby may hold it"
            )
        if self.redis_up is not None:
            # Indexing goes on without Redis (events wait in the outbox), so `ready` stays as
            # it is; `kektech check` alerts on this after MONITOR_DOWN_AFTER.
            state["redis_up"] = self.redis_up()
        return state


async def run(settings: IndexerSettings) -> None:
    """The indexer service: runs until cancelled or until a task fails.

    Start-up waits, retrying with back-off, for a database or RPC endpoint that is not there
    (yet): after a boot or during an outage, exiting would only have PM2 restart it, and PM2
    gives up on an app that fails ten times within its first 100 s. Once started, such a
    failure ends the service for PM2 to restart (docs/indexer.md).
    """
    metrics = Metrics()
    health = Health()
    secrets = known_secrets(settings.log_secrets())
    async with serve_http(
        host=settings.indexer_http_host,
        port=settings.indexer_http_port,
        metrics=metrics,
        status=health.snapshot,
    ):
        delay = START_RETRY_FIRST
        while True:
            try:
                await _serve(settings, metrics, health)
                return
            except (DatabaseUnavailable, RpcUnavailable) as exc:
                if health.role != "starting":
                    raise
                # Served on /healthz, which logging's redaction does not cover.
                health.waiting_for = redact_text(str(exc), secrets)
                log.warning("start-up waits for a dependency", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, START_RETRY_MAX)


async def _serve(settings: IndexerSettings, metrics: Metrics, health: Health) -> None:
    """Connect, migrate, check the chain, take the lease, then follow and publish."""
    async with (
        open_database(settings) as db,
        rpc_client(settings) as rpc,
        redis_client(settings.redis_url.get_secret_value()) as redis,
    ):
        metrics.rpc.watch(rpc.stats)
        await migrate(db)
        # Ready (docs/pm2.md): migrated, HTTP serving, on the right chain (the client checks
        # eth_chainId against CHAIN_ID on first use), leader or standby alike.
        notify_ready("indexer", chain_id=await rpc.chain_id())
        health.role, health.waiting_for = "standby", None
        lease = await acquire_lease(db, owner=lease_owner(), ttl=settings.lease_ttl)
        assert lease is not None
        health.role = "leader"
        try:
            health.term = term = LeaseTerm(settings.lease_ttl)
            # Read at each scrape: 0 once the lease went LEASE_TTL unrenewed (see Health).
            metrics.leader.set_function(lambda: 0.0 if term.lapsed_for() is not None else 1.0)
            health.redis_up = lambda: (
                metrics.registry.get_sample_value("kektech_indexer_redis_up") == 1
            )
            publisher = Publisher(
                redis=redis,
                db=db,
                term=term,
                stream_key=settings.redis_stream_key,
                stream_maxlen=settings.redis_stream_maxlen,
                outbox_keep=settings.outbox_keep,
                metrics=metrics,
            )
            health.follower = follower = build_follower(
                settings,
                rpc=rpc,
                db=db,
                lease=lease,
                metrics=metrics,
                on_commit=publisher.wake,
            )
            async with asyncio.TaskGroup() as tasks:
                # Renewed from the start: prepare() may roll back a reorg found at start-up or
                # wait on a slow node for longer than LEASE_TTL. The publisher starts at once
                # too: it only drains committed rows, and it tells whether Redis answers; it
                # publishes only while `term` says the lease is held.
                tasks.create_task(keep_lease(db, lease, term), name="keep-lease")
                tasks.create_task(publisher.publish_forever(), name="publish-outbox")
                await follower.prepare()
                log.info("indexer started", cursor=follower.cursor, chain_id=settings.chain_id)
                tasks.create_task(follower.follow(), name="follow-chain")
        finally:
            log.info("stopping: releasing the write lease")
            health.term = health.redis_up = None
            metrics.leader.set_function(lambda: 0.0)
            # Also after cancellation: a clean stop hands the lease over at once.
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT):
                    await release_lease(db, lease)
            except (StoreError, TimeoutError) as exc:
                log.warning(
                    "could not release the write lease; it expires by itself", error=str(exc)
                )
