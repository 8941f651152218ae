"""
Reading chatterd's profiles (``python -m bench --profile cprofile|py-spy``).

Both summaries charge *self* time: to functions, and to activities (parsing
Ollama's response, JSON, HTTP/2, the reactor, ...) by the file and name of the
innermost frame.  cProfile counts every call but inflates small ones several
times over; py-spy samples (1 kHz) without slowing chatterd, so its
percentages are the ones to trust.
"""

from __future__ import annotations

import pstats
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.env import Env

Rule = Callable[[str, str], bool]

#: Activities, first match wins: (label, test on (function name, file path)).
ACTIVITIES: list[tuple[str, Rule]] = [
    ("epoll_wait (idle, or the poll itself)", lambda n, w: n in ("EPollReactor.doPoll", "doPoll")
     or "method 'poll' of 'select.epoll'" in n),
    ("recv system call", lambda n, w: n in ("Connection.doRead", "doRead") and "internet/tcp.py" in w),
    ("send system call", lambda n, w: n == "untilConcludes" or "method 'send' of '_socket" in n),
    ("HTTP/2 (twisted.web._http2, h2, hpack, hyperframe, priority)",
     lambda n, w: "_http2" in w or any(f"/{p}/" in w for p in ("h2", "hpack", "hyperframe", "priority"))),
    ("TLS (pyOpenSSL, twisted.protocols.tls)",
     lambda n, w: "OpenSSL" in w or "SSL_" in n or "protocols/tls.py" in w or "_newtls" in w),
    ("Ollama's response: twisted.web client and chunked decoding",
     lambda n, w: "web/_newclient.py" in w or "_ChunkedTransferDecoder" in n or "_dataReceived_" in n
     or "web/_abnf.py" in w or "protocols/basic.py" in w),
    ("JSON decoding of Ollama's lines", lambda n, w: "/json/" in w),
    ("chatterd's own code", lambda n, w: "/chatterd/" in w),
    ("writing to the phone: Request.write and the transport",
     lambda n, w: ("web/server.py" in w and "write" in n) or ("web/http.py" in w and (
         "write" in n.lower() or "toChunk" in n)) or "internet/abstract.py" in w
     or ("internet/tcp.py" in w and "write" in n.lower())),
    ("per request: request parsing, Content-Type via email, klein, treq/Agent/hyperlink/idna",
     lambda n, w: any(f"/{p}/" in w for p in ("email", "hyperlink", "idna", "klein", "werkzeug", "treq",
                                              "routing", "http"))
     or "web/http.py" in w or "web/client.py" in w or "http_headers" in w),
    ("database (txpostgres, psycopg2)", lambda n, w: "txpostgres" in w or "psycopg2" in n or "psycopg2" in w),
    ("reactor, Deferreds, log context", lambda n, w: any(f"twisted/{p}/" in w for p in ("internet", "python",
                                                                                      "logger"))),
]


def activity(name: str, where: str) -> str:
    where = "/" + where  # py-spy names files relative to site-packages
    for label, rule in ACTIVITIES:
        if rule(name, where):
            return label
    return "other"


def _table(shares: Counter[str], total: float, per: float, unit: str, top: int) -> list[str]:
    return [f"{n / total:6.1%}  {n / per:8.2f} {unit}  {label}" for label, n in shares.most_common(top)]


def pyspy_summary(path: Path, top: int = 40) -> str:
    """Self and inclusive shares of samples per function and per activity (py-spy raw output)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    acts: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        names = [_frame_name(f) for f in frames]
        own[names[-1]] += n
        for name in set(names):
            incl[name] += n
        name, _, where = frames[-1].partition(" (")
        acts[activity(name, where)] += n
    if not total:
        return "(no samples)"
    lines = [f"{total} samples (py-spy counts a thread blocked in epoll_wait as busy at times: "
             "read the epoll line as an upper bound)", "", "by activity (self time):", ""]
    lines += [f"{n / total:6.1%}  {label}" for label, n in acts.most_common()]
    lines += ["", "by function:", "", "self %   incl %   function"]
    lines += [f"{n / total:6.1%}  {incl[name] / total:6.1%}   {name}" for name, n in own.most_common(top)]
    return "\n".join(lines)


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (to/file.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(where.split('/')[-2:])})"


def cprofile_summary(path: Path, frames: int, top: int = 35) -> str:
    """Self time per activity and per function, as % of busy time (epoll waits left out) and µs/frame."""
    stats = pstats.Stats(str(path))
    rows = []
    idle = 0.0
    for (file, line, name), (_, ncalls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if name == "<method 'poll' of 'select.epoll' objects>":
            idle += tottime
            continue
        rows.append((tottime, ncalls, f"{name} ({'/'.join(file.split('/')[-2:])}:{line})", name, file))
    busy = sum(r[0] for r in rows) or 1e-9
    acts: Counter[str] = Counter()
    for tottime, _, _, name, file in rows:
        acts[activity(name, file)] += tottime
    lines = [f"busy {busy:.2f} s (+ {idle:.2f} s waiting in epoll), {busy / frames * 1e6:.1f} µs per relayed "
             "frame (cProfile inflates small calls several times over)", "", "by activity (self time):", ""]
    lines += _table(acts, busy, frames / 1e6, "µs/frame", 20)
    lines += ["", "by function (self time):", "", "    %   µs/frame    calls  function"]
    for tottime, ncalls, label, _, _ in sorted(rows, reverse=True)[:top]:
        lines.append(f"{tottime / busy:6.1%}  {tottime / frames * 1e6:7.2f}  {ncalls:8d}  {label}")
    return "\n".join(lines)


def profile_report(env: Env, profiler: str) -> str:
    """The summaries of every profile a run wrote (one per chatterd process)."""
    frames = max(env.frames_relayed, 1)
    out = [f"## Profile ({profiler}); {env.frames_relayed:,} frames relayed by chatterd in total", ""]
    if profiler == "cprofile":
        for path in sorted(env.work.glob("*.pstats")):
            out += [f"### {path.name}", "", "```", cprofile_summary(path, frames), "```", ""]
    else:
        for path in sorted(env.work.glob("*.pyspy.txt")):
            out += [f"### {path.name}", "", "```", pyspy_summary(path), "```", ""]
    return "\n".join(out)
