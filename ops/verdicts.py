"""Verdict lines, `OK|WARN|FAIL  <check>  <detail> [-> fix: <what to do>]`, never with secrets."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from shared.redaction import redact_text

__all__ = ["Level", "Verdict", "Writer", "known_secrets", "render_line"]


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


def known_secrets(secrets: Iterable[str]) -> re.Pattern[str] | None:
    """One pattern matching every secret string (longest first), or None if there is none."""
    ordered = sorted({s for s in secrets if s}, key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None


class Writer:
    """Prints lines with every configured secret and URL credential replaced by ***."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self._known = known_secrets(secrets)

    def say(self, line: str) -> None:
        print(redact_text(line, self._known), flush=True)
