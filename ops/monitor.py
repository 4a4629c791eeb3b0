"""`kektech check`: the alert conditions, evaluated once per run (cron runs it every minute).

Conditions: the public WebSocket endpoint down for MONITOR_DOWN_AFTER seconds, the indexer
not answering, its start-up waiting on a dependency or its publishing on Redis for as long,
an app of
OPS_PM2_APPS absent from PM2 or not online, a PM2 process restarted more than
MONITOR_MAX_RESTARTS times within MONITOR_RESTART_WINDOW, memory in use
above MONITOR_MEMORY_PERCENT, the certificate expiring within MONITOR_TLS_DAYS. What must
outlive one run (when the endpoint was first seen down, PM2's restart counters over the last
hour) is kept in MONITOR_STATE_FILE.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

from ops.errors import CertificateInvalid, ProbeError, StateError
from ops.probes.http import Answer, get
from ops.probes.memory import read_memory
from ops.probes.pm2 import START_FIX, Pm2Process, list_processes
from ops.probes.tls import Certificate, fetch_certificate
from ops.probes.websocket import probe_websocket
from ops.settings import OpsSettings, parse_endpoint
from ops.state import load_state, save_state
from ops.verdicts import render_line
from shared.config_types import url_host

__all__ = ["CONDITIONS", "Finding", "count_restarts", "evaluate"]

CONDITIONS = ("websocket", "indexer", "pm2", "memory", "tls")
ALERT = "ALERT"
ERROR = "ERROR"  # the condition could not be evaluated: the monitor is blind to it
Sample = tuple[float, int]  # (unix time, PM2 restart counter)
# Statuses of an instance that runs, or is about to: a restart or reload in progress (PM2 goes
# stopping, stopped, launching for each instance), backoff included, is the restart
# condition's to count. PM2 gave up ("errored") or someone stopped it ("stopped"): not.
RUNNING = frozenset({"online", "launching", "waiting restart", "stopping"})
WAITING = "waiting restart"
# PM2 7 leaves an app it gave up on (too many unstable restarts) in "waiting restart" when a
# restart delay is set, and restarts nothing. A wait this much longer than the delay is that.
WAITING_MARGIN = 5.0
# Cron runs the check every minute: a longer silence than a few runs (the VPS or cron was
# down) is a gap in what was seen, after which a failure is counted from the next run.
RUNS_GAP = 180.0


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of output: an alert, or a condition the monitor could not evaluate."""

    kind: str
    condition: str
    detail: str
    fix: str | None = None

    def line(self) -> str:
        return render_line(self.kind, self.condition, self.detail, self.fix)


def count_restarts(samples: Sequence[Sample], *, now: float, window: float) -> int:
    """Restarts within [now - window, now] from time-ordered counter samples (the last is now).

    The baseline is the newest sample at or before the window's start, else the oldest one.
    A counter that went down was reset (`pm2 reset`, delete and start): its new value counts.
    """
    start = now - window
    before = [s for s in samples if s[0] <= start]
    series = before[-1:] + [s for s in samples if s[0] > start]
    return sum(b - a if b >= a else b for (_, a), (_, b) in pairwise(series))


def _history(saved: object, process: Pm2Process, *, now: float, window: float) -> list[Sample]:
    """Saved samples of a process plus the current one, pruned to what the window needs."""
    # Only well-formed, past samples: the file may have been edited by hand.
    samples: list[Sample] = [
        (float(item[0]), int(item[1]))
        for item in (saved if isinstance(saved, list) else [])
        if isinstance(item, list)
        and len(item) == 2
        and all(isinstance(v, int | float) and math.isfinite(v) for v in item)
        and item[0] < now
    ]
    if not samples and process.created_at is not None and now - process.created_at < window:
        # First sight of a process started within the window: every restart is in it.
        samples = [(process.created_at, 0)]
    samples.append((now, process.restarts))
    start = now - window
    older = [s for s in samples if s[0] <= start]
    return older[-1:] + [s for s in samples if s[0] > start]


