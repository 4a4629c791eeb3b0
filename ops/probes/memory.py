"""Memory in use, from the kernel's own estimate of what is available (MemAvailable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ops.errors import ProbeError

__all__ = ["MemoryUse", "read_memory"]

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True, slots=True)
class MemoryUse:
    """Total and available memory in KiB."""

    total_kib: int
    available_kib: int

    @property
    def used_percent(self) -> float:
        return 100.0 * (self.total_kib - self.available_kib) / self.total_kib


def read_memory(path: Path = MEMINFO) -> MemoryUse:
    """Read MemTotal and MemAvailable (page cache the kernel can drop counts as available)."""
    fields: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                fields[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise ProbeError(f"cannot read {path}: {exc}") from None
    if "MemTotal" not in fields or "MemAvailable" not in fields or fields["MemTotal"] <= 0:
        raise ProbeError(f"{path} has no MemTotal/MemAvailable (Linux 3.14+ is needed)")
    return MemoryUse(fields["MemTotal"], fields["MemAvailable"])
