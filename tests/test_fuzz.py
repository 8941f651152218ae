"""
Property-based fuzzing of every endpoint with Hypothesis: arbitrary JSON,
arbitrary bytes, "almost valid" requests, SQL injection strings, hostile
encodings and numbers, wrong methods, paths and content types, thrown at a
real chatterd (``tests.harness.Chatterd`` on 127.0.0.1, its store on a fresh
database of the test cluster, Ollama played by ``tests.ollama_emulator``).

How Hypothesis meets trial.  Hypothesis runs a test function synchronously,
but the checks here must ``await`` HTTP calls on the reactor that trial is
running, so a test cannot simply be decorated with ``@given``.  Each test
therefore works in two steps:

1. :func:`draw` runs a throw-away ``@given`` function that only appends each
   generated input to a list, with ``settings(max_examples=N,
   phases=[Phase.generate], database=None, deadline=None)``: Hypothesis's
   generation (its heuristics for boundary values, duplicates, etc.) without
   its example database and without shrinking, which would need the
   properties to be checked inside the synchronous function.
2. The ``async def`` trial test then sends every collected input to chatterd
   and checks the properties for each, in order.  A failure names the exact
   input (not shrunk).

Every answer is checked against a model of the API written from the README
(:meth:`FuzzCase.plan`): its status, its body, and the exact change to the
``chatts`` table and to what reached Ollama.  The properties:

1. the status is 2xx or 4xx, never 3xx or 5xx; no traceback or HTML error
   page; every 4xx body is ``{"error": str}`` with a JSON content type (for
   ``/llmprompt`` that includes Ollama's own errors, passed through);
2. the table changes only for valid requests, and exactly as they say
   (strings stored byte for byte); other rows are untouched;
3. SQL injection strings are stored verbatim and harmlessly, or (NUL) 422;
4. invalid UTF-8, lone surrogates, huge numbers, deep nesting, NaN and
   Infinity, empty bodies, non-objects: a 4xx JSON error;
5. no body ever shows a traceback or the database's DSN.

The bugs found so far (a bare 400 for multipart bodies, an HTML 400 for
non-UTF-8 paths, 308s for double slashes, ``1e999`` sent on as ``Infinity``)
are pinned down by the ``test_regression_*`` tests at the end.  ``TRIED``
counts the inputs each test sent (for docs/reliability.md); nothing is
printed.
"""

from __future__ import annotations

import copy
import email.message
import json
import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import psycopg2
import psycopg2.extensions
import treq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from tests.harness import Chatterd, ChunkedBody
from tests.ollama_emulator import start_emulator
from tests.phone import read_as_phone

#: Inputs sent by each test of this module, by test name (read by whoever
#: updates docs/reliability.md; nothing prints it).
TRIED: dict[str, int] = {}

BANNER = "EECS Reactive chatterd"
MAX_APPID = 155
MAX_USERNAME = 255
MAX_BODY = 1024 * 1024

#: Each route and the methods it answers (werkzeug adds HEAD to GET routes).
ROUTES = {
    "/": {"GET", "HEAD"},
    "/getchatts": {"GET", "HEAD"},
    "/postchatt": {"POST"},
    "/llmchat": {"POST"},
    "/llmprep": {"POST"},
    "/llmprompt": {"POST"},
}
POST_ROUTES = ["/postchatt", "/llmchat", "/llmprep", "/llmprompt"]

#: Rows every test starts with, so that "other rows untouched" means something.
SEEDS = [
    ("seed", "a chatt posted before the fuzzing", None),
    ("user", "an earlier prompt", "seed.app"),
    ("assistant", "an earlier reply", "seed.app"),
    ("system", "rows of an appID that is an injection string", "' OR 1=1 --"),
]

#: Text that appears in a Python traceback or in Twisted's and Klein's HTML error pages.
LEAK_MARKERS = [b"traceback (most recent call last)", b"processing failed", b"<html", b'file "', b"psycopg2"]


SQL_INJECTIONS = [
    "'); DROP TABLE chatts;--",
    "' OR 1=1 --",
    "' OR '1'='1",
    "\\'",
    "\\",
    "''",
    "$$",
    "$$; DROP TABLE chatts; $$",
    "$tag$ x $tag$",
    "%s",
    "%%s",
    "%(appid)s",
    "%(roles)s",
    "%(contents)s::text[]",
    "%",
    "{}",
    "}{",
    '{"a","b"}',
    "ARRAY['x']",
    "NULL",
    "null",
    "'; DELETE FROM chatts WHERE ''='",
    '"; DROP TABLE chatts; --',
    "1; SELECT pg_sleep(10); --",
    "' || (SELECT version()) || '",
    "E'\\x00'",
    "\\x00",
    "\\u0000",
    "/* */ --",
    ";",
    "\u02bc OR 1=1 --",  # a modifier letter apostrophe
    "\uff07 OR 1=1 --",  # a fullwidth apostrophe
    "\x00",
    "x\x00'); DROP TABLE chatts;--",
    "'\x00",
]


# --- drawing inputs with Hypothesis ----------------------------------------------------


