"""deploy/bin/kektech.sh, the `kektech` of the VPS, on a copy whose app user, checkout and home
are the test's and whose CLI is a fake that prints who runs it, where, its arguments and its
environment."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import wrapper_copy

FAKE_CLI = """#!/bin/sh
id -un
pwd
printf '%s\\n' "$@"
printf -- '--\\n'
exec env -0
"""
# As if the machine had none (a minimal Debian), whether or not this one has.
NO_SUDO = """#!/bin/sh
echo "sudo: not installed" >&2
exit 127
"""
ARGS = ["check", "--verbose"]


def wrapper_for(base: Path, app_user: str) -> Path:
    """deploy/bin/kektech.sh with `app_user` as the app user and its checkout and home in
    `base`."""
    (base / "opt" / ".venv" / "bin").mkdir(parents=True)
    fake = base / "opt" / ".venv" / "bin" / "kektech"
    fake.write_text(FAKE_CLI)
    fake.chmod(0o755)
    return wrapper_copy(base, "kektech.sh", app_user)


def test_run_by_root_without_sudo_it_runs_the_cli_as_the_app_user(base: Path) -> None:
    """Root (as the VPS is administered, and a minimal Debian has no sudo) gets the CLI run
    as the app user in the checkout, with the app user's environment, not root's."""
    if os.geteuid() != 0:
        pytest.skip("only root switches users without sudo")  # CI runs as root
    wrapper = wrapper_for(base, "nobody")
    shims = base / "bin"
    shims.mkdir()
    (shims / "sudo").write_text(NO_SUDO)
    (shims / "sudo").chmod(0o755)
    # A root shell from a plain `su` keeps the caller's PATH: no /usr/sbin, where runuser is.
    path = f"{shims}:/usr/local/bin:/usr/bin:/bin"
    env = {"PATH": path, "ROOT_ONLY_TOKEN": "root-secret-0123", "DATABASE_URL": "postgresql://x"}
    result = subprocess.run(
        [str(wrapper), *ARGS], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    head, _, environment = result.stdout.partition("\n--\n")
    user, cwd, *args = head.split("\n")
    got = dict(entry.split("=", 1) for entry in environment.split("\0") if entry)
    assert (user, cwd, args) == ("nobody", str(base / "opt"), ARGS)
    assert (got["HOME"], got["USER"]) == (str(base / "home"), "nobody")
    assert "ROOT_ONLY_TOKEN" not in got
    assert "DATABASE_URL" not in got


def test_run_by_the_app_user_it_drops_the_callers_settings(base: Path) -> None:
    """The app user itself gets the CLI with the same clean environment as root does: a
    REDIS_URL or DATABASE_URL exported in its shell does not override .env."""
    app_user = pwd.getpwuid(os.geteuid()).pw_name  # the wrapper sees its caller as the app user
    wrapper = wrapper_for(base, app_user)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/somewhere/else",
        "DATABASE_URL": "postgresql://from-the-shell/other",
        "REDIS_URL": "redis://from-the-shell:6379/0",
        "PM2_HOME": "/srv/another-pm2",
        "CALLER_ONLY_TOKEN": "caller-secret-0123",
    }
    result = subprocess.run(
        [str(wrapper), *ARGS], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    head, _, environment = result.stdout.partition("\n--\n")
    user, cwd, *args = head.split("\n")
    got = dict(entry.split("=", 1) for entry in environment.split("\0") if entry)
    assert (user, cwd, args) == (app_user, str(base / "opt"), ARGS)
    assert (got["HOME"], got["USER"], got["LANG"]) == (str(base / "home"), app_user, "C.UTF-8")
    for name in ("DATABASE_URL", "REDIS_URL", "PM2_HOME", "CALLER_ONLY_TOKEN"):
        assert name not in got
