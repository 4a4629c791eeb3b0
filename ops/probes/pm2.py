"""PM2: the processes it runs, from `pm2 jlist`, without ever starting a daemon by accident."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ops.errors import ProbeError
from ops.probes.command import resolve_binary, run_command

__all__ = ["Pm2Process", "daemon_running", "list_processes", "parse_jlist"]

LOCAL_PM2 = Path("node_modules/.bin/pm2")  # the project's own pm2, relative to /opt/kektech
START_FIX = "start the apps: cd /opt/kektech && pm2 start ecosystem.config.js && pm2 save"
DAEMON_CONNECT_TIMEOUT = 1.0  # a local socket answers at once, or refuses


@dataclass(frozen=True, slots=True)
class Pm2Process:
    """One process (an app instance) as PM2 describes it."""

    name: str
    pm_id: int
    status: str  # online, stopping, stopped, launching, errored, one-launch-status
    restarts: int  # restart_time: every restart since `pm2 start` or `pm2 reset`
    created_at: float | None  # seconds since the epoch of `pm2 start` (kept across restarts)
    memory: int  # bytes
    # Seconds PM2 waits before restarting it (exp_backoff_restart_delay's current step, or
    # restart_delay); 0 without a delay.
    restart_delay: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.name}#{self.pm_id}"


def daemon_running(home: Path) -> bool:
    """Whether the PM2 daemon of home runs: it answers on its RPC socket. (Its pm2.pid is no
    proof: a daemon killed outright leaves it behind, and the PID may be another's since.)"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DAEMON_CONNECT_TIMEOUT)
        try:
            sock.connect(str(home / "rpc.sock"))
        except OSError:
            return False
    return True


def parse_jlist(text: str) -> list[Pm2Process]:
    """Parse `pm2 jlist` output (PM2 may print notices before the JSON array)."""
    start = text.find("[")
    try:
        items = orjson.loads(text[start:]) if start >= 0 else None
    except orjson.JSONDecodeError:
        items = None
    if not isinstance(items, list):
        raise ProbeError(f"pm2 jlist printed no process list: {text.strip()[:200]!r}")
    return [_process(item) for item in items if isinstance(item, dict)]


def _process(item: Mapping[str, Any]) -> Pm2Process:
    env = item.get("pm2_env") or {}
    created = env.get("created_at")
    return Pm2Process(
        name=str(item.get("name", "?")),
        pm_id=int(item.get("pm_id", -1)),
        status=str(env.get("status", "unknown")),
        restarts=int(env.get("restart_time", 0)),
        created_at=created / 1000 if isinstance(created, int | float) else None,
        memory=int((item.get("monit") or {}).get("memory", 0)),
        restart_delay=_milliseconds(env.get("prev_restart_delay") or env.get("restart_delay")),
    )


def _milliseconds(value: object) -> float:
    """Seconds of a PM2 delay in ms (a number or a numeric string), 0 if it is neither."""
    try:
        return max(0.0, float(str(value))) / 1000 if value is not None else 0.0
    except ValueError:
        return 0.0


async def list_processes(binary: str, *, home: Path, within: float) -> list[Pm2Process]:
    """The processes of the PM2 daemon living in home; ProbeError if there is none."""
    found = resolve_binary(binary, LOCAL_PM2) if binary == "pm2" else resolve_binary(binary)
    if found is None:
        raise ProbeError(
            f"{binary} not found",
            fix="install PM2 (npm install) or set OPS_PM2_BIN to its path",
        )
    # `pm2 jlist` would start a daemon if none runs: look first, and report the absence.
    if not daemon_running(home):
        raise ProbeError(
            f"the PM2 daemon is not running (PM2_HOME={home})",
            fix="pm2 resurrect (or sudo systemctl start pm2-kektech), then pm2 status; "
            "if no app was saved, " + START_FIX,
        )
    # PM2 reads its home from the environment; the rest is passed on for PATH (node).
    env = {**os.environ, "PM2_HOME": str(home)}
    done = await run_command([found, "jlist"], within=within, env=env)
    if done.returncode != 0:
        raise ProbeError(f"pm2 jlist failed: {(done.stderr or done.stdout).strip()[:200]}")
    return parse_jlist(done.stdout)
