"""
The scenarios (a)–(f): each round runs the direct path (the load generator
talking straight to the emulator's ``/api/chat``) and chatterd back to back,
in alternating order, and records per-round figures for both.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.env import Env
from bench.loadgen import Spec
from bench.report import Results, Round, Row, Target, pct

Result = dict[str, Any]

TITLES = {
    "a": "one stream of 200 frames, no delay",
    "b": "50 concurrent streams of 200 frames, no delay",
    "c": "200 concurrent streams at a 15 ms cadence",
    "d": "most concurrent 15 ms-cadence streams held",
    "e": "HTTP/2 over TLS, streams multiplexed over a few connections",
    "f": "a new TLS connection per request",
    "g": "the database at scale",
}


@dataclass
class Sizes:
    """How big each scenario is (``FULL``, ``QUICK``, ``SMOKE``)."""

    rounds: int
    a_streams: int = 20
    a_frames: int = 200
    b_streams: int = 50
    b_frames: int = 200
    c_streams: int = 200
    c_frames: int = 200
    c_ramp: float = 1.0
    c_fresh: bool = True  # a fresh chatterd for each (c) round, for the memory figure
    d_steps: list[int] = field(default_factory=lambda: [25, 50, 100, 150, 200, 300, 400, 600, 800, 1000,
                                                         1500, 2000])
    d_rate: float = 250.0  # stream starts per second while ramping up
    d_hold: float = 3.0  # seconds every stream is open at once
    d_rounds: int = 3
    e_streams: int = 50
    e_conns: int = 5
    e_frames: int = 200
    f_requests: int = 200
    f_conc: int = 10
    f_frames: int = 10
    g_rows: int = 1_000_000
    g_history: int = 50
    g_queries: int = 2000
    g_rounds: int = 2
    warm: int = 20


FULL = Sizes(rounds=5)
QUICK = Sizes(rounds=3, a_streams=10, d_steps=[50, 100, 200, 400, 800], d_rounds=2, g_rows=200_000,
              g_queries=1000, g_rounds=1)
SMOKE = Sizes(rounds=1, a_streams=3, a_frames=20, b_streams=5, b_frames=20, c_streams=10, c_frames=10,
              c_ramp=0.1, c_fresh=False, d_steps=[5, 10], d_rate=100.0, d_hold=0.2, d_rounds=1,
              e_streams=4, e_conns=2, e_frames=20, f_requests=4, f_conc=2, f_frames=5,
              g_rows=10_000, g_history=50, g_queries=100, g_rounds=1, warm=3)

CADENCE_MS = 15

ROWS = [
    Row("a", "single-stream frames/s", "ratio", "a.fps"),
    Row("a", "time to first frame, p50", "added", "a.ttff50", "ms"),
    Row("b", "frames/s", "ratio", "b.fps", "", Target(">=", 0.30, "≥0.30× (aim ≥0.50×)")),
    Row("b", "server CPU per frame", "value", "b.cpu", "µs"),
    Row("c", "time to first frame added, p50", "added", "c.ttff50", "ms", Target("<=", 20, "≤20 ms")),
    Row("c", "time to first frame added, p99", "added", "c.ttff99", "ms", Target("<=", 100, "≤100 ms")),
    Row("c", "inter-frame gap added, p99", "added", "c.gap99", "ms"),
    Row("c", "RSS per held stream", "value", "c.rss", "kB", Target("<=", 64, "≤64 kB")),
    Row("d", "streams held (0 errors, p99 ≤1.5× ideal)", "value", "d.held", "", Target(">=", 400, "≥400")),
    Row("e", "HTTP/2 server CPU per frame", "value", "e.cpu", "µs", Target("<=", 45, "≤45 µs")),
    Row("e", "HTTP/2 frames/s", "ratio", "e.fps", ""),
    Row("e", "HTTP/1.1-over-TLS server CPU per frame (same load)", "value", "e.cpu_h1", "µs"),
    Row("f", "requests/s", "ratio", "f.rps", ""),
    Row("f", "time to first frame (incl. handshake) added, p50", "added", "f.ttff50", "ms"),
    Row("f", "server CPU per request", "value", "f.cpu", "ms"),
    Row("g", "history query (50 of the table's rows), p50", "value", "g.hist50", "ms", Target("<=", 2, "≤2 ms")),
    Row("g", "history query, p99", "value", "g.hist99", "ms"),
    Row("g", "/llmchat's insert + history statement, p50", "value", "g.append50", "ms"),
    Row("g", "/getchatts server RSS growth", "value", "g.rss", "MB", Target("<", 64, "<64 MB")),
    Row("g", "/getchatts time to first byte", "value", "g.ttfb", "s", Target("<", 1, "<1 s")),
    Row("g", "/getchatts whole body", "value", "g.total", "s"),
    Row("all", "streams or requests with errors", "value", "errors", "", Target("<=", 0, "0")),
]


# --- running one path pair --------------------------------------------------


def model(frames: int, delay_ms: int = 0, first_ms: int = 0) -> str:
    return f"bench-{frames}x{delay_ms}ms-{first_ms}ms"


def spec(env: Env, direct: bool, *, transport: str = "h1", streams: int, frames: int, delay_ms: int = 0,
         ramp: float = 0.0, concurrency: int = 0, connections: int = 1, tag: str = "x") -> Spec:
    """A load run of ``streams`` streams of ``frames`` frames, for either path."""
    ideal = frames * delay_ms / 1000
    common: dict[str, Any] = dict(
        streams=streams, frames=frames, model=model(frames, delay_ms), ramp_s=ramp,
        concurrency=concurrency, cafile=str(env.certs / "chatterd.crt"),
        timeout_s=max(30.0, ideal * 5 + ramp + 20),
    )
    if direct:
        tls = transport == "h1-tls"
        return Spec(port=env.emulator.tls_port if tls else env.emulator.port, transport=transport if tls else "h1",
                    format="ndjson", path="/api/chat", **common)
    port = env.chatterd.ssl_port if transport.endswith("tls") else env.chatterd.port
    return Spec(port=port, transport=transport, format="sse", path="/llmchat", connections=connections,
                appid_prefix=f"bench.{tag}.{env.next_id()}", **common)


def pair(env: Env, r: int, make: Callable[[bool], Spec]) -> tuple[Result, Result]:
    """Run the direct path and chatterd back to back; which goes first alternates by round."""
    order = (True, False) if r % 2 == 0 else (False, True)
    out = {direct: env.load(make(direct), direct=direct) for direct in order}
    return out[True], out[False]


def errors(res: Result) -> int:
    return int(res["streams"] - res["ok"])


def note_run(results: Results, scenario: str, r: int, name: str, res: Result, extra: str = "") -> None:
    """One detail line: what a path did in a round (absolute figures are for this run only)."""
    ttff = [t * 1000 for t in res["ttff"]]
    text = (f"round {r + 1} {name}: {res['ok']}/{res['streams']} ok, {res['frames']} frames in "
            f"{res['wall_s']:.2f} s ({res['fps']:,.0f}/s), TTFF p50 {pct(ttff, 50):.1f} ms p99 {pct(ttff, 99):.1f} ms, "
            f"max open {res['max_open']}, server CPU {res['server_cpu_s'] / max(res['measured_s'], 1e-9):.0%} "
            f"of a core, load side {res['load_busy']:.0%}{extra}")
    if res["errors"]:
        text += f"; **errors {res['errors']}**: {res['error_samples'][:2]}"
    results.note(scenario, text)


def cpu_us(res: Result) -> float:
    return res["server_cpu_s"] / max(res["frames"], 1) * 1e6


def base_figures(d: Result, c: Result) -> Round:
    return {"errors.direct": errors(d), "errors.chatterd": errors(c)}


# --- the scenarios ------------------------------------------------------------


def warm(env: Env, z: Sizes) -> None:
    """Open the connection pools and touch every code path once, over every transport."""
    for transport in ("h1", "h2-tls", "h1-tls"):
        for direct in (True, False):
            env.load(spec(env, direct, transport=transport, streams=z.warm, frames=20, connections=2, tag="warm"),
                     direct=direct)


def scenario_a(env: Env, z: Sizes, r: int, results: Results) -> None:
    d, c = pair(env, r, lambda direct: spec(env, direct, streams=z.a_streams, concurrency=1,
                                            frames=z.a_frames, tag="a"))
    fig = base_figures(d, c)
    for name, res in (("direct", d), ("chatterd", c)):
        fig[f"a.fps.{name}"] = (z.a_frames + 1) / max(statistics.median(res["total"] or [math.inf]), 1e-9)
        fig[f"a.ttff50.{name}"] = pct(res["ttff"], 50) * 1000
        note_run(results, "a", r, name, res, f", stream time p50 {pct(res['total'], 50) * 1000:.1f} ms")
    results.add("a", fig)


def scenario_b(env: Env, z: Sizes, r: int, results: Results) -> None:
    d, c = pair(env, r, lambda direct: spec(env, direct, streams=z.b_streams, frames=z.b_frames, tag="b"))
    fig = base_figures(d, c)
    for name, res in (("direct", d), ("chatterd", c)):
        fig[f"b.fps.{name}"] = res["fps"]
        fig[f"b.cpu.{name}"] = cpu_us(res)
        note_run(results, "b", r, name, res, f", server CPU {cpu_us(res):.1f} µs/frame")
    results.add("b", fig)


def scenario_c(env: Env, z: Sizes, r: int, results: Results) -> None:
    if z.c_fresh:
        env.restart_chatterd()
        env.load(spec(env, False, streams=10, frames=10, tag="c-warm"), direct=False)

    def make(direct: bool) -> Spec:
        return spec(env, direct, streams=z.c_streams, frames=z.c_frames, delay_ms=CADENCE_MS,
                    ramp=z.c_ramp, tag="c")

    d, c = pair(env, r, make)
    fig = base_figures(d, c)
    for name, res in (("direct", d), ("chatterd", c)):
        fig[f"c.ttff50.{name}"] = pct(res["ttff"], 50) * 1000
        fig[f"c.ttff99.{name}"] = pct(res["ttff"], 99) * 1000
        fig[f"c.gap99.{name}"] = res["gap_p99"] * 1000
        held = max(res["max_open"], 1)
        if name == "chatterd":
            fig["c.rss.chatterd"] = (res["rss_peak"] - res["rss_start"]) / held / 1024
        ideal = z.c_frames * CADENCE_MS
        note_run(results, "c", r, name, res,
                 f", stream time p99 {pct(res['total'], 99) * 1000:.0f} ms (ideal {ideal} ms), "
                 f"gap p99 {res['gap_p99'] * 1000:.1f} ms, server RSS {res['rss_start'] / 2**20:.1f} → "
                 f"{res['rss_peak'] / 2**20:.1f} MB")
    results.add("c", fig)


def _held(res: Result, streams: int, ideal: float) -> tuple[bool, str]:
    """Did every stream succeed, all at once, within 1.5× the ideal time at p99?"""
    p99 = pct(res["total"], 99)
    ok = errors(res) == 0 and res["max_open"] >= streams and p99 <= 1.5 * ideal
    why = "" if ok else (
        f"errors {res['errors']}" if errors(res) else
        f"p99 stream time {p99:.2f} s > 1.5 × {ideal:.2f} s" if p99 > 1.5 * ideal else
        f"only {res['max_open']} open at once")
    return ok, why


def scenario_d(env: Env, z: Sizes, r: int, results: Results, deadline: Callable[[], bool]) -> None:
    held = {"direct": 0, "chatterd": 0}
    failed: dict[str, str] = {}
    errs = {"direct": 0, "chatterd": 0}
    for n in z.d_steps:
        if deadline():
            results.note("d", f"round {r + 1}: stopped stepping at {n} (time budget)")
            break
        ramp = n / z.d_rate
        frames = math.ceil((ramp + z.d_hold) * 1000 / CADENCE_MS)
        ideal = frames * CADENCE_MS / 1000

        def make(direct: bool) -> Spec:
            return spec(env, direct, streams=n, frames=frames, delay_ms=CADENCE_MS, ramp=ramp, tag="d")

        d, c = pair(env, r, make)
        for name, res in (("direct", d), ("chatterd", c)):
            errs[name] += errors(res)
            ok, why = _held(res, n, ideal)
            if ok and name not in failed:
                held[name] = n
            elif not ok and name not in failed:
                failed[name] = f"{n}: {why}"
        results.note("d", f"round {r + 1}, {n} streams × {frames} frames (ideal {ideal:.2f} s): "
                          f"direct p99 {pct(d['total'], 99):.2f} s, {errors(d)} errors, load busy {d['load_busy']:.0%}; "
                          f"chatterd p99 {pct(c['total'], 99):.2f} s, {errors(c)} errors{' ' + str(c['errors']) if c['errors'] else ''}, "
                          f"server CPU {c['server_cpu_s'] / max(c['measured_s'], 1e-9):.0%} of a core, "
                          f"RSS {c['rss_peak'] / 2**20:.0f} MB")
        if failed:
            break
    limited = "chatterd" not in failed and "direct" in failed
    if failed:
        results.note("d", f"round {r + 1}: first failure — " + "; ".join(f"{k} at {v}" for k, v in failed.items()))
    results.add("d", {"d.held.direct": held["direct"], "d.held.chatterd": held["chatterd"],
                      "d.limited": float(limited), "d.direct_failed": float("direct" in failed),
                      "errors.direct": errs["direct"],
                      "errors.chatterd": errs["chatterd"]})


def scenario_e(env: Env, z: Sizes, r: int, results: Results) -> None:
    def make(direct: bool) -> Spec:
        return spec(env, direct, transport="h2-tls", streams=z.e_streams, frames=z.e_frames,
                    connections=z.e_conns, tag="e")

    d, c = pair(env, r, make)
    fig = base_figures(d, c)
    for name, res in (("direct", d), ("chatterd", c)):
        fig[f"e.fps.{name}"] = res["fps"]
        fig[f"e.cpu.{name}"] = cpu_us(res)
        note_run(results, "e", r, name + (" (HTTP/1.1 to the emulator)" if name == "direct" else " (HTTP/2)"),
                 res, f", server CPU {cpu_us(res):.1f} µs/frame")
    if env.profile:  # keep the profile to HTTP/2 alone
        results.add("e", fig)
        return
    h1 = env.load(spec(env, False, transport="h1-tls", streams=z.e_streams, frames=z.e_frames, tag="e1"),
                  direct=False)
    fig["errors.chatterd"] += errors(h1)
    fig["e.cpu_h1.chatterd"] = cpu_us(h1)
    note_run(results, "e", r, "chatterd (HTTP/1.1 over TLS)", h1, f", server CPU {cpu_us(h1):.1f} µs/frame")
    results.add("e", fig)


def scenario_f(env: Env, z: Sizes, r: int, results: Results) -> None:
    def make(direct: bool) -> Spec:
        return spec(env, direct, transport="h1-tls", streams=z.f_requests, concurrency=z.f_conc,
                    frames=z.f_frames, tag="f")

    d, c = pair(env, r, make)
    fig = base_figures(d, c)
    for name, res in (("direct", d), ("chatterd", c)):
        fig[f"f.rps.{name}"] = res["streams"] / res["wall_s"]
        fig[f"f.ttff50.{name}"] = pct(res["ttff"], 50) * 1000
        fig[f"f.cpu.{name}"] = res["server_cpu_s"] / max(res["streams"], 1) * 1000
        note_run(results, "f", r, name, res,
                 f", {res['streams'] / res['wall_s']:.0f} requests/s, connect+handshake p50 "
                 f"{pct(res['connect'], 50) * 1000:.1f} ms")
    results.add("f", fig)


ROUND_SCENARIOS: dict[str, Callable[..., None]] = {
    "a": scenario_a, "b": scenario_b, "c": scenario_c, "e": scenario_e, "f": scenario_f, "d": scenario_d,
}
