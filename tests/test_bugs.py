"""log_bug: a bug's type and frames are logged, never the exception's text."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure

from smimeproxy.bugs import log_bug

SECRET = "Subject: quarterly numbers -- the plaintext body"


def _parse_header() -> None:
    raise ValueError(f"cannot parse {SECRET!r}")


def _logger() -> tuple[Logger, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    return Logger(namespace="t", observer=events.append), events


def test_handled_exception_logged_without_its_text() -> None:
    log, events = _logger()
    try:
        _parse_header()
    except ValueError:
        log_bug(log, "smtp.open_failed queue_id={queue_id}", queue_id="Q1")
    [event] = events
    text = formatEvent(event)
    assert event["log_level"] == LogLevel.error
    assert "queue_id=Q1" in text and "error=ValueError" in text
    assert "test_bugs.py" in text and "_parse_header" in text
    assert "quarterly" not in text
    assert "quarterly" not in repr(event)


def test_failure_logged_without_its_text() -> None:
    log, events = _logger()
    try:
        _parse_header()
    except ValueError:
        failure = Failure()
    log_bug(log, "imap.intercept.failed", failure)
    [event] = events
    text = formatEvent(event)
    assert text.startswith("imap.intercept.failed error=ValueError where=test_bugs.py:")
    assert "_parse_header" in text
    assert "quarterly" not in repr(event)
