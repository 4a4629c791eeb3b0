"""Checks of a .env file that pydantic-settings would pass over in silence."""

from __future__ import annotations

import re
from collections.abc import Iterator
from difflib import get_close_matches
from pathlib import Path

from dotenv.parser import parse_stream

from shared.errors import ConfigError

__all__ = ["check_env_file", "env_files"]


def check_env_file(
    path: Path, *, encoding: str, known: frozenset[str], others: tuple[str, ...]
) -> None:
    """Raise ConfigError for a line of the file that python-dotenv cannot parse, or that sets
    a variable outside `known` and `others` (names, or prefixes ending in _, of variables
    another reader checks).

    python-dotenv skips a line it cannot parse (a quote left open, say) with only a warning on
    stderr, and pydantic-settings skips a name it does not know (MARKET_FACTORY_ADRESS,
    CONFIRMATION, redis_url): either way the setting would silently take its default, and an
    empty MARKET_FACTORY_ADDRESS indexes no market. Refused rather than warned about: a
    warning scrolls by in PM2's logs while the service runs on the wrong value. The message
    names the line by number and the variable by name, never the value (it may be a secret),
    nor a line with no "=", which is more likely part of a value than a name.
    """
    prefixes = tuple(name for name in others if name.endswith("_"))
    with path.open(encoding=encoding) as file:
        for binding in parse_stream(file):
            line = binding.original.line + _leading_newlines(binding.original.string)
            if binding.error:
                raise ConfigError(str(path), f"line {line} cannot be parsed (an unclosed quote?)")
            key = binding.key
            if key is None or key in known or key in others or key.startswith(prefixes):
                continue
            if binding.value is None:
                # A word alone on its line: most likely the end of a value wrapped onto a line
                # of its own (a key, a password), which the message must not repeat.
                raise ConfigError(
                    str(path), f"line {line} has no '=' (a value wrapped onto a line of its own?)"
                )
            raise ConfigError(str(path), f"line {line}: {_unknown_variable(key, known)}")


def env_files(setting: object) -> Iterator[Path]:
    """The paths of model_config's env_file: none, one, or a sequence of them."""
    if setting is None:
        return
    for item in setting if isinstance(setting, list | tuple) else (setting,):
        yield Path(item).expanduser()


def _unknown_variable(key: str, known: frozenset[str]) -> str:
    """Say that key is read by no one, with the name probably meant."""
    if key.upper() in known:
        return f"unknown variable {key} (names are upper case: {key.upper()})"
    if key.startswith("KEKTECH_"):  # ecosystem.config.js's, read when PM2 evaluates it
        return (
            f"unknown variable {key} (ecosystem.config.js reads KEKTECH_* from "
            "/etc/kektech/ecosystem.env, see docs/pm2.md)"
        )
    close = get_close_matches(key.upper(), sorted(known), n=1)
    if close:
        return f"unknown variable {key} (did you mean {close[0]}?)"
    return f"unknown variable {key} (no setting has a similar name; see .env.example)"


def _leading_newlines(text: str) -> int:
    """Line breaks before the first character that is not blank: python-dotenv numbers a bad
    statement from the blank lines it skipped on the way to it."""
    blank = text[: len(text) - len(text.lstrip())]
    return len(re.findall(r"\r\n|\r|\n", blank))
