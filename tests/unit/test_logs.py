"""Tests of shared.logs: one format for structlog and stdlib records, no secrets, idempotent."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest
import structlog

from shared.logs import HANDLER_NAME, NOISY_LOGGERS, configure_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo configure_logging's global changes so other tests see logging as pytest left it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy_levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    structlog_config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, noisy_level in noisy_levels.items():
        logging.getLogger(name).setLevel(noisy_level)
    structlog.configure(**structlog_config)


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    """Parse every line written to stream as one JSON object."""
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_and_stdlib_share_the_json_format() -> None:
    """Both structlog events and stdlib records come out as JSON lines with the same keys."""
    out = io.StringIO()
    configure_logging("INFO", fmt="json", stream=out)
    structlog.get_logger("indexer.chain").info("batch indexed", blocks=10)
    logging.getLogger("asyncpg").warning("pool %s closed", "main")
    first, second = json_lines(out)
    assert first["event"] == "batch indexed"
    assert first["blocks"] == 10
    assert (first["level"], first["logger"]) == ("info", "indexer.chain")
    assert (second["event"], second["level"], second["logger"]) == (
        "pool main closed",
        "warning",
        "asyncpg",
    )
    for line in (first, second):
        assert str(line["timestamp"]).endswith("Z")


def test_json_lines_carry_no_secrets() -> None:
    """Passwords in URLs never reach the output, from structlog or from stdlib loggers."""
    out = io.StringIO()
    configure_logging("INFO", fmt="json", stream=out)
    structlog.get_logger().info("connecting", dsn="postgresql://u:pw@h/db", password="pw")
    logging.getLogger("asyncpg").warning("dsn %s", "postgresql://u:pw@h/db")
    text = out.getvalue()
    assert len(json_lines(out)) == 2
    assert "pw" not in text
    assert "postgresql://u:***@h/db" in text


def test_known_secrets_are_redacted() -> None:
    """Strings passed as secrets are replaced wherever they appear, e.g. a key in a URL path."""
    out = io.StringIO()
    configure_logging("INFO", fmt="json", stream=out, secrets=["key-0123456789abcdef"])
    logging.getLogger("web3").error("HTTP 429 from https://rpc.example/v2/key-0123456789abcdef")
    assert "key-0123456789abcdef" not in out.getvalue()


def test_tracebacks_are_redacted() -> None:
    """An exception message with a password is redacted inside the rendered traceback."""
    out = io.StringIO()
    configure_logging("INFO", fmt="json", stream=out)
    try:
        raise ConnectionError("cannot reach redis://:pw@cache:6379")
    except ConnectionError:
        structlog.get_logger().exception("redis down")
        logging.getLogger("redis").exception("redis down")
    lines = json_lines(out)
    assert len(lines) == 2
    for line in lines:
        assert "redis://:***@cache:6379" in str(line["exception"])
    assert ":pw@" not in out.getvalue()


def test_json_handles_uint256_values() -> None:
    """Integers wider than 64 bits (uint256 amounts) are logged, not dropped."""
    out = io.StringIO()
    configure_logging("INFO", fmt="json", stream=out)
    structlog.get_logger().info("bet", amount=2**200)
    assert json_lines(out)[0]["amount"] == 2**200


def test_level_filters_both_sources() -> None:
    """Below LOG_LEVEL nothing is written, from structlog or stdlib."""
    out = io.StringIO()
    configure_logging("WARNING", fmt="json", stream=out)
    structlog.get_logger().info("hidden")
    logging.getLogger("asyncpg").info("hidden")
    structlog.get_logger().warning("shown")
    assert [line["event"] for line in json_lines(out)] == ["shown"]


def test_noisy_libraries_are_quiet_unless_debug() -> None:
    """websockets.server INFO lines are dropped at INFO and kept at DEBUG."""
    out = io.StringIO()
    configure_logging("INFO", fmt="json", stream=out)
    logging.getLogger("websockets.server").info("connection open")
    assert out.getvalue() == ""
    configure_logging("DEBUG", fmt="json", stream=out)
    logging.getLogger("websockets.server").info("connection open")
    assert [line["event"] for line in json_lines(out)] == ["connection open"]


def test_configuring_twice_keeps_one_handler() -> None:
    """A second configure_logging replaces its handler instead of adding another."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", fmt="json", stream=first)
    configure_logging("INFO", fmt="json", stream=second)
    ours = [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]
    assert len(ours) == 1
    logging.getLogger("asyncpg").warning("once")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


def test_auto_format_is_json_when_not_a_tty() -> None:
    """fmt="auto" writes JSON to a stream that is not a terminal (PM2 log files)."""
    out = io.StringIO()
    configure_logging("INFO", fmt="auto", stream=out)
    structlog.get_logger().info("started")
    assert json_lines(out)[0]["event"] == "started"


def test_console_format_is_readable_text() -> None:
    """fmt="console" writes one uncoloured text line (no JSON), still redacted."""
    out = io.StringIO()
    configure_logging("INFO", fmt="console", stream=out)
    structlog.get_logger("broadcaster").info("listening", url="redis://:pw@cache:6379")
    line = out.getvalue()
    assert not line.startswith("{")
    assert "listening" in line
    assert "redis://:***@cache:6379" in line
    assert "\x1b[" not in line


@pytest.mark.parametrize(("level", "fmt"), [("LOUD", "json"), ("INFO", "xml")])
def test_bad_arguments_are_rejected(level: str, fmt: str) -> None:
    """An unknown level or format raises ValueError before anything is changed."""
    with pytest.raises(ValueError, match="must be"):
        configure_logging(level, fmt=fmt, stream=io.StringIO())
