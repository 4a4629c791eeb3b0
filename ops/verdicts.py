"""Verdict lines, `OK|WARN|FAIL  <check>  <detail> [-> fix: <what to do>]`, never with secrets."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Level", "Verdict", "render_line"]


class Level(Enum):
    """How bad a check's result is; the exit code follows the worst one."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of one check."""

    level: Level
    check: str
    detail: str
    fix: str | None = None

    def line(self) -> str:
        return render_line(self.level.value, self.check, self.detail, self.fix)


def render_line(label: str, name: str, detail: str, fix: str | None) -> str:
    """`LABEL  name  detail [-> fix: ...]`: the output line of doctor and check alike."""
    text = f"{label:<4}  {name}  {detail}"
    return f"{text} -> fix: {fix}" if fix else text
