"""promtool, as scripts/install.sh provides it, over deploy/monitoring/alerts.yml."""

from __future__ import annotations

import subprocess

from devnet.services import REPO_ROOT

PROMTOOL = REPO_ROOT / ".venv" / "bin" / "promtool"  # scripts/install.sh puts it there
RULES = REPO_ROOT / "deploy" / "monitoring" / "alerts.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL.exists(), f"{PROMTOOL} is missing: run scripts/install.sh"
    return subprocess.run(
        [str(PROMTOOL), *args], capture_output=True, text=True, timeout=60, check=False
    )
