from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devnet.process import REPO_ROOT


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="kektech-deploy-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def wrapper_copy(base: Path, script: str, app_user: str) -> Path:
    """deploy/bin/<script> as `base`/<its name>, with `app_user` as the app user and the
    checkout and home at `base`/opt and `base`/home (created, empty)."""
    checkout, home = base / "opt", base / "home"
    checkout.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    text = (REPO_ROOT / "deploy" / "bin" / script).read_text()
    for line, ours in (
        ("APP_USER=kektech", f"APP_USER={app_user}"),
        ("APP_HOME=/home/kektech", f"APP_HOME={home}"),
        ("APP_DIR=/opt/kektech", f"APP_DIR={checkout}"),
    ):
        assert f"\n{line}\n" in text, line
        text = text.replace(f"\n{line}\n", f"\n{ours}\n")
    path = base / script.removesuffix(".sh")
    path.write_text(text)
    path.chmod(0o755)
    return path
