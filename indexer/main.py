"""`python -m indexer run | migrate | status | backfill | reindex | verify`."""

from __future__ import annotations

import argparse

import structlog

from indexer import commands
from indexer.service import run
from shared.errors import KektechError
from shared.indexer_settings import IndexerSettings
from shared.logs import configure_logging
from shared.process import leaf_errors, run_until_signalled, tune_collector
from shared.settings_loading import settings_or_exit

log = structlog.get_logger()

# Collect young objects every 10,000 net allocations instead of CPython's 700, and never scan
# what start-up loaded (tune_collector). A batch keeps tens of thousands of objects alive for
# a while, so the default collector kept promoting and re-scanning them: measured over a
# 50,000-event catch-up, 549 collections took ~0.7 s (~120 us of CPU per event in all); with
# these, 25 collections took 0.15 s (~103 us per event) and RSS grew by 0.8 MiB (bench/README.md).
GC_THRESHOLDS = (10_000, 20, 20)
# Seconds a stop may take before the cancellation is repeated (PM2's kill_timeout is 15 s).
STOP_RETRY = 5.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m indexer",
        description="KEKTECH chain indexer: Postgres storage and Redis publishing of every "
        "KEKTECH event. Settings come from the environment and .env (see .env.example).",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="follow the chain (the default)")
    sub.add_parser("migrate", help="apply pending database migrations and exit")
    sub.add_parser("status", help="print cursor, head, lag, publish backlog and lease holder")
    backfill = sub.add_parser(
        "backfill", help="fetch an already indexed range again and store what is missing"
    )
    backfill.add_argument("--from", dest="first", type=int, required=True)
    backfill.add_argument("--to", dest="last", type=int, required=True)
    reindex = sub.add_parser(
        "reindex", help="roll back to block FROM-1 (publishing removals), then index to the head"
    )
    reindex.add_argument("--from", dest="first", type=int, required=True)
    verify = sub.add_parser("verify", help="compare the database with the chain over a range")
    verify.add_argument("--from", dest="first", type=int, required=True)
    verify.add_argument("--to", dest="last", type=int, default=None)
    args = parser.parse_args(argv)
    for name in ("first", "last"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            parser.error(f"--{'from' if name == 'first' else 'to'} must be >= 0")
    if getattr(args, "last", None) is not None and args.last < args.first:
        parser.error("--to must not be below --from")
    return args


async def dispatch(args: argparse.Namespace, settings: IndexerSettings) -> int:
    command = args.command or "run"
    if command == "run":
        await run(settings)
        return 0
    if command == "migrate":
        return await commands.migrate(settings)
    if command == "status":
        return await commands.status(settings)
    if command == "backfill":
        return await commands.backfill(settings, args.first, args.last)
    if command == "reindex":
        return await commands.reindex(settings, args.first)
    return await commands.verify(settings, args.first, args.last)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_or_exit(IndexerSettings)
    configure_logging(settings.log_level, settings.log_format, secrets=settings.log_secrets())
    tune_collector(GC_THRESHOLDS)
    try:
        return run_until_signalled(
            dispatch(args, settings),
            insist_after=STOP_RETRY,
            signal_exit=(args.command or "run") != "run",  # an interrupted verify is not "OK"
        )
    except (KektechError, ExceptionGroup) as exc:
        errors = leaf_errors(exc)
        if not all(isinstance(e, KektechError) for e in errors):
            raise  # a bug: let the traceback through
        command = args.command or "run"
        for error in errors:
            if command == "run":
                log.error("indexer stopped", error=str(error), error_type=type(error).__name__)
            else:
                commands.report_failure(settings, command, error)
        return 1