async def check_websocket(
    settings: OpsSettings, state: dict[str, Any], *, now: float
) -> list[Finding]:
    """The endpoint has been failing handshake + ping for at least MONITOR_DOWN_AFTER."""
    url = settings.monitor_ws_url
    saved = state.get("websocket")
    mine: dict[str, Any] = saved if isinstance(saved, dict) and saved.get("url") == url else {}
    state["websocket"] = mine
    mine["url"] = url
    try:
        await probe_websocket(url, ca_file=settings.ops_tls_ca_file, within=settings.ops_timeout)
    except ProbeError as exc:
        since = _failing_since(mine, str(exc), now=now, down_after=settings.monitor_down_after)
        down_for = now - since
        if down_for < settings.monitor_down_after:
            return []
        first = datetime.fromtimestamp(since, tz=UTC)
        return [
            Finding(
                ALERT,
                "websocket",
                f"{url} down for {down_for:.0f} s (first failure {first:%Y-%m-%d %H:%M:%S} "
                f"UTC): {exc}",
                "kektech doctor; pm2 status; sudo systemctl status nginx",
            )
        ]
    _passing(mine, now=now)
    return []


async def check_indexer(
    settings: OpsSettings, state: dict[str, Any], *, now: float
) -> list[Finding]:
    """The indexer answers /healthz, its start-up is not waiting on a dependency and its
    publishing not on Redis, or has not been for MONITOR_DOWN_AFTER (such a wait is otherwise
    invisible: PM2 shows it online, and the WebSocket endpoint answers)."""
    host = url_host(settings.indexer_http_host)
    url = f"http://{host}:{settings.indexer_http_port}/healthz"
    saved = state.get("indexer")
    mine: dict[str, Any] = saved if isinstance(saved, dict) else {}
    state["indexer"] = mine
    try:
        problem = _indexer_problem(await get(url, within=settings.ops_timeout))
    except ProbeError as exc:
        problem = f"not answering: {exc}"
    if problem is None:
        _passing(mine, now=now)
        return []
    since = _failing_since(mine, problem, now=now, down_after=settings.monitor_down_after)
    if now - since < settings.monitor_down_after:
        return []
    return [
        Finding(
            ALERT,
            "indexer",
            f"{problem} (for {now - since:.0f} s)",
            "kektech doctor; pm2 logs kektech-event-indexer --lines 100",
        )
    ]


def _indexer_problem(answer: Answer) -> str | None:
    """What is wrong according to the answer on the indexer's /healthz, None if nothing is.

    The indexer's report is HTTP 200 with "status": "ok"; anything else comes from another
    program on its port (the indexer then cannot listen there), which is no indexer running.
    """
    body = answer.json()
    if answer.status != 200 or body.get("status") != "ok":
        return f"answers HTTP {answer.status} without an indexer's health report"
    waiting = body.get("waiting_for")
    if isinstance(waiting, str):
        # At start-up, or a leader whose lease went unrenewed (docs/indexer.md, Endpoints).
        who = "leader" if body.get("role") == "leader" else "start-up"
        return f"{who} waits for: {waiting}"
    if body.get("redis_up") is False:
        # Indexing goes on, so nothing else here sees it: no browser gets an event meanwhile.
        return "publishes nothing: Redis does not answer (events wait in the outbox)"
    return None


def _failing_since(mine: dict[str, Any], problem: str, *, now: float, down_after: float) -> float:
    """Record a failing run of a condition; return when its failure began. After a gap in the
    runs longer than the alert delay (the VPS or cron was down), the state meanwhile is
    unknown: the failure is counted from now."""
    previous = mine.get("checked_at")
    mine["checked_at"] = now
    gap = max(down_after, RUNS_GAP)  # runs a minute apart are no gap, whatever the delay
    blind = isinstance(previous, int | float) and now - previous > gap
    if blind or not isinstance(mine.get("down_since"), int | float):
        mine["down_since"] = now
    mine["last_error"] = problem
    return float(mine["down_since"])


def _passing(mine: dict[str, Any], *, now: float) -> None:
    mine["checked_at"] = now
    mine.pop("down_since", None)
    mine.pop("last_error", None)


