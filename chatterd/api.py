# -*- test-case-name: tests.test_api -*-
"""
The request bodies chatterd accepts, parsed and validated: pure functions.

Everything a client sends is checked here before anything is stored or sent
on.  A bad body raises :class:`ClientError`, which the HTTP layer turns into
a 4xx answer with a JSON ``{"error": ...}`` body.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from chatterd.store import Message

#: Column limits of ``chatts`` (``appid varchar(155)``, ``username varchar(255)``).
MAX_APPID = 155
MAX_USERNAME = 255


class ClientError(Exception):
    """
    The client sent something chatterd will not take.

    :ivar status: the HTTP status to answer with.
    :ivar message: what was wrong, in words meant for the app's developer.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    """
    A JSON number as a float, refusing those too big for one (``1e999``
    would otherwise become ``inf`` and go on as ``Infinity``, not JSON).
    """
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:20]} is too large")
    return value


def parse_json(body: bytes) -> Any:
    """
    Decode a request body: strict UTF-8 and strict JSON (no ``NaN``).

    :raises ClientError: 422 naming the problem.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClientError(422, f"the body is not UTF-8: {e.reason} at byte {e.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError:
        raise ClientError(422, "the body is not acceptable JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints longer than Python allows
        raise ClientError(422, f"the body is not JSON: {e}") from None


def _text(value: Any, what: str, *, max_length: int | None = None, required: bool = True) -> str:
    """
    Check that ``value`` is a string PostgreSQL can store.
    """
    if not isinstance(value, str):
        kind = "missing" if value is None else f"{_json_kind(value)}, not a string"
        raise ClientError(422, f"{what} is {kind}")
    if required and not value:
        raise ClientError(422, f"{what} is empty")
    if max_length is not None and len(value) > max_length:
        raise ClientError(422, f"{what} is longer than {max_length} characters")
    if "\x00" in value:
        raise ClientError(422, f"{what} contains a NUL character (\\u0000), which cannot be stored")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ClientError(422, f"{what} contains an unpaired surrogate (\\ud800-\\udfff)") from None
    return value


def _json_kind(value: Any) -> str:
    """
    What a decoded JSON value is, in JSON's words: "a number", "an array", ...
    """
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "null")


def _object(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ClientError(422, f"the body must be a JSON object, not {_json_kind(obj)}")
    return obj


@dataclass(frozen=True)
class ChatRequest:
    """
    A validated ``/llmchat`` or ``/llmprep`` request.

    :ivar appid: the app's conversation key.
    :ivar messages: the new messages, as ``{"role", "content"}`` dicts.
    :ivar fields: every other key of the request, passed to Ollama untouched.
    """

    appid: str
    model: str
    messages: list[Message]
    fields: dict[str, Any]

    def ollama_body(self, history: list[Message]) -> bytes:
        """
        The body for Ollama's ``/api/chat``: the request without ``appID``, with
        ``messages`` replaced by the whole stored history.
        """
        return json.dumps({**self.fields, "messages": history}, separators=(",", ":"), allow_nan=False).encode()


def parse_chat(body: bytes, *, need_model: bool = True) -> ChatRequest:
    """
    Validate an ``/llmchat`` or ``/llmprep`` body.

    :param need_model: reject an empty ``model`` (``/llmchat`` sends it to
        Ollama; ``/llmprep`` only stores messages, so any string will do).
    :raises ClientError: 422 naming the problem.
    """
    obj = _object(parse_json(body))
    appid = _text(obj.get("appID"), "appID", max_length=MAX_APPID)
    model = _text(obj.get("model"), "model", required=need_model)
    raw = obj.get("messages")
    if not isinstance(raw, list):
        raise ClientError(422, "messages must be a list of {role, content} objects")
    messages: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ClientError(422, f"messages[{i}] must be an object with role and content")
        role = _text(m.get("role"), f"messages[{i}].role", max_length=MAX_USERNAME)
        content = _text(m.get("content"), f"messages[{i}].content", required=False)
        messages.append({"role": role, "content": content})
    fields = {k: v for k, v in obj.items() if k != "appID"}
    return ChatRequest(appid=appid, model=model, messages=messages, fields=fields)


def parse_chatt(body: bytes) -> tuple[str, str]:
    """
    Validate a ``/postchatt`` body: ``{"username": str, "message": str}``.

    :returns: ``(username, message)``.
    :raises ClientError: 422 for a missing or mistyped field, 400 for a
        username longer than the column holds (the course's convention).
    """
    obj = _object(parse_json(body))
    username = _text(obj.get("username"), "username", required=False)
    message = _text(obj.get("message"), "message", required=False)
    if len(username) > MAX_USERNAME:
        raise ClientError(400, f"username is longer than {MAX_USERNAME} characters")
    return username, message


def parse_generate(body: bytes) -> tuple[str | None, bytes]:
    """
    Check that an ``/llmprompt`` body is a JSON object; it goes to Ollama as
    sent (Ollama itself answers for a missing or unknown model).

    :returns: ``(model, body)``; model is ``None`` unless a string.
    :raises ClientError: 422 if it is not an object.
    """
    model = _object(parse_json(body)).get("model")
    return (model if isinstance(model, str) else None), body
