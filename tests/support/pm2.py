"""A PM2 daemon of the test's own (PM2_HOME in tmp_path) running ecosystem.config.js."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

from devnet.process import FIRST_PORT, REPO_ROOT, ephemeral_low
from tests.support.waiting import eventually

PM2 = REPO_ROOT / "node_modules" / ".bin" / "pm2"
ECOSYSTEM = REPO_ROOT / "ecosystem.config.js"
PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
INDEXER = "kektech-event-indexer"
BROADCASTER = "kektech-websocket-server"
COMMAND_TIMEOUT = 90.0
# pm2.log lines start with "2026-11-25T23:40:00: PM2 log: " (local time, second resolution).
PM2_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d): PM2 log: (.*)$")
CATCH_ECOSYSTEM_ERROR = (
    "try { require(process.argv[1]) } catch (e) { process.stdout.write(e.message) }"
)
_PORT_PICKER = random.SystemRandom()  # not seeded alike in parallel test processes


def consecutive_free_ports(count: int) -> int:
    """A base port such that base .. base+count-1 are free on 127.0.0.1 right now.

    SO_REUSEADDR as the services' listeners use it, so a client connection in TIME_WAIT on
    one of the ports (common: Linux gives connect() even ports) does not disqualify it.
    Taken below the kernel's ephemeral range, as free_port() does: a port inside it may be
    given to an outgoing connection as its source port before PM2's app binds it.
    """
    last_error: OSError | None = None
    below = ephemeral_low()
    for _ in range(200):
        base = _PORT_PICKER.randrange(FIRST_PORT, below - count + 1)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError as exc:
            last_error = exc
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports: {last_error}")


def evaluate_ecosystem(**env: str) -> list[dict[str, Any]]:
    """The apps ecosystem.config.js defines when PM2 evaluates it with `env`."""
    result = subprocess.run(
        ["node", "-e", "process.stdout.write(JSON.stringify(require(process.argv[1]).apps))",
         str(ECOSYSTEM)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    apps = json.loads(result.stdout)
    assert isinstance(apps, list)
    return apps


def ecosystem_error(**env: str) -> str:
    """The message of the error ecosystem.config.js throws when evaluated with `env`."""
    result = subprocess.run(
        ["node", "-e", CATCH_ECOSYSTEM_ERROR, str(ECOSYSTEM)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    assert result.stdout, "ecosystem.config.js evaluated without an error"
    return result.stdout


def kill_timeouts() -> dict[str, float]:
    """Seconds PM2 waits after an app's stop signal before it SIGKILLs it (kill_timeout in
    ecosystem.config.js), by app name."""
    return {str(app["name"]): float(app["kill_timeout"]) / 1000 for app in evaluate_ecosystem()}


def write_dotenv(directory: Path, values: Mapping[str, str]) -> Path:
    """The untracked .env both services read from their working directory."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".env"
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


class Pm2:
    """Drive node_modules/.bin/pm2 with its own PM2_HOME; `pm2 kill` on exit, even on failure."""

    def __init__(self, home: Path, *, workdir: Path, **ecosystem_env: str) -> None:
        self.home = home
        self.log_dir = home / "app-logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Only what PM2 needs: the apps inherit this environment, so nothing of the test
        # runner's (a DATABASE_URL, say) may reach them except through .env.
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TMPDIR")}
        self.env = {
            **base,
            "HOME": str(home),
            "PM2_HOME": str(home),
            "KEKTECH_ROOT": str(REPO_ROOT),
            "KEKTECH_PYTHON": str(PYTHON),
            "KEKTECH_WORKDIR": str(workdir),
            "KEKTECH_LOG_DIR": str(self.log_dir),
            "KEKTECH_SERVICE_ENV_DIR": str(home / "no-service-env"),
            **ecosystem_env,
        }

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run one pm2 command; its stdout, or AssertionError with its output on failure."""
        result = subprocess.run(
            [str(PM2), *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"pm2 {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n"
                f"{result.stderr}\n{self.daemon_log()[-3000:]}"
            )
        return result.stdout

    def start(self, *args: str) -> None:
        """`pm2 start ecosystem.config.js`: returns once every app is ready (or timed out)."""
        self.run("start", str(ECOSYSTEM), *args)

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """Run a pm2 command in the background (one that blocks, such as a slow start)."""
        return subprocess.Popen(
            [str(PM2), *args],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        """`pm2 kill`: stops every app and the daemon of this PM2_HOME only."""
        if (self.home / "pm2.pid").exists():
            subprocess.run(
                [str(PM2), "kill"],
                env=self.env,
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )

    def jlist(self) -> list[dict[str, Any]]:
        """`pm2 jlist`: every process PM2 knows, parsed."""
        out = self.run("jlist")
        # pm2 may print a notice before the JSON array.
        processes = json.loads(out[out.index("[") :])
        assert isinstance(processes, list)
        return processes

    def processes(self, name: str) -> list[dict[str, Any]]:
        """The processes of one app, in pm_id order."""
        found = [p for p in self.jlist() if p["name"] == name]
        return sorted(found, key=lambda p: int(p["pm_id"]))

    def statuses(self, name: str) -> list[str]:
        return [str(p["pm2_env"]["status"]) for p in self.processes(name)]

    async def wait_status(self, name: str, status: str, *, within: float = 30.0) -> None:
        async def reached() -> bool:
            statuses = self.statuses(name)
            return bool(statuses) and all(s == status for s in statuses)

        await eventually(reached, within=within, what=f"{name} {status}")

    def daemon_log(self) -> str:
        """PM2's own log (starting, online, exited with code/signal, SIGKILL notices)."""
        path = self.home / "pm2.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def daemon_events(self, pattern: str) -> list[tuple[datetime, str]]:
        """(time, message) of each pm2.log line whose message matches `pattern`."""
        found = []
        for line in self.daemon_log().splitlines():
            match = PM2_LOG_LINE.match(line)
            if match and re.search(pattern, match.group(2)):
                found.append((datetime.fromisoformat(match.group(1)), match.group(2)))
        return found

    def app_log(self, name: str) -> list[dict[str, Any]]:
        """The JSON lines an app wrote to stdout and stderr (all instances, merged)."""
        lines: list[dict[str, Any]] = []
        for kind in ("out", "err"):
            path = self.log_dir / f"{name}.{kind}.log"
            if path.exists():
                for raw in path.read_text(errors="replace").splitlines():
                    if raw.strip():
                        lines.append(json.loads(raw))
        return lines

    def app_log_text(self, name: str) -> str:
        return "".join(
            path.read_text(errors="replace") for path in sorted(self.log_dir.glob(f"{name}.*"))
        )


async def http_json(url: str) -> dict[str, Any]:
    """GET a JSON health endpoint."""
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        body = await resp.json(content_type=None)
    assert isinstance(body, dict)
    return body
