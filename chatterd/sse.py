# -*- test-case-name: tests.test_sse -*-
"""
Server-Sent Events framing and NDJSON splitting: pure functions, no I/O.

The llmChat phone apps parse SSE with a few hard rules (see the spec, section 6):
lines end in ``\\n``, every non-empty line holds a ``:``, a blank line ends an
event, and an ``event: error`` line switches the next ``data:`` to error mode.
Everything written to a phone goes through this module, so those rules hold by
construction.
"""

from __future__ import annotations

import json

#: The SSE comment sent while nothing else is written (proxies and phones then
#: keep the stream open).  A comment line starts with ``:`` and is ignored.
HEARTBEAT = b": ping\n\n"


def data_frame(line: bytes) -> bytes:
    """
    Frame one NDJSON line from Ollama as an unnamed SSE event, unchanged.

    :param line: one line as Ollama sent it, without its line terminator.
        It must not contain ``\\n`` or ``\\r`` (JSON text never does).
    """
    return b"data: " + line + b"\n\n"


def error_frame(message: str) -> bytes:
    """
    Frame an in-band error: ``event: error`` then ``data: {"error": ...}``.

    ``json.dumps`` escapes every control character, so the data stays on one line.
    """
    payload = json.dumps({"error": message})
    return b"event: error\ndata: " + payload.encode("utf-8") + b"\n\n"


class LineTooLong(ValueError):
    """
    A line exceeded the splitter's limit.
    """


class LineSplitter:
    """
    Split a byte stream into lines, keeping a partial line until its end arrives.

    Ollama terminates each NDJSON object with ``\\n``; proxies may re-chunk the
    stream, so one read can hold half a line or several lines.  A trailing
    ``\\r`` is stripped and blank lines are dropped.

    :param max_line: the longest line accepted, in bytes.  A longer one raises
        :class:`LineTooLong` rather than growing the buffer without bound.
    """

    __slots__ = ("_partial", "_max_line")

    def __init__(self, max_line: int = 4 * 1024 * 1024) -> None:
        self._partial = b""
        self._max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        """
        Add ``data`` and return the complete, non-blank lines it finishes.

        :raises LineTooLong: if a line is longer than ``max_line``.
        """
        if not self._partial and data.find(b"\n") == len(data) - 1 < self._max_line:
            # the usual read: exactly one whole line (Ollama writes one per chunk)
            line = data[:-1].rstrip(b"\r")
            return [line] if line.strip() else []
        if self._partial:
            data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if len(data) > self._max_line:
            self._check(lines)
        return [line.rstrip(b"\r") for line in lines if line.strip()]

    def flush(self) -> bytes:
        """
        Return and forget the unterminated remainder: the last line of a body
        that did not end in ``\\n``, as Ollama's ``stream: false`` answers.
        """
        rest, self._partial = self._partial.rstrip(b"\r"), b""
        return rest if rest.strip() else b""

    def _check(self, lines: list[bytes]) -> None:
        if any(len(line) > self._max_line for line in [*lines, self._partial]):
            self._partial = b""
            raise LineTooLong(f"Ollama sent a line longer than {self._max_line} bytes")
