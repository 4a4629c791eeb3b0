"""The indexer's operations endpoints on a loopback port: /healthz, /ready and /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from indexer.errors import IndexerError
from indexer.metrics import Metrics

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SHUTDOWN_TIMEOUT = 1.0


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


@asynccontextmanager
async def serve_http(
    *,
    host: str,
    port: int,
    metrics: Metrics,
    status: Callable[[], dict[str, Any]],
) -> AsyncIterator[web.AppRunner]:
    """Serve the endpoints until the block exits.

    `status()` returns a dict with at least `ready` (bool): /healthz answers 200 while the
    process runs (standby included), /ready answers 200 only when this instance leads and has
    caught up with the chain, 503 otherwise.
    """

    async def healthz(_: web.Request) -> web.Response:
        return _json(200, {"status": "ok", **status()})

    async def ready(_: web.Request) -> web.Response:
        current = status()
        return _json(200 if current.get("ready") else 503, current)

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(
            body=metrics.render(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", prometheus)
    # A short shutdown timeout: a scraper's keep-alive connection must not delay a PM2 stop.
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:  # e.g. the port is taken, by another indexer on this host
        await runner.cleanup()
        raise IndexerError(
            f"cannot listen on {host}:{port} (INDEXER_HTTP_HOST, INDEXER_HTTP_PORT): "
            f"{exc.strerror or exc}"
        ) from exc
    try:
        yield runner
    finally:
        await runner.cleanup()
