"""scripts/install.sh on a machine it has to complete, with apt-get and node faked."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from devnet.services import REPO_ROOT

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
    result = subprocess.run(
        ["/bin/bash", str(root / "scripts" / "install.sh")],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "nodejs" in (bin_dir / "apt.log").read_text()
    assert result.returncode == 1, result.stderr
    assert "node v12.22.9 is too old" in result.stderr
    assert not (bin_dir / "npm.log").exists()
    assert os.access(bin_dir / "node", os.X_OK)
