"""deploy/bin/pm2.sh, the `pm2` of the VPS, on a copy whose app user, checkout and home are the
test's and whose PM2 is a fake that prints who runs it, its arguments and its environment."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from devnet.process import REPO_ROOT
from tests.deploy.conftest import wrapper_copy

FAKE_PM2 = """#!/bin/sh
id -un
printf '%s\\n' "$@"
printf -- '--\\n'
exec env -0
"""
# sudo as Debian and Ubuntu configure it (env_reset): the command gets an environment of
# sudo's making, not the caller's. It does not switch users: it checks that it was asked to.
FAKE_SUDO = """#!/bin/sh
user=root
while [ "$#" -gt 0 ]; do
    case "$1" in
        -u) user="$2"; shift 2 ;;
        -H) shift ;;
        --) shift; break ;;
        *) break ;;
    esac
done
[ "$user" = {user} ] || {{ echo "sudo: asked to run as $user" >&2; exit 2; }}
exec /usr/bin/env -i PATH=/usr/bin:/bin HOME=/nonexistent USER="$user" "$@"
"""
ARGS = ["start", "ecosystem.config.js", "--only", "kektech-websocket-server"]
# What an operator's shell may hold when running `pm2`.
CALLER = {
    "KEKTECH_BROADCASTER_INSTANCES": "3",  # docs/pm2.md: how N is changed
    "KEKTECH_LOG_DIR": "/var/log/kek tech\nsecond line $(id) `id` '\"",  # passed as it is
    "KEKTECH_NOT-A-NAME": "x",  # not a variable name: not passed
    "DATABASE_URL": "postgresql://from-the-shell/other",  # a service setting: never passed
    "ROOT_ONLY_TOKEN": "root-secret-0123",  # the caller's own
}


@dataclass
class Pm2Run:
    user: str
    args: list[str]
    env: dict[str, str]


@dataclass
class Wrapper:
    path: Path
    home: Path

    def __call__(
        self, *, env: Mapping[str, str], as_user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the wrapper with ARGS, as `as_user` when given (from root)."""
        argv = [str(self.path), *ARGS]
        if as_user is not None:
            group = pwd.getpwnam(as_user).pw_gid
            argv = ["setpriv", f"--reuid={as_user}", f"--regid={group}", "--clear-groups", *argv]
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=60, check=False
        )


def wrapper_for(base: Path, app_user: str) -> Wrapper:
    """deploy/bin/pm2.sh with `app_user` as the app user and its checkout and home in `base`."""
    checkout = base / "opt"
    (checkout / "node_modules" / ".bin").mkdir(parents=True)
    shutil.copy(REPO_ROOT / ".env.example", checkout / ".env.example")
    fake = checkout / "node_modules" / ".bin" / "pm2"
    fake.write_text(FAKE_PM2)
    fake.chmod(0o755)
    return Wrapper(wrapper_copy(base, "pm2.sh", app_user), base / "home")


def what_pm2_got(result: subprocess.CompletedProcess[str]) -> Pm2Run:
    assert result.returncode == 0, result.stdout + result.stderr
    head, _, environment = result.stdout.partition("\n--\n")
    user, *args = head.split("\n")
    env = dict(entry.split("=", 1) for entry in environment.split("\0") if entry)
    return Pm2Run(user, args, env)


def assert_only_kektech_settings_passed(env: dict[str, str]) -> None:
    assert env["KEKTECH_BROADCASTER_INSTANCES"] == "3"
    assert env["KEKTECH_LOG_DIR"] == CALLER["KEKTECH_LOG_DIR"]
    assert "KEKTECH_NOT-A-NAME" not in env
    assert "DATABASE_URL" not in env
    assert "ROOT_ONLY_TOKEN" not in env


def test_run_by_the_app_user_it_keeps_the_callers_service_settings_from_pm2(
    base: Path,
) -> None:
    """/usr/local/bin/pm2 hands PM2 no setting of the services exported in the caller's shell
    (--update-env would copy it into every app, over .env), but keeps what
    ecosystem.config.js reads (KEKTECH_*). Run here as the app user itself."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    wrapper = wrapper_for(base, me)
    got = what_pm2_got(wrapper(env={"PATH": os.environ["PATH"], **CALLER}))
    assert (got.user, got.args) == (me, ARGS)
    assert got.env["HOME"] == str(wrapper.home)
    assert got.env["KEKTECH_BROADCASTER_INSTANCES"] == "3"
    assert "from-the-shell" not in str(got.env)


def test_run_by_root_it_hands_kektech_settings_to_the_app_users_pm2(base: Path) -> None:
    """Run by root (as the VPS is administered), it runs PM2 as the app user through runuser
    (no sudo needed) with KEKTECH_* and PM2_HOME exactly as given, and nothing else of root's
    environment: `KEKTECH_BROADCASTER_INSTANCES=3 pm2 start ...` starts 3 instances."""
    if os.geteuid() != 0:
        pytest.skip("only root switches users without sudo")  # CI runs as root
    wrapper = wrapper_for(base, "nobody")
    pm2_home = str(base / "pm2 home")
    # A root shell from a plain `su` keeps the caller's PATH: no /usr/sbin, where runuser is.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PM2_HOME": pm2_home, **CALLER}
    got = what_pm2_got(wrapper(env=env))
    assert (got.user, got.args) == ("nobody", ARGS)
    assert_only_kektech_settings_passed(got.env)
    assert got.env["PM2_HOME"] == pm2_home
    assert (got.env["HOME"], got.env["USER"]) == (str(wrapper.home), "nobody")


def test_run_by_another_user_it_hands_kektech_settings_through_sudo(base: Path) -> None:
    """Run by a user other than root or the app user, it goes through sudo, which resets the
    environment: KEKTECH_* and PM2_HOME still reach PM2, as arguments of env(1)."""
    caller = "nobody" if os.geteuid() == 0 else None  # else the test's own user
    wrapper = wrapper_for(base, "daemon")
    shims = base / "bin"
    shims.mkdir()
    (shims / "sudo").write_text(FAKE_SUDO.format(user="daemon"))
    (shims / "sudo").chmod(0o755)
    pm2_home = str(base / "pm2 home")
    env = {"PATH": f"{shims}:/usr/bin:/bin", "PM2_HOME": pm2_home, **CALLER}
    got = what_pm2_got(wrapper(env=env, as_user=caller))
    assert got.args == ARGS
    assert_only_kektech_settings_passed(got.env)
    assert got.env["PM2_HOME"] == pm2_home
    assert (got.env["HOME"], got.env["USER"]) == (str(wrapper.home), "daemon")
