"""`python -m broadcaster`: the WebSocket broadcaster (settings from the environment and .env)."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Coroutine
from typing import Any

import structlog

from broadcaster.service import run
from shared.errors import KektechError
from shared.logs import configure_logging
from shared.settings import BroadcasterSettings, settings_or_exit

log = structlog.get_logger()

# Collect young objects 70x less often than CPython's default (700). With 10k connections
# alive, the collector's passes over them cost more than the work itself: measured on the
# benchmark machine, 10k handshakes took 10.4 s instead of 6.5 s and the p99 latency of
# 1,000 events/s over 10k market clients was 929 ms instead of 26 ms (docs/broadcaster.md).
GC_THRESHOLDS = (50_000, 20, 20)


def run_until_signalled(main: Coroutine[Any, Any, None]) -> int:
    """Run `main`, cancelling it on SIGINT (PM2's stop signal) or SIGTERM."""

    async def wrapper() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await main
        except asyncio.CancelledError:
            log.info("stopped by signal")
        return 0

    try:
        import uvloop
    except ImportError:
        return asyncio.run(wrapper())
    return uvloop.run(wrapper())


def main() -> int:
    settings = settings_or_exit(BroadcasterSettings)
    configure_logging(settings.log_level, settings.log_format, secrets=settings.log_secrets())
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()  # what is loaded now lives as long as the process: never scan it again
    try:
        return run_until_signalled(run(settings))
    except (KektechError, ExceptionGroup) as exc:
        errors = _leaves(exc)
        if not all(isinstance(e, KektechError | OSError) for e in errors):
            raise  # a bug: let the traceback through
        for error in errors:
            log.error("broadcaster stopped", error=str(error), error_type=type(error).__name__)
        return 1
    except OSError as exc:  # e.g. the port is taken
        log.error("broadcaster stopped", error=str(exc), error_type=type(exc).__name__)
        return 1


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or the exception itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
