"""`kektech doctor | check | settle`: the operator's troubleshooting checklist, the cron
monitor, and the wait after a reload.

Exit codes. doctor: 0 when no check FAILs (WARN lines are printed but do not change the code),
1 when at least one FAILs. check: 0 when no condition holds (nothing is printed unless
--verbose), 1 when at least one ALERT, 2 when no ALERT but a condition could not be evaluated
(ERROR). settle: 0 when every PM2 process stayed online without a restart, 1 when one did
not, 2 when PM2 could not be asked. All: 2 for invalid settings or arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

from ops.doctor import CHECKS, diagnose
from ops.errors import ProbeError
from ops.monitor import ALERT, CONDITIONS, evaluate
from ops.probes.pm2 import Pm2Process, list_processes
from ops.settings import OpsSettings
from ops.settle import watch
from ops.verdicts import Level, Verdict
from shared.logs import configure_logging
from shared.redaction import Writer
from shared.settings_loading import settings_or_exit

__all__ = ["main"]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_BLIND = 2
DEFAULT_SETTLE_SECONDS = 30.0
MAX_SETTLE_SECONDS = 3600.0
# What to read when a process did not settle: its own log, or PM2's with no process at all.
SETTLE_FIX = "pm2 logs {app} --lines 100"


def _names(value: str, known: Sequence[str]) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:  # `--only ""` (an unset shell variable, say) would otherwise run everything
        raise argparse.ArgumentTypeError(
            f"at least one name is required (choose from {', '.join(known)})"
        )
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown: {', '.join(unknown)} (choose from {', '.join(known)})"
        )
    return names


def _selection(parser: argparse.ArgumentParser, known: Sequence[str]) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--only",
        type=lambda v: _names(v, known),
        metavar="A,B",
        help=f"run only these ({', '.join(known)})",
    )
    group.add_argument(
        "--skip", type=lambda v: _names(v, known), metavar="A,B", help="run all but these"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kektech",
        description="KEKTECH operations: settings come from the environment and .env in the "
        "current directory (run from /opt/kektech), like the services'.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser(
        "doctor",
        help="check every dependency and print one verdict per check with its fix",
        description="Print `OK|WARN|FAIL  <check>  <detail> [-> fix: ...]` per check. "
        "Exit 1 if any check FAILs, else 0 (WARN does not change the exit code).",
    )
    _selection(doctor, tuple(CHECKS))
    check = sub.add_parser(
        "check",
        help="evaluate the alert conditions (for cron); silent and exit 0 when healthy",
        description="Print one `ALERT|ERROR  <condition>  <detail>` line per finding. Exit 0: "
        "no finding; 1: an alert; 2: no alert but a condition could not be evaluated.",
    )
    _selection(check, CONDITIONS)
    check.add_argument(
        "-v", "--verbose", action="store_true", help="print a summary line when healthy"
    )
    settle = sub.add_parser(
        "settle",
        help="wait until every PM2 process has stayed online, without a restart, for a while",
        description="Watch `pm2 jlist` for --seconds. Exit 0 when every process stayed online "
        "without a restart, 1 at the first that did not (one FAIL line each), 2 when PM2 "
        "could not be asked.",
    )
    settle.add_argument(
        "--seconds", type=_duration, default=DEFAULT_SETTLE_SECONDS, metavar="S",
        help=f"how long to watch (default {DEFAULT_SETTLE_SECONDS:g})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.command in ("doctor", "check"):
        selecting = doctor if args.command == "doctor" else check
        args.names = _chosen(args, tuple(CHECKS) if args.command == "doctor" else CONDITIONS)
        if not args.names:  # would pass in silence, checking nothing
            selecting.error("--skip leaves nothing to check")
    return args


def _duration(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_SETTLE_SECONDS:
        raise argparse.ArgumentTypeError(f"not a number of seconds from 0 to {MAX_SETTLE_SECONDS}")
    return seconds


def _chosen(args: argparse.Namespace, known: Sequence[str]) -> list[str]:
    if args.only:
        return [name for name in known if name in args.only]
    skipped = set(args.skip or ())
    return [name for name in known if name not in skipped]


async def run_doctor(settings: OpsSettings, names: Sequence[str], *, out: Writer) -> int:
    verdicts = await diagnose(settings, names)
    for verdict in verdicts:
        out.say(verdict.line())
    return EXIT_PROBLEM if any(v.level is Level.FAIL for v in verdicts) else EXIT_OK


async def run_check(
    settings: OpsSettings, names: Sequence[str], *, out: Writer, verbose: bool
) -> int:
    findings = await evaluate(settings, names, now=time.time())
    for finding in findings:
        out.say(finding.line())
    if not findings:
        if verbose:
            out.say(f"OK     no alert ({', '.join(names)} checked)")
        return EXIT_OK
    return EXIT_PROBLEM if any(f.kind == ALERT for f in findings) else EXIT_BLIND


async def run_settle(settings: OpsSettings, seconds: float, *, out: Writer) -> int:
    async def processes() -> list[Pm2Process]:
        return await list_processes(
            settings.ops_pm2_bin, home=settings.pm2_home_path(), within=settings.ops_timeout
        )

    try:
        settled = await watch(processes, seconds=seconds)
    except ProbeError as exc:
        out.say(Verdict(Level.FAIL, "settle", str(exc), exc.fix).line())
        return EXIT_BLIND
    for problem in settled.problems:
        fix = SETTLE_FIX.format(app=problem.app) if problem.app else "pm2 logs --lines 100"
        out.say(Verdict(Level.FAIL, "settle", problem.text, fix).line())
    if settled.problems:
        return EXIT_PROBLEM
    out.say(
        Verdict(
            Level.OK, "settle", f"{settled.processes} processes online for {seconds:g} s"
        ).line()
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_or_exit(OpsSettings)
    secrets = settings.log_secrets()
    configure_logging(settings.log_level, settings.log_format, secrets=secrets)
    out = Writer(secrets)
    if args.command == "doctor":
        return asyncio.run(run_doctor(settings, args.names, out=out))
    if args.command == "settle":
        return asyncio.run(run_settle(settings, args.seconds, out=out))
    return asyncio.run(run_check(settings, args.names, out=out, verbose=args.verbose))
