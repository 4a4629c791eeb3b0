"""scripts/install.sh on a machine it has to complete, with apt-get, node and the like faked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from devnet.process import REPO_ROOT

# Records its arguments; installing nodejs gives a node as old as Ubuntu 22.04's. Absolute
# paths: the script runs with PATH set to the fake bin directory only.
FAKE_APT = """#!/bin/sh
here="${{0%/*}}"
echo "$*" >> "$here/apt.log"
case " $* " in
  *" nodejs "*)
    printf '#!/bin/sh\\ncase "$1" in --version) echo v12.22.9;; *) echo 12;; esac\\n' \\
      > "$here/node"
    {chmod} +x "$here/node";;
esac
"""
FAKE_NPM = """#!/bin/sh
echo "$*" >> "${{0%/*}}/npm.log"
"""


def run_install(root: Path, bin_dir: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """The checkout's scripts/install.sh with only `bin_dir` on its PATH."""
    return subprocess.run(
        ["/bin/bash", str(root / "scripts" / "install.sh")],
        env={"PATH": str(bin_dir), "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_node_too_old_from_the_distribution_stops_the_install(tmp_path: Path) -> None:
    """On a machine without Node.js, install.sh installs the distribution's: when that one is
    too old for the npm tools (Ubuntu 22.04's 12), it stops saying so instead of going on."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "install.sh", root / "scripts" / "install.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("env", "id", "dirname", "redis-server", "nginx", "pgbouncer", "openssl"):
        real = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert real is not None, name
        (bin_dir / name).symlink_to(real)
    chmod = shutil.which("chmod")
    assert chmod is not None
    for name, script in (("apt-get", FAKE_APT), ("npm", FAKE_NPM)):
        (bin_dir / name).write_text(script.format(chmod=chmod))
        (bin_dir / name).chmod(0o755)
    result = run_install(root, bin_dir, tmp_path)
    assert "nodejs" in (bin_dir / "apt.log").read_text()
    assert result.returncode == 1, result.stderr
    assert "node v12.22.9 is too old" in result.stderr
    assert not (bin_dir / "npm.log").exists()
    assert os.access(bin_dir / "node", os.X_OK)


# apt-get whose package lists are out of date until `apt-get update`: `download` fails before
# and afterwards copies the prometheus package the test built into the current directory.
FAKE_APT_STALE = """#!/bin/sh
here="${{0%/*}}"
echo "$*" >> "$here/apt.log"
case " $* " in
  *" update "*) : > "$here/updated";;
  *" download "*) [ -e "$here/updated" ] || exit 100; {cp} {deb} .;;
esac
"""
# Stand-ins for what install.sh only asks questions of before the promtool step: a Python
# and a .venv that pass its checks, a uv of the pinned version, anvil, node 20.
PASSES = "#!/bin/sh\nexit 0\n"
FAKE_UV = '#!/bin/sh\n[ "$1" != --version ] || echo uv {version}\n'
FAKE_NODE = "#!/bin/sh\necho 20\n"
FAKE_PROMTOOL = "#!/bin/sh\necho 'promtool, version 2.42.0+ds (branch: debian/sid)'\n"


def prometheus_deb(tmp_path: Path) -> Path:
    """A package laid out like Debian's prometheus, with a promtool that prints a version."""
    tree = tmp_path / "prometheus"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: prometheus\nVersion: 2.42.0+ds-5\nArchitecture: all\n"
        "Maintainer: test <test@example.org>\nDescription: test package\n"
    )
    for name, text in (("prometheus", PASSES), ("promtool", FAKE_PROMTOOL)):
        (tree / "usr" / "bin").mkdir(parents=True, exist_ok=True)
        (tree / "usr" / "bin" / name).write_text(text)
        (tree / "usr" / "bin" / name).chmod(0o755)
    deb = tmp_path / "prometheus_2.42.0+ds-5_all.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zxz", str(tree), str(deb)], check=True,
                   capture_output=True)  # fmt: skip
    return deb


# What `id` says to install.sh run as the app user (provision.sh and update.sh run it so),
# and a sudo that the app user has no right to.
FAKE_ID_APP_USER = """#!/bin/sh
case "$1" in -u) echo 1000;; -un) echo kektech;; *) {id} "$@";; esac
"""
NO_SUDO = """#!/bin/sh
echo "$*" >> "${0%/*}/sudo.log"
echo "kektech is not in the sudoers file." >&2
exit 1
"""


@pytest.mark.parametrize("user", ["root", "app user"])
def test_promtool_is_taken_out_of_the_prometheus_package_once(tmp_path: Path, user: str) -> None:
    """install.sh puts promtool from the distribution's prometheus package into .venv/bin
    without installing the package (which would start a Prometheus server), with package
    lists of its own when the system's are stale (no root needed: provision.sh and update.sh
    run it as the app user); a second run asks apt nothing."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "install.sh", root / "scripts" / "install.sh")
    shutil.copy(REPO_ROOT / "package-lock.json", root / "package-lock.json")
    (root / "node_modules" / ".bin").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "package-lock.json", root / "node_modules" / ".kektech-lock")
    (root / ".venv" / "bin").mkdir(parents=True)
    version = re.search(r'^UV_VERSION="(.+)"$', (root / "scripts" / "install.sh").read_text(), re.M)
    assert version is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cp = shutil.which("cp")
    assert cp is not None
    for path, text in (
        (root / ".venv" / "bin" / "python", PASSES),
        (root / ".venv" / "bin" / "uv", FAKE_UV.format(version=version[1])),
        (root / "node_modules" / ".bin" / "anvil", PASSES),
        (bin_dir / "python3", PASSES),
        (bin_dir / "node", FAKE_NODE),
        (bin_dir / "npm", PASSES),
        (bin_dir / "apt-get", FAKE_APT_STALE.format(cp=cp, deb=prometheus_deb(tmp_path))),
        (bin_dir / "sudo", NO_SUDO),
    ):
        path.write_text(text)
        path.chmod(0o755)
    if user == "app user":
        (bin_dir / "id").write_text(FAKE_ID_APP_USER.format(id=shutil.which("id")))
        (bin_dir / "id").chmod(0o755)
    for name in ("env", "id", "dirname", "cmp", "cut", "head", "mktemp", "mkdir", "dpkg-deb", "tar",
                 "chmod", "mv", "rm", "redis-server", "nginx", "pgbouncer", "openssl"):  # fmt: skip
        real = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert real is not None, name
        if not (bin_dir / name).exists():
            (bin_dir / name).symlink_to(real)

    def install() -> subprocess.CompletedProcess[str]:
        return run_install(root, bin_dir, tmp_path)

    first = install()
    assert first.returncode == 0, first.stderr
    assert "promtool 2.42.0+ds" in first.stderr  # the "ready" line
    promtool = root / ".venv" / "bin" / "promtool"
    assert promtool.read_text() == FAKE_PROMTOOL
    assert os.access(promtool, os.X_OK)
    apt = (bin_dir / "apt.log").read_text().splitlines()
    assert [line.split()[0] for line in apt if "prometheus" in line] == ["download"] * 2
    updates = [line for line in apt if line.startswith("update")]
    assert len(updates) == 1
    assert "Dir::State::Lists=" in updates[0]  # its own lists, not the system's
    assert not (bin_dir / "sudo.log").exists()
    assert not [line for line in apt if line.startswith("install") and "prometheus" in line]
    second = install()
    assert second.returncode == 0, second.stderr
    assert (bin_dir / "apt.log").read_text().splitlines() == apt