def draw(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """
    Up to ``n`` values of ``strategy`` from Hypothesis's generate phase (no
    database, no shrinking); see the module docstring.
    """
    found: list[Any] = []

    @settings(
        max_examples=n,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(strategy)
    def collect(value: Any) -> None:
        found.append(value)

    collect()
    return found


@dataclass
class Case:
    """
    One request to send.
    """

    method: str
    path: str
    body: bytes | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunked: bool = False

    def __repr__(self) -> str:
        body = self.body if self.body is None or len(self.body) <= 400 else self.body[:400] + b"...(%d bytes)" % len(self.body)
        extra = f" headers={self.headers!r}" if self.headers else ""
        extra += " chunked" if self.chunked else ""
        return f"<{self.method} {self.path} body={body!r}{extra}>"


# Text of all of Unicode, lone surrogates included (they reach chatterd as
# JSON escapes such as "\ud800"), plus strings chosen to be awkward.
ANY_CHAR = st.characters(exclude_categories=())
AWKWARD = st.sampled_from([
    "", " ", "\x00", "nul\x00", "\ud800", "a\udfffb", "\udc00\ud800", "é", "e\u0301", "🐍", "\u202e", "\ufeff",
    "\ufffe", "\U0010ffff", "\r\n", "\r", "\t", "null", "NaN", "Infinity", "'", '"', "\\", "\\u0000", "<html>",
    "data: x\n\n", "event: error", "model", "appID", "\x7f", "\x1b[31m",
])
ANY_TEXT = st.one_of(st.text(ANY_CHAR, max_size=24), AWKWARD)
# Text chatterd must store: no NUL, no lone surrogate (category Cs).
CLEAN_CHAR = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
CLEAN_TEXT = st.text(CLEAN_CHAR, max_size=40)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**80), 2**80), FINITE, ANY_TEXT)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(ANY_TEXT, children, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = ["username", "message", "appID", "model", "messages", "role", "content", "stream", "prompt", "options"]
# Objects whose keys are often the ones chatterd reads, with values of any kind.
OBJECTS = st.dictionaries(st.sampled_from(FIELD_NAMES) | ANY_TEXT, JSON | st.lists(JSON, max_size=3), max_size=6)


def near(limit: int) -> st.SearchStrategy[int]:
    return st.integers(limit - 3, limit + 3)


def repeated(sizes: st.SearchStrategy[int]) -> st.SearchStrategy[str]:
    """Strings of a given length in code points, of one-byte or four-byte characters."""
    return st.builds(lambda n, c: c * n, sizes, st.sampled_from(["u", "é", "🐍", " "]))


USERNAMES = st.one_of(CLEAN_TEXT, repeated(near(MAX_USERNAME)))
APPIDS = st.one_of(st.text(CLEAN_CHAR, min_size=1, max_size=30), st.sampled_from(["seed.app", "' OR 1=1 --"]),
                   repeated(near(MAX_APPID)))
ROLES = st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), st.text(CLEAN_CHAR, min_size=1, max_size=20),
                  repeated(near(MAX_USERNAME)))
MESSAGES = st.lists(st.fixed_dictionaries({"role": ROLES, "content": CLEAN_TEXT}), max_size=3)
MODELS = st.one_of(st.sampled_from(["llama3.2", "llama3.2:latest"]), st.text(CLEAN_CHAR, min_size=1, max_size=20))
SMALL_JSON = st.recursive(st.none() | st.booleans() | st.integers() | FINITE | CLEAN_TEXT,
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(CLEAN_TEXT, c, max_size=3), max_leaves=5)
CHAT_EXTRAS = {
    "stream": st.booleans(),
    "options": st.dictionaries(st.sampled_from(["temperature", "seed", "num_ctx"]) | CLEAN_TEXT, SMALL_JSON, max_size=3),
    "keep_alive": st.sampled_from(["5m", 0, "0", -1]),
    "x-extra": JSON,
}
VALID_BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "/postchatt": st.fixed_dictionaries({"username": USERNAMES, "message": CLEAN_TEXT}),
    "/llmchat": st.fixed_dictionaries({"appID": APPIDS, "model": MODELS, "messages": MESSAGES}, optional=CHAT_EXTRAS),
    "/llmprep": st.fixed_dictionaries({"appID": APPIDS, "model": CLEAN_TEXT, "messages": MESSAGES},
                                      optional={"stream": st.booleans()}),
    "/llmprompt": st.fixed_dictionaries({"model": MODELS, "prompt": CLEAN_TEXT}, optional={"stream": st.booleans()}),
}


def to_json(value: Any, ascii_only: bool = True) -> bytes:
    """
    ``value`` as JSON bytes: surrogates as ``\\ud800`` escapes, or (``ascii_only``
    false) as the raw UTF-8 of the code point, which is invalid UTF-8.
    """
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def json_requests(draw_: Any) -> Case:
    """Any JSON value (mostly objects with the API's field names) to any endpoint."""
    path = draw_(st.sampled_from([*ROUTES, *POST_ROUTES, *POST_ROUTES]))
    value = draw_(st.one_of(JSON, OBJECTS, OBJECTS))
    method = next(iter(sorted(ROUTES[path])))
    return Case(method, path + draw_(st.sampled_from(["", "/"])) if path != "/" else path,
                to_json(value, draw_(st.booleans())))


