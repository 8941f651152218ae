# -*- test-case-name: tests.test_logs -*-
"""
chatterd's logging: a ``Logger`` whose lines cannot be forged, and JSON output.

**Neutralised fields** (CWE-117).  Much of what chatterd logs came from a
client or from Ollama: paths, appIDs, model names, error texts.  A newline in
one would forge a second log line, an ANSI escape would rewrite an operator's
terminal, and a lone surrogate cannot be encoded at all (the observer then
raises, and the line is lost).  :func:`escape` makes any text safe for one
log line, and :class:`Logger` applies it to every string (and exception)
field of every event, so no call site can forget it.  The text of a log line
is then one line, whatever a client sent.

**JSON** (``--log-format json``).  Every event becomes ``{"time", "level",
"namespace", "message", ...}`` plus its structured fields (an access line's
method, path, status, length and duration_ms; a stream's appid, model,
frames, bytes, outcome, ...).
"""

from __future__ import annotations

import datetime
import io
import json
import re
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, LogLevel, formatEvent

from twisted import logger as _logger

#: What a log line must not carry as it is: C0 and C1 controls (newlines,
#: ESC for ANSI sequences, the 8-bit CSI), DEL, Unicode line and paragraph
#: separators, bidirectional overrides (they reorder what a terminal shows),
#: lone surrogates (they cannot be encoded), and the backslash itself, so
#: that an escape in the log always means chatterd wrote it.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_one(match: re.Match[str]) -> str:
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """
    ``text`` made safe for one log line: every character in :data:`_UNSAFE`
    becomes a Python-style escape (``\\n``, ``\\x1b``, ``\\ud800``, ``\\\\``).
    Text without any is returned as it is (the common case costs one search).
    """
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape_one, text)


def _neutral(value: Any) -> Any:
    """
    A field's value as it may go into a log event: strings escaped,
    exceptions (whose text often quotes a client or Ollama) as escaped text.
    """
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, BaseException):
        return escape(str(value) or type(value).__name__)
    return value


class Logger(_logger.Logger):
    """
    Twisted's ``Logger``, with every string and exception field escaped
    (:func:`escape`) before the event is emitted.  Format strings are the
    code's own and are left alone; so is ``log_failure`` (its traceback is
    the code's, and observers print it on lines of their own).
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            if isinstance(value, (str, BaseException)) and not key.startswith("log_"):
                kwargs[key] = _neutral(value)
        super().emit(level, format, **kwargs)

#: Keys of legacy ``twisted.python.log`` events that are not fields.
_LEGACY = frozenset(["message", "isError", "system", "format", "why", "failure", "time"])


def format_json(event: dict[str, Any]) -> str:
    """
    One log event as one line of JSON.
    """
    when = datetime.datetime.fromtimestamp(event.get("log_time", 0), datetime.timezone.utc)
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace") or event.get("system", "-"),
        "message": escape(formatEvent(event)),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in _LEGACY and key not in record:
            record[key] = _neutral(value) if _plain(value) else escape(str(value))
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record) + "\n"


def _plain(value: Any) -> bool:
    """
    Whether ``value`` can go into the JSON record as it is.
    """
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def never_fail_to_encode(stream: Any) -> None:
    """
    Make a text stream write what it cannot encode as escapes instead of
    raising: a lone surrogate in a line that did not come through
    :class:`Logger` (Twisted's own, say) must not make the observer fail and
    the line be lost.
    """
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(errors="backslashreplace")


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """
    A log observer writing JSON lines to ``out`` (standard output by default).
    """
    return FileLogObserver(out or sys.stdout, format_json)


def info_line(logger: Logger, text: str, **fields: Any) -> None:
    """
    Log ``text``, already formatted, with ``fields`` kept as the event's
    structured fields (for ``--log-format json``).

    For the lines logged per request: the logger's own ``{field}``
    formatting runs in Python, about 25 µs a line; an f-string is about 1.
    ``text`` is escaped as a whole (it holds what clients sent), and so are
    the fields (by :class:`Logger`).
    """
    logger.info(escape(text).replace("{", "{{").replace("}", "}}"), **fields)
