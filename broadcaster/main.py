"""`python -m broadcaster`: the WebSocket broadcaster (settings from the environment and .env)."""

from __future__ import annotations

import argparse

import structlog

from broadcaster.service import run
from shared.broadcaster_settings import BroadcasterSettings
from shared.errors import KektechError
from shared.logs import configure_logging
from shared.process import (
    leaf_errors,
    raise_open_files_limit,
    run_until_signalled,
    tune_collector,
)
from shared.settings_loading import settings_or_exit

log = structlog.get_logger()

# Collect young objects 70x less often than CPython's default (700). With 10k connections
# alive, the collector's passes over them cost more than the work itself: measured on the
# benchmark machine, 10k handshakes took 10.4 s instead of 6.5 s and the p99 latency of
# 1,000 events/s over 10k market clients was 929 ms instead of 26 ms (docs/broadcaster.md).
GC_THRESHOLDS = (50_000, 20, 20)
# Below this many open files a broadcaster serves too few clients for nginx.conf's sizing.
LOW_OPEN_FILES = 16_384


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """No arguments: `--help` says so (and where the settings come from) rather than
    starting a server on WS_PORT, and any other argument is refused (exit 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m broadcaster",
        description="KEKTECH WebSocket broadcaster: fans the indexer's events out to browsers. "
        "It takes no arguments: settings come from the environment and .env (see "
        ".env.example and docs/broadcaster.md).",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    settings = settings_or_exit(BroadcasterSettings)
    configure_logging(settings.log_level, settings.log_format, secrets=settings.log_secrets())
    tune_collector(GC_THRESHOLDS)
    open_files = raise_open_files_limit()
    if open_files < LOW_OPEN_FILES:
        log.warning(
            "the open files limit bounds the connections this server can hold; raise the "
            "hard limit (LimitNOFILE in PM2's systemd unit, `ulimit -Hn`)",
            open_files=open_files,
        )
    try:
        return run_until_signalled(run(settings))
    except (KektechError, ExceptionGroup) as exc:
        errors = leaf_errors(exc)
        if not all(isinstance(e, KektechError | OSError) for e in errors):
            raise  # a bug: let the traceback through
        for error in errors:
            log.error("broadcaster stopped", error=str(error), error_type=type(error).__name__)
        return 1
    except OSError as exc:  # e.g. the port is taken
        log.error("broadcaster stopped", error=str(exc), error_type=type(exc).__name__)
        return 1
