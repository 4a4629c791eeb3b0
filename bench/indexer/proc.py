"""What /proc says about processes: memory and CPU time (Linux only, like the services)."""

from __future__ import annotations

import os
import time
from pathlib import Path

# Resident set, its peak, and its split into private memory and mapped files (shared libraries).
MEMORY_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
PROC = Path("/proc")


def read_memory(pid: int) -> dict[str, int]:
    """The MEMORY_FIELDS of a process, in kB."""
    found: dict[str, int] = {}
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in MEMORY_FIELDS:
            found[key] = int(value.split()[0])
    return found


def _stat(pid: int) -> list[str]:
    # The fields after the command name, which may itself hold spaces and parentheses:
    # [0] state, [1] ppid, ..., [11] utime, [12] stime, [13] cutime, [14] cstime.
    return (PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time so far of a process, its live descendants and the children it has reaped.

    Postgres runs a backend per connection and npm's anvil is a wrapper around the binary,
    so a service's cost is its whole process tree.
    """
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                parent = int(_stat(int(entry.name))[1])
            except (OSError, IndexError):
                continue  # exited meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    ticks = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = _stat(current)
        except OSError:
            continue
        ticks += sum(int(v) for v in fields[11:15])
        pending += children.get(current, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """Busy CPU time of the whole machine so far, all CPUs added up."""
    values = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent by named process trees, this process and the machine since start."""

    def __init__(self, trees: dict[str, int]) -> None:
        self._trees = trees
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        found = {name: tree_cpu_seconds(pid) for name, pid in self._trees.items()}
        found["benchmark"] = time.process_time()
        found["machine"] = machine_busy_seconds()
        return found

    def spent(self) -> dict[str, float]:
        """Per tree, "benchmark" (this process), "others" and "machine" (all busy time)."""
        now = self._read()
        spent = {name: now[name] - self._start[name] for name in now}
        known = sum(v for k, v in spent.items() if k != "machine")
        spent["others"] = max(0.0, spent["machine"] - known)
        return spent
