"""The processes a program started, read from /proc: to check that it leaves none behind."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from tests.support.waiting import eventually

PROC = Path("/proc")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name: [0] state, [1] ppid, [19] start
    time; None once the process is gone."""
    try:
        return (PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid` (children, theirs, ...), with its start time.

    The start time tells a process from a later one that got the same pid.
    """
    parents: dict[int, int] = {}
    started: dict[int, str] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = int(fields[1])
            started[int(entry.name)] = fields[19]
    found: dict[int, str] = {}
    pending = [pid]
    while pending:
        parent = pending.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = started[child]
                pending.append(child)
    return found


def running(processes: dict[int, str]) -> dict[int, str]:
    """Those of `processes` still running, with their command lines.

    A zombie has ended: an orphan is re-parented to PID 1, which in a container may never
    reap it.
    """
    alive: dict[int, str] = {}
    for pid, start in processes.items():
        fields = _stat(pid)
        if fields is None or fields[19] != start or fields[0] == "Z":
            continue
        try:
            command = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        alive[pid] = command.decode(errors="replace").strip()
    return alive


async def wait_ended(processes: dict[int, str], *, within: float) -> dict[int, str]:
    """Wait until none of `processes` runs; returns those still running after `within` s."""

    async def all_ended() -> bool:
        return not running(processes)

    with contextlib.suppress(TimeoutError):
        await eventually(all_ended, within=within, what="every process ended")
    return running(processes)


def kill_all(processes: dict[int, str]) -> None:
    """SIGKILL those still running: what a failed test left, not for the next one to find."""
    for pid in running(processes):
        os.kill(pid, signal.SIGKILL)