def _slots(body: Any) -> list[tuple[Any, ...]]:
    """The places in a request body that a mutation can change."""
    slots: list[tuple[Any, ...]] = [()]
    for key, value in body.items():
        slots.append((key,))
        if key == "messages":
            for i, m in enumerate(value):
                slots.append((key, i))
                slots.extend((key, i, k) for k in m)
    return slots


@st.composite
def almost_valid(draw_: Any) -> Case:
    """A valid body for a POST route with one place deleted, replaced or added to."""
    path = draw_(st.sampled_from(POST_ROUTES))
    body = copy.deepcopy(draw_(VALID_BODIES[path]))
    slot = draw_(st.sampled_from(_slots(body)))
    op = draw_(st.sampled_from(["delete", "replace", "edge", "add", "duplicate"]))
    replacement = draw_(st.one_of(JSON, AWKWARD, repeated(near(MAX_APPID) | near(MAX_USERNAME)))) if op != "edge" else \
        draw_(st.one_of(AWKWARD, st.sampled_from([None, 0, 1.5, True, [], {}, [""], {"role": "user"}])))
    if not slot:
        if op in ("add", "duplicate"):
            body[draw_(st.sampled_from(FIELD_NAMES) | ANY_TEXT)] = replacement
            raw = to_json(body)
        elif op == "delete":
            raw = b""
        else:
            raw = to_json(replacement)
        return Case("POST", path, raw)
    parent: Any = body
    for step in slot[:-1]:
        parent = parent[step]
    last = slot[-1]
    if op == "delete":
        del parent[last]
    elif op == "add" and isinstance(parent[last], dict):
        parent[last][draw_(st.sampled_from(FIELD_NAMES) | ANY_TEXT)] = replacement
    elif op == "add" and isinstance(parent[last], list):
        parent[last].append(replacement)
    elif op == "duplicate" and len(slot) == 1:
        # the same key twice: JSON parsers keep the last one
        raw = to_json(body)
        return Case("POST", path, raw[:-1] + b", " + to_json(last) + b": " + to_json(replacement) + b"}")
    else:
        parent[last] = replacement
    return Case("POST", path, to_json(body))


@st.composite
def valid_requests(draw_: Any) -> Case:
    """A valid body for a POST route, its strings drawn from all of Unicode but NUL and surrogates."""
    path = draw_(st.sampled_from(["/postchatt", "/postchatt", "/llmchat", "/llmchat", "/llmprep", "/llmprompt"]))
    return Case("POST", path + draw_(st.sampled_from(["", "/"])), to_json(draw_(VALID_BODIES[path]), draw_(st.booleans())))


INJECTED = st.one_of(
    st.sampled_from(SQL_INJECTIONS),
    st.builds(lambda a, b, c: a + b + c, CLEAN_TEXT, st.sampled_from(SQL_INJECTIONS), st.sampled_from(SQL_INJECTIONS)),
)


@st.composite
def injections(draw_: Any) -> Case:
    """SQL injection strings in every string field of a POST route."""
    path = draw_(st.sampled_from(POST_ROUTES))
    s = lambda: draw_(INJECTED)  # noqa: E731
    if path == "/postchatt":
        body: dict[str, Any] = {"username": s(), "message": s()}
    elif path == "/llmprompt":
        body = {"model": draw_(st.sampled_from(["llama3.2", s()])), "prompt": s(), "system": s()}
    else:
        body = {
            "appID": draw_(st.sampled_from(["' OR 1=1 --", "seed.app", s()])),
            "model": draw_(st.sampled_from(["llama3.2", s()])),
            "messages": [{"role": s(), "content": s()} for _ in range(draw_(st.integers(0, 3)))],
        }
        if draw_(st.booleans()):
            body[s()] = s()
    return Case("POST", path, to_json(body))


# --- hostile encodings and numbers ------------------------------------------------------

#: Bodies with a hole ``@`` for a hostile value: in a checked field, or the whole body.
TEMPLATES = [
    ("/postchatt", b'{"username": @, "message": "m"}'),
    ("/postchatt", b'{"username": "u", "message": @}'),
    ("/postchatt", b"@"),
    ("/llmchat", b'{"appID": @, "model": "llama3.2", "messages": []}'),
    ("/llmchat", b'{"appID": "edge.app", "model": @, "messages": []}'),
    ("/llmchat", b'{"appID": "edge.app", "model": "llama3.2", "messages": @}'),
    ("/llmchat", b'{"appID": "edge.app", "model": "llama3.2", "messages": [@]}'),
    ("/llmchat", b'{"appID": "edge.app", "model": "llama3.2", "messages": [{"role": @, "content": "c"}]}'),
    ("/llmchat", b'{"appID": "edge.app", "model": "llama3.2", "messages": [{"role": "user", "content": @}]}'),
    ("/llmchat", b"@"),
    ("/llmprep", b'{"appID": @, "model": "m", "messages": []}'),
    ("/llmprep", b'{"appID": "edge.app", "model": "m", "messages": [{"role": "user", "content": @}]}'),
    ("/llmprep", b'{"appID": "edge.app", "model": @, "messages": []}'),
    ("/llmprep", b"@"),
    ("/llmprompt", b'{"model": @, "prompt": "hi"}'),
    ("/llmprompt", b"@"),
]

