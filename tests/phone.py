"""
An SSE reader that follows the llmChat phone app's rules (spec, section 6) and
fails on anything the app would choke on.

The app ends a line at ``\\n`` or ``\\r\\n`` (a lone ``\\r`` is not a line end),
indexes ``split(":")[1]`` on every non-empty line unguarded (so a line without
``:`` crashes it), treats a blank line as the end of an event, switches to
error mode on ``event: error``, and decodes every normal ``data:`` as an
Ollama chat chunk ``{model, message: {role, content}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class AppWouldChoke(AssertionError):
    """
    The stream holds something the phone app cannot handle.
    """


@dataclass
class PhoneView:
    """
    What the app shows for one stream.
    """

    bubble: str = ""
    errors: list[str] = field(default_factory=list)
    chunks: list[dict] = field(default_factory=list)
    comments: int = 0


def read_as_phone(stream: bytes) -> PhoneView:
    """
    Read a whole SSE stream as the app does.

    :raises AppWouldChoke: on a line without ``:``, a lone ``\\r``, a normal
        ``data:`` that is not a chat chunk, an unknown event, or a stream that
        does not end with a finished event.
    """
    try:
        text = stream.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AppWouldChoke(f"not UTF-8: {e}") from None
    if "\r" in text.replace("\r\n", ""):
        raise AppWouldChoke("a lone \\r: the app would not end the line there")
    if text and not text.endswith("\n\n"):
        raise AppWouldChoke(f"the stream does not end with a blank line: {text[-40:]!r}")
    view = PhoneView()
    event, error = "", ""
    for line in text.replace("\r\n", "\n").split("\n")[:-1]:
        if line == "":
            if event == "error":
                view.errors.append(error)
                view.bubble += f"\n\n**llmChat Error**: {error}\n\n"
            event, error = "", ""
            continue
        if ":" not in line:
            raise AppWouldChoke(f"a line without ':' crashes the app: {line!r}")
        name, value = line.split(":", 1)
        value = value.strip()
        if name == "":
            view.comments += 1
        elif name == "event":
            if value not in ("", "message", "error"):
                raise AppWouldChoke(f"unknown event {value!r}")
            event = value
        elif name == "data":
            if event == "error":
                error += value
                continue
            try:
                chunk = json.loads(value)
            except ValueError:
                raise AppWouldChoke(f"data is not JSON: {value[:80]!r}") from None
            message = chunk.get("message") if isinstance(chunk, dict) else None
            if not (isinstance(chunk.get("model"), str) and isinstance(message, dict)
                    and isinstance(message.get("role"), str)
                    and isinstance(message.get("content", ""), (str, type(None)))):
                raise AppWouldChoke(f"data is not an Ollama chat chunk: {value[:80]!r}")
            view.chunks.append(chunk)
            view.bubble += message.get("content") or ""
        else:
            raise AppWouldChoke(f"unexpected field {name!r}")
    return view
