"""Removal of secrets from log events: URL passwords, token query values, sensitive keys."""

from __future__ import annotations

import datetime
import functools
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "REDACTED",
    "Writer",
    "known_secrets",
    "redact_secrets",
    "redact_text",
    "redact_value",
    "secret_redactor",
]

REDACTED = "***"

# A password may contain an unescaped "@" or "/" (base64 passwords do), so the match runs to
# the last "@" before whitespace: over-redacting a URL beats leaking half a password.
_URL_PASSWORD = re.compile(r"\b(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*):\S*@")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:key|api_?key|api-key|token|access_token|refresh_token|id_token|secret"
    r"|client_secret|password|passwd|pwd|sig|signature|auth)=)[^&;#\s'\"]*",
    re.IGNORECASE,
)
_SENSITIVE_KEY = re.compile(
    r"password|secret|token|api[-_]?key|authorization|service_role", re.IGNORECASE
)
# Values of these types cannot hold a secret, and renderers format them natively.
_PLAIN_TYPES = (int, float, bool, type(None), datetime.date, datetime.time, datetime.timedelta)


def redact_text(text: str, known: re.Pattern[str] | None = None) -> str:
    """Return text with URL passwords, secret query values and known secrets replaced by ***."""
    if known is not None:
        text = known.sub(REDACTED, text)
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\g<head>:{REDACTED}@", text)
    if "=" in text:
        text = _QUERY_SECRET.sub(rf"\g<head>{REDACTED}", text)
    return text


def redact_value(value: object, known: re.Pattern[str] | None = None) -> object:
    """Return value with secrets redacted in every string, recursively through containers."""
    if isinstance(value, str):
        return redact_text(value, known)
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _is_sensitive_key(key) else redact_value(item, known)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_value(item, known) for item in value]
    if isinstance(value, tuple):
        return tuple(redact_value(item, known) for item in value)
    # Exceptions, URL objects and the like are rendered through repr(); check that text.
    shown = repr(value)
    cleaned = redact_text(shown, known)
    return value if cleaned == shown else cleaned


def redact_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Structlog processor: redact credentials, token query values and sensitive keys."""
    return _redact_event(event_dict, None)


def known_secrets(secrets: Iterable[str]) -> re.Pattern[str] | None:
    """One pattern matching every secret string (longest first), or None if there is none."""
    return _known_pattern(tuple(sorted({s for s in secrets if s}, key=len, reverse=True)))


@functools.cache
def _known_pattern(ordered: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None


class Writer:
    """Prints lines for people (command output) with every given secret and URL credential
    replaced by ***, as the logs do."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._known = known_secrets(secrets)

    def say(self, line: str, *, stream: TextIO | None = None) -> None:
        print(redact_text(line, self._known), file=stream or sys.stdout, flush=True)


def secret_redactor(secrets: Iterable[str]) -> Processor:
    """Return a processor like redact_secrets that also replaces each given secret string."""
    known = known_secrets(secrets)
    if known is None:
        return redact_secrets

    def redact_known_secrets(
        logger: WrappedLogger, method_name: str, event_dict: EventDict
    ) -> EventDict:
        return _redact_event(event_dict, known)

    return redact_known_secrets


def _redact_event(event_dict: EventDict, known: re.Pattern[str] | None) -> EventDict:
    """Redact an event dict in place (processors own the dict they are given) and return it."""
    for key, value in event_dict.items():
        event_dict[key] = REDACTED if _is_sensitive_key(key) else redact_value(value, known)
    return event_dict


def _is_sensitive_key(key: Any) -> bool:
    """Return whether a key's name says its value is a credential."""
    return isinstance(key, str) and _SENSITIVE_KEY.search(key) is not None