# Each of these makes any template a 4xx: as a checked field it is not an
# acceptable string, as the whole body it is not an acceptable JSON object.
# (Deep nesting never goes where chatterd would take it, such as an ignored
# field: whether a body nested 900 deep parses depends on the stack depth.)
_LONE_SURROGATES = st.builds(
    lambda a, s, b: a + s + b, st.text(CLEAN_CHAR, max_size=5), st.characters(categories=["Cs"]), st.text(CLEAN_CHAR, max_size=5)
)
HOSTILE_FLAT = st.one_of(
    # invalid UTF-8 inside a string: stray bytes, overlong forms, CESU surrogates, past U+10FFFF, cut short
    st.builds(lambda a, bad, b: b'"' + a.encode() + bad + b.encode() + b'"', CLEAN_TEXT,
              st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc0\x80", b"\xc1\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
                               b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xf0\x9f\x90"]), CLEAN_TEXT),
    st.binary(min_size=1, max_size=40).filter(lambda b: not _is_utf8(b)),
    # lone surrogates, as JSON escapes and as their (invalid) UTF-8
    _LONE_SURROGATES.map(to_json),
    _LONE_SURROGATES.map(lambda s: to_json(s, ascii_only=False)),
    # NUL
    st.sampled_from([b'"\\u0000"', b'"a\\u0000b"', b'"\\u0000\\u0000"']),
    # huge numbers, NaN and Infinity
    st.sampled_from([b"1e999", b"-1e999", b"1E400", b"9" * 5000, b"-" + b"1" * 4301, b"1" + b"0" * 5000 + b".5",
                     b"0." + b"0" * 5000 + b"1e-999", b"NaN", b"Infinity", b"-Infinity", b"[NaN]", b'{"a": Infinity}']),
    st.integers(min_value=10**20, max_value=10**40).map(lambda n: str(n).encode()),
    # not JSON at all, or cut short
    st.sampled_from([b"", b" ", b"\n\t", b"'single'", b"u", b"{", b'"', b'"\\', b'"\\u12', b'"\\x41"', b"\x00",
                     b'\xef\xbb\xbf"bom"', b"{}" * 2, b"[] []", b"// comment", b"undefined", b"True", b"None"]),
    # JSON, but not a string (where a string is wanted) nor an object (as the whole body)
    st.sampled_from([b"null", b"true", b"0", b"-0", b'["a"]', b"1.5", b"[{}]", b"[[]]"]),
)
NESTING = st.one_of(
    # deep nesting, shallow and deep past any recursion limit, closed or not
    st.sampled_from([b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000, b"[{}" * 50_000,
                     b"[" * 5000 + b"]" * 5000]),
    st.integers(2, 1500).map(lambda n: b"[" * n + b"]" * n),
)
HOSTILE = HOSTILE_FLAT | NESTING


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@st.composite
def hostile_requests(draw_: Any) -> Case:
    """A template with a hostile value in its hole."""
    path, template = draw_(st.sampled_from(TEMPLATES))
    # Ollama would parse /llmprompt's model itself: no nesting a recursion limit might meet there
    values = HOSTILE_FLAT if template.startswith(b'{"model"') else HOSTILE
    value = draw_(values)
    if b"[@]" in template and not value.strip():
        value = b"null"  # "messages": [ ] is a valid empty list
    return Case("POST", path, template.replace(b"@", value))


# --- methods, paths, content types ------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "BREW", "get", "post", "Post"]
CONTENT_TYPES = st.one_of(
    st.sampled_from([
        b"application/json", b"application/json; charset=utf-8", b"application/json; charset=latin-1",
        b"text/plain", b"text/html", b"application/xml", b"application/octet-stream", b"*/*", b"",
        b"application/x-www-form-urlencoded", b"application/x-ndjson", b"text/event-stream", b"multipart/mixed",
        b"image/png", b"application/json; boundary=x", b";;;", b"application/problem+json",
    ]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.encode),
)
SEGMENT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/"), min_size=1, max_size=12)


@st.composite
def paths(draw_: Any) -> str:
    """A route (with or without its trailing slash, or a query), or somewhere no route is."""
    route = draw_(st.sampled_from(list(ROUTES)))
    kind = draw_(st.sampled_from(["route", "slash", "query", "below", "nowhere"]))
    if kind == "route":
        return route
    if kind == "slash":
        return route if route == "/" else route + "/"
    if kind == "query":
        return route + "?" + quote(draw_(ANY_TEXT).encode("utf-8", "surrogatepass"), safe="=&")
    seg = quote(draw_(SEGMENT).encode(), safe="")
    if kind == "below":
        return route.rstrip("/") + "/x" + seg
    return "/nowhere-" + seg


@st.composite
def protocol_requests(draw_: Any) -> Case:
    """Any method, path, content type and body."""
    path = draw_(paths())
    route = path.split("?")[0].rstrip("/") or "/"
    own = sorted(ROUTES.get(route, {"GET"}))[-1]  # the route's own method (GET, not HEAD), in any case
    method = draw_(st.one_of(st.sampled_from([own, own.lower(), own.title()]), st.sampled_from(METHODS)))
    body = draw_(st.one_of(
        st.none(),
        st.just(b""),
        VALID_BODIES[route].map(to_json) if route in VALID_BODIES else JSON.map(to_json),
        JSON.map(to_json),
        st.binary(max_size=64),
    ))
    headers = {}
    if draw_(st.booleans()):
        headers[b"content-type"] = draw_(CONTENT_TYPES)
    if draw_(st.booleans()):
        headers[b"accept"] = draw_(st.sampled_from([b"text/html", b"text/event-stream", b"*/*", b"application/xml"]))
    if draw_(st.integers(0, 9)) == 0:
        headers[b"content-encoding"] = b"gzip"
    return Case(method, path, body, headers, chunked=body is not None and draw_(st.integers(0, 4)) == 0)


# --- known bugs, kept out of the generated tests --------------------------------------


def _content_type(value: bytes) -> str:
    """The media type Twisted reads from a Content-Type (as its ``_parseContentType`` does)."""
    msg = email.message.EmailMessage()
    try:
        msg["content-type"] = value.decode("latin-1")
        return msg.get_content_type()
    except Exception:
        return ""


def outside_model(case: Case) -> str | None:
    """
    Why the model below cannot predict ``case``'s answer, if it cannot
    (such paths are covered by ``test_regression_double_trailing_slash``).
    """
    if "//" in case.path.split("?")[0][1:]:
        return "Twisted reads '//getchatts' as '/getchatts', which the model does not"
    return None


# --- the model of the API -------------------------------------------------------------


class Rejected(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


@dataclass
class Plan:
    """
    What chatterd must do with a request.

    :ivar statuses: the statuses it may answer; empty when Ollama decides.
    :ivar kind: the route that runs, or ``"none"``.
    :ivar value: what the route works on, when the request is valid.
    """

    statuses: set[int]
    kind: str = "none"
    value: Any = None


@dataclass
class Answer:
    """
    One request, chatterd's answer, and the table and Ollama requests around it.
    """

    case: Case
    plan: Plan
    response: Any
    code: int
    raw: bytes
    before: list[tuple[Any, ...]]
    after: list[tuple[Any, ...]]
    posts: list[Any]
    why: str


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def parse(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(422) from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise Rejected(422) from None


def text_field(value: Any, *, required: bool = True, max_length: int | None = None) -> str:
    if not isinstance(value, str) or (required and not value) or "\x00" in value:
        raise Rejected(422)
    if max_length is not None and len(value) > max_length:
        raise Rejected(422)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise Rejected(422)
    return value


def finite(value: Any) -> bool:
    """No float in ``value`` is infinite (``1e999`` parses as ``inf``)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(finite(v) for v in value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    return True


def plan_body(route: str, raw: bytes) -> Plan:
    """
    What a POST route must do with ``raw`` (the README's rules, written independently of chatterd.api).
    """
    obj = parse(raw)
    if not isinstance(obj, dict):
        raise Rejected(422)
    if route == "/postchatt":
        username = text_field(obj.get("username"), required=False)
        message = text_field(obj.get("message"), required=False)
        if len(username) > MAX_USERNAME:
            raise Rejected(400)
        return Plan({200}, "postchatt", (username, message))
    if route == "/llmprompt":
        return Plan(set(), "llmprompt", obj)
    appid = text_field(obj.get("appID"), max_length=MAX_APPID)
    model = text_field(obj.get("model"), required=route == "/llmchat")
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise Rejected(422)
    kept = []
    for m in messages:
        if not isinstance(m, dict):
            raise Rejected(422)
        kept.append((text_field(m.get("role"), max_length=MAX_USERNAME), text_field(m.get("content"), required=False)))
    if route == "/llmprep":
        return Plan({200}, "llmprep", (appid, kept))
    fields = {k: v for k, v in obj.items() if k != "appID"}
    if not finite(fields):
        # passed on to Ollama: an infinite float would go out as ``Infinity``, which is not JSON
        raise Rejected(422)
    return Plan({200}, "llmchat", (appid, model, kept, fields))


def ollama_status(kind: str, body: dict[str, Any], known: Any) -> int:
    """
    The status the emulator answers a chat or generate body with (its
    ``_decode_body`` and ``_validate``): 400 for mistyped fields, 404 or
    400 for a missing model, 404 for an unknown one, else 200.
    """
    for key, want in (("model", str), ("prompt", str), ("messages", list), ("stream", bool)):
        got = body.get(key)
        if got is not None and not isinstance(got, want):
            return 400
    model = body.get("model") or ""
    if not model:
        return 400 if kind == "chat" else 404
    return 200 if known(model) is not None else 404


# --- the tests ------------------------------------------------------------------------


class FuzzCase(TestCase):
    """
    chatterd with its store on a fresh database, seeded with ``SEEDS``, and the emulator as Ollama.
    """

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.emulator = await start_emulator(self)
        self.server = await Chatterd(self, ollama=self.emulator.url).start()
        self.db = psycopg2.connect(self.server.dsn)
        self.db.autocommit = True
        self.addCleanup(self.db.close)
        with self.db.cursor() as cur:
            for row in SEEDS:
                cur.execute("INSERT INTO chatts (username, message, appid) VALUES (%s, %s, %s)", row)
        dsn = psycopg2.extensions.parse_dsn(self.server.dsn)
        self.secrets = [dsn[k].encode().lower() for k in ("dbname", "host") if dsn.get(k) and len(dsn[k]) > 3]
        self.tried = 0

    def tearDown(self) -> None:
        TRIED[self._testMethodName] = self.tried

    # --- looking at the table ---

    def snapshot(self) -> list[tuple[Any, ...]]:
        """Every row as (id, username, message, appid), in insertion order."""
        with self.db.cursor() as cur:
            cur.execute("SELECT id::text, username, message, appid FROM chatts ORDER BY seq")
            return cur.fetchall()

    # --- sending ---

    async def exchange(self, case: Case) -> tuple[Any, bytes]:
        data: Any = case.body
        if case.body is not None and case.chunked:
            data = ChunkedBody([case.body[i:i + 1000] for i in range(0, len(case.body), 1000)])
        response = await self.server.http.request(
            case.method,
            self.server.url + case.path,
            data=data,
            headers=Headers({k: [v] for k, v in case.headers.items()}),
            allow_redirects=False,
        )
        return response, await treq.content(response)

    def plan(self, case: Case) -> Plan:
        """What chatterd must do with ``case``."""
        path = case.path.split("?")[0]
        route = path if path in ROUTES else path[:-1] if path.endswith("/") and path[:-1] in ROUTES else None
        if route is None:
            return Plan({404})
        if case.method.upper() not in ROUTES[route]:
            return Plan({405})
        if route == "/":
            return Plan({200}, "index")
        if route == "/getchatts":
            return Plan({200}, "getchatts")
        if case.body is not None and len(case.body) > self.server.site.max_body:
            return Plan({413})
        try:
            return plan_body(route, case.body or b"")
        except Rejected as e:
            return Plan({e.status})

    async def attempt(self, case: Case) -> None:
        """Send ``case`` and check every property of the answer and of the table."""
        self.tried += 1
        plan = self.plan(case)
        before = self.snapshot()
        sent = len(self.ollama_posts())
        response, raw = await self.exchange(case)
        a = Answer(case, plan, response, response.code, raw, before, self.snapshot(), self.ollama_posts()[sent:],
                   f"{case!r} answered {response.code} {raw[:500]!r}")
        self.assertTrue(200 <= a.code < 300 or 400 <= a.code < 500, a.why)
        if plan.statuses:
            self.assertIn(a.code, plan.statuses, a.why)
        self.assertNoLeaks(a)
        head = case.method.upper() == "HEAD"
        if head:
            self.assertEqual(raw, b"", a.why)
        elif a.code >= 400:
            self.assertJSONError(response, raw, a.why)
        if a.code >= 400 or plan.kind in ("none", "index", "getchatts"):
            self.assertEqual(a.after, a.before, "the table changed: " + a.why)
        may_forward = plan.kind == "llmprompt" or (plan.kind == "llmchat" and a.code == 200)
        self.assertLessEqual(len(a.posts), 1 if may_forward else 0, "Ollama requests: " + a.why)
        if not head and (a.code < 400 or plan.kind == "llmprompt"):
            getattr(self, "check_" + plan.kind)(a)

    def ollama_posts(self) -> list[Any]:
        """The chat and generate requests Ollama received (not the model lists chatterd asks for)."""
        return [r for r in self.emulator.requests if r.method == "POST"]

    # --- properties of every answer ---

    def assertNoLeaks(self, a: Answer) -> None:
        """No traceback, HTML error page or DSN, unless the client sent or stored that text itself."""
        rows = a.before + a.after
        echoed = ((a.case.path.encode() + (a.case.body or b"")).lower() + json.dumps(rows).encode().lower()
                  + repr(rows).encode("utf-8", "surrogatepass").lower())
        body = a.raw.lower()
        for marker in LEAK_MARKERS + self.secrets:
            if marker in body:
                self.assertIn(marker, echoed, f"{marker!r} leaked: " + a.why)

    def assertJSONError(self, response: Any, raw: bytes, why: str) -> None:
        [ctype] = response.headers.getRawHeaders(b"content-type", [b""])
        self.assertTrue(ctype.split(b";")[0].strip() == b"application/json", why)
        try:
            body = json.loads(raw)
        except ValueError:
            self.fail("not JSON: " + why)
        self.assertIsInstance(body, dict, why)
        self.assertEqual(list(body), ["error"], why)
        self.assertIsInstance(body["error"], str, why)

    def assertContentType(self, a: Answer, ctype: bytes) -> None:
        self.assertEqual(a.response.headers.getRawHeaders(b"content-type"), [ctype], a.why)

    # --- properties of each route's answers ---

    def check_index(self, a: Answer) -> None:
        self.assertContentType(a, b"application/json")
        self.assertEqual(json.loads(a.raw), BANNER, a.why)

    def check_getchatts(self, a: Answer) -> None:
        self.assertContentType(a, b"application/json")
        chatts = json.loads(a.raw)
        self.assertEqual([(c[2], c[0], c[1]) for c in chatts], [row[:3] for row in a.after], a.why)

    def check_postchatt(self, a: Answer) -> None:
        self.assertContentType(a, b"application/json")
        self.assertEqual(json.loads(a.raw), {}, a.why)
        self.assertEqual(a.after[:-1], a.before, a.why)
        self.assertEqual(a.after[-1][1:], (*a.plan.value, None), a.why)
        self.assertNotIn(a.after[-1][0], [row[0] for row in a.before], a.why)

    def check_llmprep(self, a: Answer) -> None:
        appid, messages = a.plan.value
        self.assertContentType(a, b"application/json")
        self.assertEqual(json.loads(a.raw), {}, a.why)
        self.assertEqual([r for r in a.after if r[3] != appid], [r for r in a.before if r[3] != appid], a.why)
        self.assertEqual([(r[1], r[2]) for r in a.after if r[3] == appid], messages, a.why)

    def check_llmchat(self, a: Answer) -> None:
        appid, model, messages, fields = a.plan.value
        self.assertContentType(a, b"text/event-stream")
        view = read_as_phone(a.raw)
        self.assertEqual([r for r in a.after if r[3] != appid], [r for r in a.before if r[3] != appid], a.why)
        old = [r for r in a.before if r[3] == appid]
        mine = [r for r in a.after if r[3] == appid]
        self.assertEqual(mine[:len(old)], old, a.why)
        history = [(r[1], r[2]) for r in old] + messages
        expected = {**fields, "messages": [{"role": r, "content": c} for r, c in history]}
        if a.posts:
            self.assertEqual((a.posts[0].path, a.posts[0].json), ("/api/chat", expected), a.why)
        new = [(r[1], r[2]) for r in mine[len(old):]]
        if ollama_status("chat", expected, self.emulator.behaviour_for) == 200:
            reply = "".join(self.emulator.behaviour_for(model).reply) if history else ""
            self.assertEqual(len(a.posts), 1, a.why)
            self.assertEqual(view.errors, [], a.why)
            self.assertEqual(view.bubble, reply, a.why)
            self.assertEqual(new, messages + [("assistant", reply)], a.why)
        else:
            self.assertEqual(len(view.errors), 1, a.why)
            self.assertEqual(new, messages, a.why)

    def check_llmprompt(self, a: Answer) -> None:
        if a.posts:
            self.assertEqual((a.posts[0].path, a.posts[0].body), ("/api/generate", a.case.body), a.why)  # as sent
        if ollama_status("generate", a.plan.value, self.emulator.behaviour_for) == 200:
            self.assertEqual((a.code, len(a.posts)), (200, 1), a.why)
        else:  # Ollama's error passed through, or chatterd's own for a model no server has
            self.assertTrue(400 <= a.code < 500, a.why)
        if a.code == 200:
            self.assertContentType(a, b"application/x-ndjson")
            lines = [json.loads(line) for line in a.raw.splitlines() if line]
            self.assertTrue(lines and all(isinstance(line, dict) and "error" not in line for line in lines), a.why)
            self.assertIs(lines[-1]["done"], True, a.why)

    async def run_all(self, cases: list[Case]) -> None:
        for case in cases:
            self.assertIsNone(outside_model(case), case)
            await self.attempt(case)


class GeneratedTests(FuzzCase):
    async def test_any_json_at_any_endpoint(self) -> None:
        """Any JSON value, to every route, gets the answer and table change the API's rules say."""
        await self.run_all(draw(json_requests(), 300))

    async def test_any_bytes_at_any_endpoint(self) -> None:
        """Arbitrary bytes as the body of every POST route are a 4xx JSON error and change nothing."""
        cases = draw(st.builds(lambda path, body: Case("POST", path, body), st.sampled_from(POST_ROUTES),
                               st.binary(max_size=200) | st.binary(max_size=20).map(lambda b: b'{"' + b)), 200)
        await self.run_all(cases)

    async def test_almost_valid_requests(self) -> None:
        """Valid bodies with one field deleted, retyped or added to: exact status and table change."""
        await self.run_all(draw(almost_valid(), 400))

    async def test_valid_requests_are_stored_verbatim(self) -> None:
        """Valid requests with text from all of Unicode store exactly that text, and /getchatts returns it."""
        cases = draw(valid_requests(), 200)
        await self.run_all(cases + [Case("GET", "/getchatts")])

    async def test_sql_injection_strings(self) -> None:
        """SQL injection strings in every field are stored verbatim (NUL: 422), and other rows stay as they were."""
        await self.run_all(draw(injections(), 200) + [Case("GET", "/getchatts")])
        with self.db.cursor() as cur:
            cur.execute("SELECT to_regclass('public.chatts') IS NOT NULL")
            self.assertEqual(cur.fetchone(), (True,))
        self.assertIn(SEEDS[0], [row[1:] for row in self.snapshot()])  # no request may touch the /postchatt seed

    async def test_hostile_encodings_and_numbers(self) -> None:
        """Invalid UTF-8, lone surrogates, huge numbers, deep nesting, NaN, empty and non-object bodies: 4xx JSON errors."""
        cases = draw(hostile_requests(), 300)
        for case in cases:  # the generator's promise: each of these deserves a 4xx
            plan = self.plan(case)
            statuses = plan.statuses or {ollama_status("generate", plan.value, self.emulator.behaviour_for)}
            self.assertTrue(all(400 <= s < 500 for s in statuses), case)
        await self.run_all(cases)

    async def test_methods_paths_and_content_types(self) -> None:
        """Any method, path, content type and body: 2xx or 4xx JSON, and only valid requests change the table."""
        cases = [c for c in draw(protocol_requests(), 300) if outside_model(c) is None]
        await self.run_all(cases)

    async def test_bodies_around_the_size_limit(self) -> None:
        """Bodies just under, at and over --max-body, sized or chunked: handled, or a 413 that stores nothing."""
        self.server.site.max_body = 2048

        @st.composite
        def sized(draw_: Any) -> Case:
            path = draw_(st.sampled_from(POST_ROUTES))
            raw = to_json(draw_(VALID_BODIES[path]))
            size = draw_(st.one_of(st.integers(2040, 2056), st.integers(len(raw), max(len(raw), 8000))))
            padded = raw + b" " * max(0, size - len(raw))  # trailing whitespace is still the same JSON
            return Case("POST", path, padded, chunked=draw_(st.booleans()))

        await self.run_all(draw(sized(), 100))


class RegressionTests(FuzzCase):
    """
    Bugs the fuzzing found, one small case each.  They fail until fixed.
    """

    async def test_regression_multipart_content_type(self) -> None:
        """
        POST with Content-Type multipart/form-data is read as JSON all the
        same (docs/api.md: Content-Type is not checked): ``200 {}`` and the
        chatt stored, not Twisted's bare 400.
        """
        case = Case("POST", "/postchatt", b'{"username": "u", "message": "m"}', {b"content-type": b"multipart/form-data"})
        self.tried += 1
        before = self.snapshot()
        response, raw = await self.exchange(case)
        self.assertEqual((response.code, raw), (200, b"{}"))
        after = self.snapshot()
        self.assertEqual(after[:-1], before)
        self.assertEqual(after[-1][1:], ("u", "m", None))

    async def test_regression_percent_encoded_non_utf8_path(self) -> None:
        """A path with %-escapes that are not UTF-8 gets a 4xx JSON error and logs no traceback."""
        for path in ("/%ff", "/postchatt%ff", "/getchatts/%ed%a0%80"):
            self.tried += 1
            response, raw = await self.exchange(Case("GET", path))
            logged = self.flushLoggedErrors(UnicodeDecodeError)
            why = f"GET {path} answered {response.code} {response.headers.getRawHeaders(b'content-type')} {raw!r}"
            self.assertTrue(400 <= response.code < 500, why)
            self.assertJSONError(response, raw, why)
            self.assertEqual(logged, [], why)

    async def test_regression_double_trailing_slash(self) -> None:
        """
        A path ending in // is a JSON 404 (docs/api.md), with no redirect,
        and stores nothing.
        """
        before = self.snapshot()
        for method, path in (("GET", "/getchatts//"), ("POST", "/postchatt//"), ("POST", "/llmprep//")):
            self.tried += 1
            response, raw = await self.exchange(Case(method, path, b"{}" if method == "POST" else None))
            why = f"{method} {path} answered {response.code} location={response.headers.getRawHeaders(b'location')} {raw!r}"
            self.assertEqual(response.code, 404, why)
            self.assertJSONError(response, raw, why)
            self.assertEqual(json.loads(raw), {"error": f"Not Found: {method} {path}"}, why)
            self.assertFalse(response.headers.hasHeader(b"location"), why)
        self.assertEqual(self.snapshot(), before)

    async def test_regression_infinity_forwarded_to_ollama(self) -> None:
        """A /llmchat number too big for a float (1e999) is a 422, not stored and not sent to Ollama as Infinity."""
        for extra in (b'"options": {"temperature": 1e999}', b'"keep_alive": -1e999'):
            self.tried += 1
            body = b'{"appID": "inf.app", "model": "llama3.2", "messages": [{"role": "user", "content": "x"}], ' + extra + b"}"
            before, sent = self.snapshot(), len(self.ollama_posts())
            response, raw = await self.exchange(Case("POST", "/llmchat", body))
            why = f"{body!r} answered {response.code} {raw!r}, Ollama got {[r.body for r in self.ollama_posts()[sent:]]}"
            self.assertEqual(response.code, 422, why)
            self.assertEqual(self.snapshot(), before, why)
            self.assertEqual(len(self.ollama_posts()), sent, why)
