"""
Scenario (g): the database at scale.

A database of its own gets chatterd's schema (from a chatterd started on it),
then ``rows`` chatts bulk-loaded with ``INSERT ... SELECT generate_series``:
``rows / history`` appIDs of ``history`` messages each, interleaved as real
traffic would leave them (consecutive rows belong to different appIDs).
Then, with psycopg2 on its own connection:

- the per-appID history read ``/llmchat`` runs, for random appIDs: the
  statement that begins its turn (lock, insert, history) with no new message;
- the same with one new message, each in a rolled-back transaction;

and ``GET /getchatts`` of the whole table through a fresh chatterd, reading
as fast as possible: time to first byte and the server's RSS growth.
"""

from __future__ import annotations

import random
import time
from typing import Any

from bench.env import Chatterd, Env
from bench.loadgen import Spec
from bench.report import Results, pct
from bench.scenarios import Sizes

BULK = """
INSERT INTO chatts (username, message, id, time, appid)
SELECT CASE WHEN (i / %(apps)s) %% 2 = 0 THEN 'user' ELSE 'assistant' END,
       'message ' || i || ': the quick brown fox jumps over the lazy dog, and then over it again.',
       gen_random_uuid(),
       timestamptz '2026-01-01 00:00:00+00' + i * interval '1 second',
       'bench.g.' || (i %% %(apps)s)
  FROM generate_series(0, %(rows)s - 1) AS i
 ORDER BY i
"""


def _sql() -> tuple[str, str, Any, str]:
    """
    chatterd's own statements: its history read, its insert-and-read, how it
    fills in their parameters, and what ends a turn (the first two take the
    appID's lock in the same statement, which each run then gives back).
    Older chatterds (``--rev``) ran the history and insert without the lock.
    """
    try:
        from chatterd.store import _BEGIN_TURN, _UNLOCK, _many

        return _BEGIN_TURN, _BEGIN_TURN, _many, _UNLOCK
    except ImportError:
        history = "SELECT username, message FROM chatts WHERE appid = %(appid)s ORDER BY seq;"
        insert = """
INSERT INTO chatts (username, message, id, time, appid)
SELECT r, m, gen_random_uuid(), clock_timestamp(), %(appid)s
  FROM unnest(%(roles)s::text[], %(contents)s::text[]) WITH ORDINALITY AS t(r, m, n)
 ORDER BY n;
"""

        def many(appid: str, messages: list[dict[str, str]]) -> dict[str, Any]:
            return {"appid": appid, "roles": [m["role"] for m in messages],
                    "contents": [m["content"] for m in messages]}

        return history, insert + history, many, "SELECT 1;"


def load_rows(dsn: str, rows: int, history: int) -> float:
    """Bulk-load ``rows`` chatts and VACUUM ANALYZE; return the seconds it took."""
    import psycopg2

    started = time.perf_counter()
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(BULK, {"apps": max(rows // history, 1), "rows": rows})
        conn.commit()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE chatts")
    finally:
        conn.close()
    return time.perf_counter() - started


def query_latency(dsn: str, apps: int, history: int, queries: int) -> tuple[list[float], list[float], int]:
    """
    Milliseconds per history query and per insert-and-read statement, and
    how many history queries returned the wrong number of rows.
    """
    import psycopg2

    history_sql, append_sql, many, unlock_sql = _sql()
    rng = random.Random(7)
    conn = psycopg2.connect(dsn)
    wrong = 0
    hist: list[float] = []
    append: list[float] = []
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for i in range(queries + queries // 10):
                appid = f"bench.g.{rng.randrange(apps)}"
                t = time.perf_counter()
                cur.execute(history_sql, many(appid, []))
                got = cur.fetchall()
                if i >= queries // 10:  # the first tenth warms the cache
                    hist.append((time.perf_counter() - t) * 1000)
                    wrong += len(got) != history
                cur.execute(unlock_sql, many(appid, []))
        conn.autocommit = False
        with conn.cursor() as cur:
            for i in range(queries // 4 + 20):
                appid = f"bench.g.{rng.randrange(apps)}"
                t = time.perf_counter()
                cur.execute(append_sql, many(appid, [{"role": "user", "content": "Hello again!"}]))
                cur.fetchall()
                if i >= 20:
                    append.append((time.perf_counter() - t) * 1000)
                conn.rollback()
                cur.execute(unlock_sql, many(appid, []))  # a session lock outlives the rollback
                conn.rollback()
    finally:
        conn.close()
    return hist, append, wrong


def getchatts(env: Env, chatterd: Chatterd, rows: int) -> dict[str, Any]:
    """One ``GET /getchatts`` of the whole table, read as fast as the load generator can."""
    spec = Spec(port=chatterd.port, format="json-array", path="/getchatts", method="GET", streams=1,
                timeout_s=600.0, keep_body=rows <= 20_000)
    return env.load(spec, direct=False, chatterd=chatterd)


def scenario_g(env: Env, z: Sizes, results: Results) -> None:
    dsn = env.db.create("bench_g")  # type: ignore[union-attr]
    chatterd = Chatterd(env, dsn, name="chatterd-g", wait_for_schema=True)
    apps = max(z.g_rows // z.g_history, 1)
    try:
        secs = load_rows(dsn, z.g_rows, z.g_history)
        results.note("g", f"{z.g_rows:,} rows ({apps:,} appIDs × {z.g_history}) loaded and vacuumed in {secs:.1f} s")
        hist, append, wrong = query_latency(dsn, apps, z.g_history, z.g_queries)
        results.note("g", f"history query: {len(hist)} runs, p50 {pct(hist, 50):.2f} ms, p99 {pct(hist, 99):.2f} ms, "
                          f"max {max(hist):.2f} ms; {wrong} returned the wrong number of rows")
        results.note("g", f"insert + history (rolled back): {len(append)} runs, p50 {pct(append, 50):.2f} ms, "
                          f"p99 {pct(append, 99):.2f} ms")
        figures = {"g.hist50.chatterd": pct(hist, 50), "g.hist99.chatterd": pct(hist, 99),
                   "g.append50.chatterd": pct(append, 50), "errors.direct": 0.0, "errors.chatterd": float(wrong)}
        for k in range(z.g_rounds):
            if k:
                env.stop_chatterd(chatterd)
                chatterd = Chatterd(env, dsn, name="chatterd-g")
            res = getchatts(env, chatterd, z.g_rows)
            ok = res["ok"] == 1 and res["rows"] == z.g_rows
            growth = (res["rss_peak"] - res["rss_start"]) / 2**20
            results.note("g", f"/getchatts round {k + 1}: {res['rows']:,} rows, {res['bytes'] / 2**20:.0f} MB in "
                              f"{res['wall_s']:.1f} s, first byte after {pct(res['ttff'], 50) * 1000:.0f} ms, "
                              f"server RSS {res['rss_start'] / 2**20:.0f} → {res['rss_peak'] / 2**20:.0f} MB, "
                              f"server CPU {res['server_cpu_s']:.1f} s"
                              + ("" if ok else f"; **failed**: {res['errors']} {res['error_samples']}"))
            round_figures = dict(figures) if k == 0 else {"errors.direct": 0.0, "errors.chatterd": 0.0}
            round_figures["errors.chatterd"] += 0 if ok else 1
            if ok:
                round_figures |= {"g.rss.chatterd": growth, "g.ttfb.chatterd": res["ttff"][0],
                                  "g.total.chatterd": res["total"][0]}
            results.add("g", round_figures)
    finally:
        env.stop_chatterd(chatterd)
