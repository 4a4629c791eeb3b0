"""Nginx: `nginx -t` on the configuration it would load."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ops.errors import ProbeError
from ops.probes.command import resolve_binary, run_command

__all__ = ["ConfigTest", "check_config"]

# nginx's own wording for a file it may not open, and OpenSSL 3's for a certificate or key
# (certbot keeps /etc/letsencrypt/live root-only): either means "run it as root".
PERMISSION_DENIED = ("(13: Permission denied)", "system library::Permission denied")
# "nginx: [emerg] ..." on a terminal; "2026/11/25 22:47:55 [emerg] 257#257: ..." once error_log
# is set: keep the level and the message.
# Where Debian's and Ubuntu's nginx package installs it: not on a non-root user's PATH (the
# app user's, under which doctor runs) on Debian 12.
SBIN = Path("/usr/sbin")
LOG_LINE = re.compile(r"^(?:nginx: )?(?:\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?(\[\w+\]) (?:\d+#\d+: )?")


@dataclass(frozen=True, slots=True)
class ConfigTest:
    """The result of `nginx -t`: passed, and the line that says why (nginx writes to stderr)."""

    ok: bool
    message: str
    permission_denied: bool  # failed only for want of root (log files, pid file, certificates)


async def check_config(binary: str, conf: str, *, within: float) -> ConfigTest:
    """Run `nginx -t -c conf`."""
    found = resolve_binary(binary, *([] if "/" in binary else [SBIN / binary]))
    if found is None:
        raise ProbeError(
            f"{binary} not found", fix="sudo apt-get install nginx, or set DOCTOR_NGINX_BIN"
        )
    done = await run_command([found, "-t", "-c", conf], within=within)
    lines = [
        LOG_LINE.sub(r"\1 ", line.strip()).removeprefix("nginx: ")
        for line in (done.stderr + done.stdout).splitlines()
        if line.strip()
    ]
    problems = [line for line in lines if "[emerg]" in line or "[crit]" in line]
    if done.returncode == 0:
        return ConfigTest(True, lines[-1] if lines else "test is successful", False)
    message = problems[0] if problems else (lines[-1] if lines else f"exit {done.returncode}")
    denied = bool(problems) and all(
        any(wording in line for wording in PERMISSION_DENIED) for line in problems
    )
    return ConfigTest(False, message, denied)
