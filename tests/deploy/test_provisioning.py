"""The deployment scripts: shellcheck, provision.sh and update.sh dry runs, a real update, and
`python -m indexer migrate`."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from devnet.postgres_server import Postgres
from devnet.process import REPO_ROOT, free_port
from indexer.schema import latest_schema_version
from tests.support.database import connected

SHELLCHECK = REPO_ROOT / ".venv" / "bin" / "shellcheck"
PM2 = "node_modules/.bin/pm2"
# Every path provision.sh writes or creates; a dry run must leave each as it found it.
PROVISIONED = [
    "/opt/kektech",
    "/home/kektech",
    "/etc/kektech",
    "/var/log/kektech",
    "/var/lib/kektech",
    "/var/www/certbot",
    "/etc/redis/kektech.conf",
    "/etc/redis/users.acl",
    "/etc/nginx/nginx.conf.kektech-bootstrap",
    "/etc/nginx/nginx.conf.kektech-candidate",
    "/etc/nginx/nginx.conf.before-kektech",
    "/etc/letsencrypt/renewal-hooks/deploy/reload-nginx.sh",
    "/etc/logrotate.d/kektech",
    "/etc/cron.d/kektech-check",
    "/etc/sysctl.d/60-kektech.conf",
    "/usr/local/bin/pm2",
    "/usr/local/bin/kektech",
    "/etc/apt/sources.list.d/nodesource.list",
    "/etc/apt/sources.list.d/redis.list",
    "/etc/systemd/system/pm2-kektech.service.d/kektech.conf",
]


def unprivileged(argv: list[str]) -> list[str]:
    """argv run as `nobody` when we are root (as a normal user it already is unprivileged)."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]


