"""The monitor's memory between cron runs: a small JSON file, replaced atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ops.errors import StateError

__all__ = ["load_state", "save_state"]


def load_state(path: Path) -> dict[str, Any]:
    """The saved state, or {} on the first run (a missing file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        return {}  # damaged: start over, as below
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        # A torn or hand-edited file (JSONDecodeError is a ValueError), or JSON that Python
        # will not load: nested too deep, or an integer too long to convert. Start over rather
        # than stop monitoring; the next save replaces the file.
        return {}
    return value if isinstance(value, dict) else {}


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write state to path through a temporary file and a rename, so a reader never sees half."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    except OSError as exc:
        raise StateError(
            f"cannot write in {path.parent}: {exc.strerror}; create it writable by this user "
            "or set MONITOR_STATE_FILE"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(state, file, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StateError(f"cannot write {path}: {exc.strerror}") from None
