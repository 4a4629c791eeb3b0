"""What both services' `main` does around the service: the collector, the loop, stop signals."""

from __future__ import annotations

import asyncio
import gc
import resource
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

from shared import stop_signals

__all__ = ["leaf_errors", "raise_open_files_limit", "run_until_signalled", "tune_collector"]

# What Linux allows a process's limit of open files to be at most (fs.nr_open); its default.
NR_OPEN = Path("/proc/sys/fs/nr_open")
DEFAULT_NR_OPEN = 1_048_576

log = structlog.get_logger()


def tune_collector(thresholds: tuple[int, int, int]) -> None:
    """Set the collector's thresholds and stop it from ever scanning what is loaded now.

    Call once start-up is done: modules, settings and logging live as long as the process.
    """
    gc.set_threshold(*thresholds)
    gc.freeze()


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the new one.

    Every connection holds a descriptor. The soft limit comes from whoever started us: 1024
    from a login shell, which a PM2 daemon started from one passes on to its apps (systemd's
    unit sets more, but only once the daemon is started through it). The hard limit is the
    one an administrator sets; raising the soft one up to it needs no privilege.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel refuses more than fs.nr_open
        try:
            target = int(NR_OPEN.read_text())
        except (OSError, ValueError):
            target = DEFAULT_NR_OPEN
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("could not raise the open files limit", soft=soft, hard=hard, error=str(exc))
        return soft
    return target


def run_until_signalled(
    main: Coroutine[Any, Any, int | None],
    *,
    insist_after: float | None = None,
    signal_exit: bool = False,
) -> int:
    """Run `main` (on uvloop when installed), cancelling it on SIGINT (PM2's stop signal) or
    SIGTERM; returns its exit code, 0 when it returned None or was stopped by a signal.

    `signal_exit`: a stop by signal returns 128 + the signal's number instead (130, 143), as
    a shell reports an interrupted command: for one-shot work, where 0 would say "done".

    `insist_after`: seconds after which a stop that was not honoured is logged and repeated
    (a library that swallows a cancellation, e.g. asyncio.wait_for on Python 3.11, would
    otherwise keep the process running until PM2's SIGKILL).
    """

    async def wrapper() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def insist() -> None:
            if insist_after is not None and not task.done():
                log.warning(
                    "still running after a stop signal: cancelling again", after=insist_after
                )
                task.cancel()
                loop.call_later(insist_after, insist)

        received: list[int] = []

        def stop(sig: int) -> None:
            received.append(sig)
            task.cancel()
            if insist_after is not None:
                loop.call_later(insist_after, insist)

        for sig in stop_signals.STOP_SIGNALS:
            loop.add_signal_handler(sig, stop, sig)
        early = stop_signals.held()
        if early is not None:  # received while starting (stop_signals.hold)
            stop(early)
        try:
            return await main or 0
        except asyncio.CancelledError:
            log.info("stopped by signal")
            return 128 + received[0] if signal_exit and received else 0

    try:
        import uvloop
    except ImportError:
        return asyncio.run(wrapper())
    return uvloop.run(wrapper())


def leaf_errors(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or the exception itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_errors(inner)]
    return [exc]