def run(
    argv: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def shell_scripts() -> list[Path]:
    return sorted([*REPO_ROOT.joinpath("deploy").rglob("*.sh"), *REPO_ROOT.glob("scripts/*.sh")])


def test_every_shell_script_passes_shellcheck() -> None:
    """shellcheck at its strictest default (severity style, every check) finds nothing in any
    script under deploy/ or scripts/."""
    scripts = shell_scripts()
    assert REPO_ROOT / "deploy" / "provision.sh" in scripts
    result = run([str(SHELLCHECK), "--severity=style", *map(str, scripts)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_provision_dry_run_prints_the_plan_and_changes_nothing() -> None:
    """`provision.sh --dry-run` as an unprivileged user exits 0, prints the key actions
    (packages, Redis ACL users, accept queues, certbot webroot and deploy hook, UFW 22/80/443,
    PM2 start, startup, save and its boot order) and creates none of the paths a real run would."""
    before = {path: os.path.lexists(path) for path in PROVISIONED}
    result = run(
        unprivileged(["bash", "deploy/provision.sh", "--dry-run", "--email", "ops@example.com"]),
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    expected = [
        "user indexer on #<sha256> resetkeys ~kektech:events resetchannels &events:* &market:*",
        "user broadcaster on #<sha256> resetkeys %R~kektech:events resetchannels -@all +xread",
        "user ops on #<sha256> resetkeys %R~kektech:events resetchannels -@all +ping +type +xlen",
        "user default off",
        "REDIS_URL=redis://indexer:<password>@127.0.0.1:6379/0",
        "REDIS_URL=redis://ops:<password>@127.0.0.1:6379/0",
        "REDIS_URL=redis://broadcaster:<password>@127.0.0.1:6379/0",
        "bind 127.0.0.1 -::1",
        # The app user's commands (npm ci, pm2 start) get nothing of root's environment:
        # PM2 would copy it, Redis passwords included, into every app and dump.pm2.
        "would run: runuser -u kektech -- env -i -C /opt/kektech HOME=/home/kektech",
        "would run: certbot certonly --webroot -w /var/www/certbot -d ws.kektech.xyz",
        "would write /etc/letsencrypt/renewal-hooks/deploy/reload-nginx.sh",
        "nginx -t -c /etc/nginx/nginx.conf.kektech-candidate",
        # Accept queues deep enough for a reconnect storm, before Nginx listens.
        "would write /etc/sysctl.d/60-kektech.conf",
        "net.core.somaxconn = 16384",
        "would run: sysctl -p /etc/sysctl.d/60-kektech.conf",
        "would run: ufw default deny incoming",
        "would run: ufw allow 22/tcp",
        "would run: ufw allow 80/tcp",
        "would run: ufw allow 443/tcp",
        "would run: ufw --force enable",
        "would write /etc/logrotate.d/kektech",
        "would write /etc/cron.d/kektech-check",
        "would write /usr/local/bin/pm2",
        "would write /usr/local/bin/kektech",
        "pm2 start ecosystem.config.js",
        "pm2 startup systemd -u kektech --hp /home/kektech",
        "pm2 save",
        # PM2's boot unit waits for the network, Postgres and Redis.
        "would write /etc/systemd/system/pm2-kektech.service.d/kektech.conf",
        "After=network-online.target postgresql.service redis-server.service",
        "would run: systemctl daemon-reload",
        "python -m indexer migrate",
        # Started is not up: a wrong .env makes the indexer crash-loop, online between restarts.
        ".venv/bin/python -m ops settle --seconds 30",
    ]
    missing = [line for line in expected if line not in out]
    assert not missing, out
    # The firewall lets HTTP in before certbot needs it: an image with UFW already active
    # (SSH only) would otherwise fail the challenge, and every re-run would stop there.
    assert out.index("would run: ufw allow 80/tcp") < out.index("would run: certbot certonly")
    assert "generated-on-the-first-real-run" not in out  # secrets are masked even as dummies
    assert {path: os.path.lexists(path) for path in PROVISIONED} == before


def nodejs_bundles_npm() -> bool:
    """Whether the installed nodejs package provides npm itself (NodeSource's does)."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Provides}", "nodejs"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0 and "npm" in result.stdout.replace(",", " ").split()


def test_provision_asks_apt_for_npm_only_when_no_nodejs_brings_it() -> None:
    """NodeSource's nodejs bundles npm and conflicts with the distribution's npm package,
    whatever its repository file is called: asking apt for npm beside it failed the first
    step, at every run. Only a host with no npm gets the package."""
    result = run(
        unprivileged(["bash", "deploy/provision.sh", "--dry-run", "--email", "ops@example.com"]),
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    installs = [
        line.split()
        for line in result.stdout.splitlines()
        if "apt-get install" in line and "would run:" in line
    ]
    asked = any("npm" in words for words in installs)
    assert asked == (shutil.which("npm") is None and not nodejs_bundles_npm()), installs


def test_provision_dry_run_substitutes_the_domain() -> None:
    """--domain replaces ws.kektech.xyz in the certificate request and the Nginx config."""
    result = run(
        unprivileged(["bash", "deploy/provision.sh", "--dry-run", "--domain", "ws.example.org"]),
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-d ws.example.org" in result.stdout
    assert "ws.kektech.xyz" not in result.stdout


def render_env(env: Mapping[str, str]) -> str:
    """The .env that deploy/render-env.sh writes from .env.example in environment `env`."""
    result = subprocess.run(
        ["bash", "deploy/render-env.sh", ".env.example"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_rendering_the_first_env_puts_no_secret_on_a_command_line(tmp_path: Path) -> None:
    """render-env.sh takes the URLs from its environment and must keep them out of every
    command's arguments (any local user reads those in ps): each tool it may run is wrapped
    here to record its arguments. Values are written as given, `&` and `\\` included."""
    calls = tmp_path / "calls.log"
    shims = tmp_path / "bin"
    shims.mkdir()
    for tool in ("sed", "awk", "mawk", "gawk", "perl", "python3", "envsubst"):
        real = shutil.which(tool)
        if real is None:
            continue
        shim = shims / tool
        shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\nexec {real} "$@"\n')
        shim.chmod(0o755)
    password = r"s3cret&more\1-0123"
    env = {
        "PATH": f"{shims}:{os.environ['PATH']}",
        "DOMAIN": "ws.example.org",
        "REDIS_URL": f"redis://ops:{password}@127.0.0.1:6379/0",
        "DATABASE_URL": f"postgresql://kektech:{password}@db.example.org/kektech",
    }
    rendered = render_env(env)
    assert f"REDIS_URL={env['REDIS_URL']}" in rendered.splitlines()
    assert f"DATABASE_URL={env['DATABASE_URL']}" in rendered.splitlines()
    assert calls.exists(), "the script ran none of the wrapped tools; wrap the one it uses"
    assert password not in calls.read_text()


def test_the_first_env_of_a_vps_names_its_own_domain() -> None:
    """The .env provisioning writes from .env.example points the monitoring (`kektech check`,
    doctor's tls) at this VPS's domain, and the services at its Redis user and database."""
    env = {
        "PATH": os.environ["PATH"],
        "DOMAIN": "ws.example.org",
        "REDIS_URL": "redis://ops:secret-password-0123@127.0.0.1:6379/0",
        "DATABASE_URL": "postgresql://kektech@/kektech?host=/var/run/postgresql",
    }
    rendered = render_env(env)
    lines = rendered.splitlines()
    for expected in (
        "OPS_TLS_ENDPOINT=ws.example.org:443",
        "MONITOR_WS_URL=wss://ws.example.org/ws",
        "REDIS_URL=redis://ops:secret-password-0123@127.0.0.1:6379/0",
        "DATABASE_URL=postgresql://kektech@/kektech?host=/var/run/postgresql",
    ):
        assert expected in lines
    settings = [line for line in lines if line and not line.startswith("#")]
    assert not [line for line in settings if "kektech.xyz" in line]
    example = (REPO_ROOT / ".env.example").read_text().splitlines()
    assert len(lines) == len(example)


def test_update_started_as_root_passes_none_of_roots_environment_on(tmp_path: Path) -> None:
    """Started as root, update.sh runs itself as the checkout's owner with a clean
    environment: whatever root's shell exported (a cloud token, say) must not reach that
    user's commands, PM2 among them, which would copy it into every app and dump.pm2. The
    owner's commands are observed through a `git` that records its environment and fails
    (so the update stops at once: it cannot read the checkout's commit)."""
    if os.geteuid() != 0:
        pytest.skip("only root starts update.sh as another user")
    base = Path(tempfile.mkdtemp(prefix="kektech-update-"))  # /tmp: nobody can reach it
    try:
        base.chmod(0o755)
        checkout, shims, seen = base / "app", base / "bin", base / "git-env.txt"
        (checkout / ".git").mkdir(parents=True)
        shutil.copy(REPO_ROOT / ".env.example", checkout / ".env.example")
        shutil.copy(REPO_ROOT / "deploy" / "update.sh", base / "update.sh")
        shims.mkdir()
        (shims / "git").write_text(f"#!/bin/sh\nenv >> {seen}\nexit 1\n")
        (shims / "git").chmod(0o755)
        seen.touch()
        for path in (checkout, checkout / ".git", checkout / ".env.example", seen):
            shutil.chown(path, "nobody", "nogroup")
        env = {
            "PATH": f"{shims}:{os.environ['PATH']}",
            "HOME": "/root",
            "ROOT_ONLY_TOKEN": "root-secret-0123",
        }
        result = run(["bash", str(base / "update.sh"), "--dir", str(checkout)], env=env)
        assert "running as nobody" in result.stdout, result.stdout + result.stderr
        assert "cannot read the commit" in result.stderr, result.stdout + result.stderr
        assert result.returncode == 1
        observed = seen.read_text()
        assert f"HOME={pwd.getpwnam('nobody').pw_dir}" in observed.splitlines()
        assert "root-secret-0123" not in observed
    finally:
        shutil.rmtree(base)


def test_update_dry_run_prints_the_steps() -> None:
    """`update.sh --dry-run` as an unprivileged user exits 0 and prints pull, install,
    migrate, reload, the settle check and save without running them."""
    result = run(unprivileged(["bash", "deploy/update.sh", "--dry-run"]), cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for text in (
        "[1/5] pull: would run: git pull --ff-only",
        "[2/5] install from the lock files: would run: bash scripts/install.sh",
        "[3/5] migrate the database: would run: .venv/bin/python -m indexer migrate",
        "[4/5] reload the services: would run:",
        "startOrReload",
        "--update-env",
        "[5/5] check that they stay up: would run:",
        ".venv/bin/python -m ops settle --seconds 30",
        "would run: " + str(REPO_ROOT / PM2) + " save",
    ):
        assert text in result.stdout, result.stdout


def test_update_takes_a_checkout_made_by_git_worktree(tmp_path: Path) -> None:
    """A `git worktree add` checkout (its .git is a file) is a checkout update.sh updates;
    a directory that is no checkout at all is refused before any step."""
    clone, worktree = tmp_path / "clone", tmp_path / "worktree"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    subprocess.run(
        ["git", "-C", str(clone), "worktree", "add", "-q", "--detach", str(worktree)],
        check=True,
        timeout=120,
    )
    result = run(["bash", "deploy/update.sh", "--dry-run", "--dir", str(worktree)], cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"dry run: nothing is changed (checkout {worktree} at" in result.stdout
    assert "[1/5] pull: would run: git pull --ff-only" in result.stdout

    result = run(["bash", "deploy/update.sh", "--dry-run", "--dir", str(tmp_path)], cwd=REPO_ROOT)
    assert result.returncode == 1
    assert f"{tmp_path} is not a git checkout" in result.stderr
    assert "[1/5]" not in result.stdout


def test_update_refuses_a_settle_time_kektech_settle_would_refuse() -> None:
    """--settle outside 0..3600 s stops the update before it starts, rather than failing its
    step 5 on a healthy release (and rolling that back)."""
    command = ["bash", "deploy/update.sh", "--dry-run", "--settle", "5000"]
    result = run(unprivileged(command), cwd=REPO_ROOT)
    assert result.returncode == 1
    assert "--settle takes whole seconds from 0 to 3600" in result.stderr
    assert "[1/5]" not in result.stdout


# -------------------------------------------------------------------------- migrate


def migrate(database_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": database_url, "LOG_FORMAT": "json"}
    return run([sys.executable, "-m", "indexer", "migrate"], cwd=cwd, env=env)


async def tables(database_url: str) -> set[str]:
    async with connected(database_url) as conn:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row["tablename"] for row in rows}


async def test_migrate_applies_pending_migrations_once(database_url: str, tmp_path: Path) -> None:
    """`python -m indexer migrate` on a fresh database creates the schema and says which
    migrations it applied; a second run applies nothing and still exits 0."""
    first = await asyncio.to_thread(migrate, database_url, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "applied: 0001_initial.sql" in first.stdout
    assert {"schema_migrations", "events", "outbox", "indexer_state"} <= await tables(database_url)
    second = await asyncio.to_thread(migrate, database_url, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "applied:" not in second.stdout
    assert "no migrations applied" in second.stdout


def test_migrate_reports_an_unreachable_database(tmp_path: Path) -> None:
    """With nothing listening at DATABASE_URL, migrate exits 1 with one line naming the cause."""
    result = migrate(f"postgresql://kektech:secret-pw@127.0.0.1:{free_port()}/kektech", tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kektech: database unreachable:"), lines
    assert "secret-pw" not in result.stderr + result.stdout


def test_migrate_reports_a_database_that_refuses_the_connection(
    postgres: Postgres, tmp_path: Path
) -> None:
    """A server that answers but refuses (here: no such database) is one line too, not a
    traceback."""
    result = migrate(postgres.dsn("no_such_database"), tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kektech: database refused the connection:"), lines
    assert "no_such_database" in lines[0]


# -------------------------------------------------------------------------- update.sh, real


def git(cwd: Path, *args: str) -> str:
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    result = run(["git", *identity, *args], cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def snapshot(destination: Path) -> None:
    """A git repository holding this working tree (committed or not) as one commit."""
    listed = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git(destination, "init", "-q", "-b", "main")
    git(destination, "add", "-A")
    git(destination, "commit", "-q", "-m", "snapshot")


class Pm2:
    """PM2 with its own PM2_HOME, killed at the end."""

    def __init__(self, checkout: Path, home: Path) -> None:
        self.binary = str(checkout / PM2)
        self.env = {**os.environ, "PM2_HOME": str(home)}

    def __call__(self, *args: str) -> str:
        result = run([self.binary, *args], env=self.env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def pids(self) -> dict[str, int]:
        return {app["name"]: app["pid"] for app in json.loads(self("jlist"))}


@pytest.fixture
def checkouts(tmp_path: Path) -> tuple[Path, Path]:
    """(developer repo, deployed checkout): the checkout is a clone of a bare origin that the
    developer repo pushes to. The checkout gets node_modules copied (with install.sh's lock
    stamp, so no npm download) and its own .venv is built by update.sh."""
    dev, origin, app = tmp_path / "dev", tmp_path / "origin.git", tmp_path / "app"
    dev.mkdir()
    snapshot(dev)
    git(tmp_path, "clone", "-q", "--bare", str(dev), str(origin))
    git(dev, "remote", "add", "origin", str(origin))
    git(tmp_path, "clone", "-q", str(origin), str(app))
    shutil.copytree(REPO_ROOT / "node_modules", app / "node_modules", symlinks=True)
    return dev, app


@pytest.fixture
def pm2(checkouts: tuple[Path, Path], tmp_path: Path) -> Iterator[Pm2]:
    _, app = checkouts
    driver = Pm2(app, tmp_path / "pm2")
    try:
        yield driver
    finally:
        run([driver.binary, "kill"], env=driver.env)


def trivial_ecosystem(path: Path) -> Path:
    """An ecosystem with one long-sleeping app: reloading it is what update.sh must do."""
    app = {"name": "update-probe", "script": "/bin/sleep", "args": "3600", "interpreter": "none"}
    path.write_text(f"module.exports = {{ apps: [{json.dumps(app)}] }};\n")
    return path


def script_ecosystem(path: Path, script: Path) -> Path:
    """An ecosystem whose one app runs a shell script of the checkout: what a release runs."""
    app = {"name": "update-probe", "script": str(script), "interpreter": "bash"}
    path.write_text(f"module.exports = {{ apps: [{json.dumps(app)}] }};\n")
    return path


def commit_and_push(dev: Path, message: str) -> None:
    git(dev, "add", "-A")
    git(dev, "commit", "-q", "-m", message)
    git(dev, "push", "-q", "origin", "main")


@pytest.mark.timeout(300)
def test_an_update_whose_services_do_not_stay_up_is_rolled_back(
    checkouts: tuple[Path, Path], pm2: Pm2, database_url: str, tmp_path: Path
) -> None:
    """A release whose service cannot start (a setting missing, say) crash-loops after the
    reload, which PM2 still reports as done: update.sh sees the restarts within --settle, puts
    the previous commit back, reloads it, exits 1, and leaves the saved process list alone."""
    dev, app = checkouts
    (app / ".env").write_text(f"DATABASE_URL={database_url}\nLOG_FORMAT=json\n")
    (dev / "service.sh").write_text("exec sleep 3600\n")
    commit_and_push(dev, "a service that runs")
    git(app, "pull", "-q", "--ff-only")
    running_release = git(app, "rev-parse", "HEAD")
    (dev / "service.sh").write_text("echo 'missing setting' >&2\nexit 2\n")
    commit_and_push(dev, "a service that cannot start")
    ecosystem = script_ecosystem(tmp_path / "probe.config.js", app / "service.sh")
    pm2("start", str(ecosystem))

    command = ["bash", "deploy/update.sh", "--ecosystem", str(ecosystem), "--settle", "5"]
    result = run(command, cwd=app, env=pm2.env)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "step 5/5 (check that they stay up) failed" in result.stderr
    assert "fix: pm2 logs update-probe --lines 100" in result.stdout + result.stderr
    assert "Rolled back" in result.stderr
    assert git(app, "rev-parse", "HEAD") == running_release
    [probe] = json.loads(pm2("jlist"))
    assert probe["pm2_env"]["status"] == "online"
    assert Path(f"/proc/{probe['pid']}/cmdline").read_bytes().split(b"\0")[:2] == [
        b"sleep",
        b"3600",
    ]
    assert not (tmp_path / "pm2" / "dump.pm2").exists()


@pytest.mark.timeout(240)
async def test_update_pulls_installs_migrates_and_reloads(
    checkouts: tuple[Path, Path], pm2: Pm2, database_url: str, tmp_path: Path
) -> None:
    """update.sh, for real, on a checkout one commit behind its origin: fast-forwards to the
    origin, builds .venv from uv.lock, applies the migration the new commit brings, reloads
    the PM2 apps (new pid) and saves the process list; the caller's environment does not
    reach the apps (PM2's --update-env would merge it in, over .env)."""
    dev, app = checkouts
    (app / ".env").write_text(f"DATABASE_URL={database_url}\nLOG_FORMAT=json\n")
    name = f"{latest_schema_version() + 1:04d}_update_probe.sql"  # the release's next
    probe = dev / "indexer" / "migrations" / name
    probe.write_text("CREATE TABLE update_probe (id integer);\n")
    git(dev, "add", "-A")
    git(dev, "commit", "-q", "-m", "a new migration")
    git(dev, "push", "-q", "origin", "main")
    ecosystem = trivial_ecosystem(tmp_path / "probe.config.js")
    pm2("start", str(ecosystem))
    pid_before = pm2.pids()["update-probe"]

    result = await asyncio.to_thread(
        run,
        ["bash", "deploy/update.sh", "--ecosystem", str(ecosystem)],
        cwd=app,
        env={**pm2.env, "DATABASE_URL": "postgresql://from-the-operators-shell/other"},
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert git(app, "rev-parse", "HEAD") == git(dev, "rev-parse", "HEAD")
    assert (app / ".venv" / "bin" / "python").exists()
    assert f"applied: {name}" in result.stdout
    assert "update_probe" in await tables(database_url)
    pid_after = pm2.pids()["update-probe"]
    assert pid_after not in (0, pid_before)
    assert (tmp_path / "pm2" / "dump.pm2").exists()
    app_env = next(p["pm2_env"] for p in json.loads(pm2("jlist")) if p["name"] == "update-probe")
    assert "from-the-operators-shell" not in json.dumps(app_env)


def test_update_stops_at_the_first_failing_step(
    checkouts: tuple[Path, Path], pm2: Pm2, tmp_path: Path
) -> None:
    """When the pull cannot fast-forward (the checkout diverged), update.sh exits 1 naming
    that step and runs none of the later ones (no .venv built, no reload)."""
    dev, app = checkouts
    for repo, text in ((dev, "upstream"), (app, "local")):
        (repo / "DIVERGED").write_text(text)
        git(repo, "add", "DIVERGED")
        git(repo, "commit", "-q", "-m", text)
    git(dev, "push", "-q", "origin", "main")
    ecosystem = trivial_ecosystem(tmp_path / "probe.config.js")
    pm2("start", str(ecosystem))
    pid_before = pm2.pids()["update-probe"]

    result = run(["bash", "deploy/update.sh", "--ecosystem", str(ecosystem)], cwd=app, env=pm2.env)

    assert result.returncode == 1
    assert "step 1/5 (pull) failed" in result.stderr
    assert "[2/5]" not in result.stdout
    assert not (app / ".venv").exists()
    assert pm2.pids()["update-probe"] == pid_before
