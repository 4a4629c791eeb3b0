"""Run a local program (pm2, nginx) with a deadline; a hung program is killed, not waited on."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ops.errors import ProbeError

__all__ = ["Completed", "resolve_binary", "run_command"]


@dataclass(frozen=True, slots=True)
class Completed:
    """What a finished program returned."""

    returncode: int
    stdout: str
    stderr: str


def resolve_binary(name: str, *fallbacks: Path) -> str | None:
    """Return the path of an executable (a name on PATH or a path), else the first fallback."""
    found = shutil.which(name)
    if found is not None:
        return found
    for candidate in fallbacks:
        if shutil.which(str(candidate)) is not None:
            return str(candidate)
    return None


async def run_command(
    argv: Sequence[str], *, within: float, env: Mapping[str, str] | None = None
) -> Completed:
    """Run argv to completion in `within` seconds; ProbeError if it cannot start or hangs."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
    except OSError as exc:
        raise ProbeError(f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise ProbeError(f"{Path(argv[0]).name} gave no answer within {within:g} s") from None
    finally:
        if proc.returncode is None:  # cancelled from outside: never leave the child behind
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