async def check_pm2(settings: OpsSettings, state: dict[str, Any], *, now: float) -> list[Finding]:
    """Every app of OPS_PM2_APPS is in PM2's list with every instance online (or starting), and
    no PM2 process restarted more than MONITOR_MAX_RESTARTS times within the window."""
    try:
        processes = await list_processes(
            settings.ops_pm2_bin, home=settings.pm2_home_path(), within=settings.ops_timeout
        )
    except ProbeError as exc:
        return [Finding(ERROR, "pm2", f"cannot read the process list: {exc}", exc.fix)]
    saved = state.get("pm2")
    old: dict[str, Any] = saved if isinstance(saved, dict) else {}
    window = settings.monitor_restart_window
    fresh: dict[str, list[Sample]] = {}
    stuck = _stuck_waiting(processes, state, now=now)
    findings = _apps_not_running(settings.ops_pm2_apps, processes, stuck)
    for process in processes:
        samples = _history(old.get(process.key), process, now=now, window=window)
        fresh[process.key] = samples
        restarts = count_restarts(samples, now=now, window=window)
        if restarts > settings.monitor_max_restarts:
            findings.append(
                Finding(
                    ALERT,
                    "pm2",
                    f"{process.key} restarted {restarts} times in the last {window / 60:g} min "
                    f"(now {process.status})",
                    f"pm2 logs {process.name} --lines 200",
                )
            )
    # Processes that are gone are forgotten; JSON has no tuples.
    state["pm2"] = {key: [list(s) for s in samples] for key, samples in fresh.items()}
    return findings


def _stuck_waiting(
    processes: Sequence[Pm2Process], state: dict[str, Any], *, now: float
) -> dict[str, float]:
    """Seconds each process stuck in "waiting restart" has waited, by key: the same restart
    counter seen waiting since longer than its restart delay plus WAITING_MARGIN."""
    saved = state.get("pm2_waiting")
    old: dict[str, Any] = saved if isinstance(saved, dict) else {}
    waiting: dict[str, list[float]] = {}
    stuck: dict[str, float] = {}
    for process in processes:
        if process.status != WAITING:
            continue
        seen = old.get(process.key)
        since = now
        if (
            isinstance(seen, list)
            and len(seen) == 2
            and all(isinstance(v, int | float) for v in seen)
            and seen[1] == process.restarts
            and seen[0] <= now
        ):
            since = float(seen[0])
        waiting[process.key] = [since, process.restarts]
        if now - since > process.restart_delay + WAITING_MARGIN:
            stuck[process.key] = now - since
    state["pm2_waiting"] = waiting
    return stuck


def _apps_not_running(
    apps: Sequence[str], processes: Sequence[Pm2Process], stuck: Mapping[str, float]
) -> list[Finding]:
    """An app PM2 gave up on (errored, or stuck waiting to restart), or that was stopped or
    deleted, restarts no more: its restart counter goes quiet while nothing runs, so its status
    is checked every run."""
    findings = []
    for app in apps:
        mine = [p for p in processes if p.name == app]
        if not mine:
            findings.append(Finding(ALERT, "pm2", f"{app}: not in the PM2 process list", START_FIX))
            continue
        down = [p for p in mine if p.status not in RUNNING or p.key in stuck]
        if down:
            statuses = ", ".join(
                f"#{p.pm_id} {p.status}, not restarted for {stuck[p.key]:.0f} s"
                if p.key in stuck
                else f"#{p.pm_id} {p.status}"
                for p in mine
            )
            findings.append(
                Finding(
                    ALERT,
                    "pm2",
                    f"{app}: {len(down)} of {len(mine)} instances not online ({statuses})",
                    f"pm2 logs {app} --lines 100; pm2 restart {app}",
                )
            )
    return findings


