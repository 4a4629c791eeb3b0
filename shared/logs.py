"""Logging for both services: structlog and the standard library, one format, no secrets."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from shared.redaction import secret_redactor

__all__ = ["NOISY_LOGGERS", "configure_logging"]

# Libraries that log every connection or request at INFO; kept at WARNING unless DEBUG.
NOISY_LOGGERS = ("websockets.server", "websockets.client", "aiohttp.access", "web3", "urllib3")
FORMATS = ("auto", "json", "console")
# Marks the root handler this module owns, so a second configure_logging() replaces it.
HANDLER_NAME = "kektech"
LEADING_KEYS = ("timestamp", "level", "logger", "event")


def configure_logging(
    level: str,
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    secrets: Iterable[str] = (),
) -> None:
    """Send structlog and stdlib logging to stream as JSON lines or console text, once per run.

    fmt "auto" means console text on a TTY and JSON otherwise (PM2 log files). stream
    defaults to sys.stderr as it is at call time. Each string in secrets (see
    ServiceSettings.log_secrets) is replaced by *** wherever it appears in a log line.
    """
    numeric_level = _level_number(level)
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    out = sys.stderr if stream is None else stream
    as_json = fmt == "json" or (fmt == "auto" and not _is_tty(out))

    # Run for stdlib records only; structlog events get the same steps in configure() below.
    foreign_pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *foreign_pre_chain,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderers: list[Processor] = (
        [_lead_with_common_keys, structlog.processors.JSONRenderer(serializer=_json_line)]
        if as_json
        else [structlog.dev.ConsoleRenderer(colors=_is_tty(out))]
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=foreign_pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Tracebacks become text before redaction so secrets in exception messages go too;
            # plain text also keeps frame locals (which may hold secrets) out of the log.
            structlog.processors.format_exc_info,
            secret_redactor(secrets),
            *renderers,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)
    quiet = (
        logging.NOTSET if numeric_level <= logging.DEBUG else max(logging.WARNING, numeric_level)
    )
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


def _level_number(level: str) -> int:
    """Return the numeric level for a name such as "INFO", or raise ValueError."""
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError("log level must be DEBUG, INFO, WARNING or ERROR")
    return number


def _is_tty(stream: TextIO) -> bool:
    """Return whether stream is an open terminal."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or already closed
        return False


def _lead_with_common_keys(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Put timestamp, level, logger and event first, so JSON lines stay readable by eye."""
    ordered = {key: event_dict.pop(key) for key in LEADING_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


def _json_line(event_dict: Any, **kwargs: Any) -> str:
    """Serialize an event with orjson, falling back to json for what orjson refuses."""
    try:
        return orjson.dumps(
            event_dict, default=kwargs.get("default"), option=orjson.OPT_NON_STR_KEYS
        ).decode()
    except orjson.JSONEncodeError:
        # orjson rejects integers wider than 64 bits, and uint256 amounts often are.
        return json.dumps(event_dict, ensure_ascii=False, separators=(",", ":"), **kwargs)