async def check_memory(settings: OpsSettings) -> list[Finding]:
    """Memory in use (total minus MemAvailable) is at most MONITOR_MEMORY_PERCENT."""
    try:
        memory = read_memory()
    except ProbeError as exc:
        return [Finding(ERROR, "memory", str(exc))]
    if memory.used_percent <= settings.monitor_memory_percent:
        return []
    return [
        Finding(
            ALERT,
            "memory",
            f"{memory.used_percent:.1f}% in use (above {settings.monitor_memory_percent:g}%), "
            f"{memory.available_kib // 1024} MiB available of {memory.total_kib // 1024} MiB",
            "pm2 monit (max_memory_restart restarts a leaking app); free -m; ps aux --sort=-rss",
        )
    ]


async def fetch_tls(settings: OpsSettings) -> Certificate | ProbeError:
    """The endpoint's certificate, or why it could not be had."""
    host, port = parse_endpoint(settings.ops_tls_endpoint)
    try:
        return await fetch_certificate(
            host, port, ca_file=settings.ops_tls_ca_file, within=settings.ops_timeout
        )
    except ProbeError as exc:
        return exc
    except Exception as exc:  # unexpected: reported as "could not be evaluated", not a crash
        return ProbeError(f"{type(exc).__name__}: {exc}")


async def _guarded(
    name: str, job: Callable[[], Coroutine[Any, Any, list[Finding]]]
) -> list[Finding]:
    """Run one condition; one that fails unexpectedly is an ERROR line, and the others and
    the state file still get done."""
    try:
        return await job()
    except Exception as exc:
        return [Finding(ERROR, name, f"could not be evaluated: {type(exc).__name__}: {exc}")]


def judge_tls(
    settings: OpsSettings, result: Certificate | ProbeError, *, endpoint_up: bool, now: float
) -> list[Finding]:
    """The certificate is valid for at least MONITOR_TLS_DAYS more days."""
    endpoint = settings.ops_tls_endpoint
    fix = "sudo certbot renew, then sudo systemctl reload nginx"
    if isinstance(result, CertificateInvalid):
        return [Finding(ALERT, "tls", str(result), fix)]
    if isinstance(result, ProbeError):
        # An unreachable endpoint is the websocket condition's to report, after its grace time.
        if endpoint_up:
            return [Finding(ERROR, "tls", f"cannot check the certificate: {result}")]
        return []
    days = result.days_left(datetime.fromtimestamp(now, tz=UTC))
    if days >= settings.monitor_tls_days:
        return []
    return [
        Finding(
            ALERT,
            "tls",
            f"certificate of {endpoint} expires in {days:.1f} days "
            f"({result.not_after:%Y-%m-%d %H:%M} UTC)",
            fix,
        )
    ]


async def evaluate(settings: OpsSettings, names: Sequence[str], *, now: float) -> list[Finding]:
    """Evaluate the named conditions concurrently and save what the next run needs."""
    findings: list[Finding] = []
    path = settings.monitor_state_file
    stateful = any(name in names for name in ("websocket", "indexer", "pm2"))
    state: dict[str, Any] = {}
    if stateful:
        try:
            state = load_state(path)
        except StateError as exc:
            findings.append(Finding(ERROR, "state", str(exc)))
    jobs: dict[str, Callable[[], Coroutine[Any, Any, list[Finding]]]] = {
        "websocket": lambda: check_websocket(settings, state, now=now),
        "indexer": lambda: check_indexer(settings, state, now=now),
        "pm2": lambda: check_pm2(settings, state, now=now),
        "memory": lambda: check_memory(settings),
    }
    async with asyncio.TaskGroup() as tasks:
        running = {
            name: tasks.create_task(_guarded(name, jobs[name]), name=f"check-{name}")
            for name in names
            if name in jobs
        }
        certificate = (
            tasks.create_task(fetch_tls(settings), name="check-tls") if "tls" in names else None
        )
    for name in names:
        if name in running:
            findings += running[name].result()
    if certificate is not None:
        websocket = state.get("websocket") or {}
        up = "websocket" not in names or "down_since" not in websocket
        findings += judge_tls(settings, certificate.result(), endpoint_up=up, now=now)
    if stateful:
        try:
            save_state(path, state)
        except StateError as exc:
            findings.append(Finding(ERROR, "state", str(exc)))
    return findings
