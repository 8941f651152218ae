"""
``python -m bench``: run the scenarios, print the table, write the results file.
"""

from __future__ import annotations

import argparse
import copy
import io
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

from bench.env import BENCH_ROOT, Env, Variant
from bench.profiles import profile_report
from bench.report import Results, Summary, commit, machine, results_path, summarise, write_atomic
from bench.scenarios import (
    FULL,
    QUICK,
    ROUND_SCENARIOS,
    ROWS,
    SMOKE,
    TITLES,
    Sizes,
    warm,
)

ALL = "abcdefg"
#: Seconds kept back for scenario (g) when the rounds run long.
G_RESERVE = {1_000_000: 180.0}
RESULTS_DIR = BENCH_ROOT / "bench" / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="chatterd's benchmark suite (issue 7).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="3 rounds, fewer (d) steps, 200k rows (~3 min)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, one round, no results file (<30 s)")
    p.add_argument("--scenarios", default=",".join(ALL), help="comma-separated subset of a,b,c,d,e,f,g")
    p.add_argument("--rounds", type=int, help="rounds of each scenario (default 5, quick 3, smoke 1)")
    p.add_argument("--steps", help="(d)'s concurrency steps, comma-separated (default 25,50,...,2000)")
    p.add_argument("--c-streams", type=int, help="(c)'s streams (default 200): more, on a machine where one "
                                                    "core holds 200 with ease")
    p.add_argument("--src", default=str(BENCH_ROOT), help="the chatterd checkout to run (default: this one)")
    p.add_argument("--rev", help="run this git revision of --src (exported to a temporary directory) "
                                 "instead of its working tree, e.g. HEAD")
    p.add_argument("--against", action="append", default=[], metavar="REV",
                   help="also measure this git revision of --src, round by round beside the main one, and "
                        "compare (repeatable); e.g. --against HEAD~1 for a before/after in one run")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=OPTIONS",
                   help="also measure the main chatterd with these extra options, e.g. "
                        "'2 workers=--workers 2' (repeatable)")
    p.add_argument("--profile", choices=["cprofile", "py-spy"], help="profile chatterd; writes a profile report")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and load side to different CPUs")
    p.add_argument("--max-minutes", type=float, default=20.0, help="stop starting new rounds after this long")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, profiles)")
    p.add_argument("--out", help="results file (default bench/results/<date>-<host>.md; none for --smoke)")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(ALL)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def sizes_for(args: argparse.Namespace) -> Sizes:
    sizes = copy.deepcopy(SMOKE if args.smoke else QUICK if args.quick else FULL)
    if args.rounds:
        sizes.rounds = args.rounds
        sizes.d_rounds = min(sizes.d_rounds, args.rounds)
    if args.steps:
        sizes.d_steps = [int(n) for n in args.steps.split(",") if n.strip()]
    if args.c_streams:
        sizes.c_streams = args.c_streams
    return sizes


def progress(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)


def run_rounds(env: Env, z: Sizes, chosen: list[str], results: dict[str, Results], started: float,
               budget: float) -> None:
    reserve = G_RESERVE.get(z.g_rows, 30.0) if "g" in chosen else 0.0

    def over() -> bool:
        return time.monotonic() - started > budget - reserve

    progress(started, "warming up every path")
    warm(env, z)
    for r in range(z.rounds):
        for name in "abcefd":
            if name not in chosen or (name == "d" and r >= z.d_rounds):
                continue
            if over():
                results.note(name, f"round {r + 1} skipped: time budget spent")
                continue
            for variant in env.variants:  # side by side, in the same round
                env.use(variant)
                label = f" [{variant.label}]" if len(env.variants) > 1 else ""
                progress(started, f"round {r + 1}/{z.rounds}: ({name}) {TITLES[name]}{label}")
                if name == "d":
                    ROUND_SCENARIOS[name](env, z, r, results[variant.label], over)
                else:
                    ROUND_SCENARIOS[name](env, z, r, results[variant.label])


def total_errors(results: Results) -> tuple[int, int]:
    direct = sum(int(f.get("errors.direct", 0)) for rounds in results.rounds.values() for f in rounds)
    chatterd = sum(int(f.get("errors.chatterd", 0)) for rounds in results.rounds.values() for f in rounds)
    return direct, chatterd


def d_direct_prefix(rounds: list[dict[str, float]]) -> str:
    """"≥": the direct path was still passing when the stepping stopped at chatterd's failure."""
    return "" if any(f.get("d.direct_failed") for f in rounds) else "≥"


def d_qualifier(rounds: list[dict[str, float]]) -> str:
    limited = sum(1 for f in rounds if f.get("d.limited"))
    return f" (load side limit reached first in {limited}/{len(rounds)} rounds)" if limited else ""


def render(results: dict[str, Results], env: Env, z: Sizes, args: argparse.Namespace, elapsed: float,
           label: str, main: Variant) -> str:
    title = "chatterd benchmark" + (" (smoke)" if args.smoke else " (quick)" if args.quick else "") \
        + (f" — profiled with {args.profile}, figures inflated" if args.profile else "")
    parts = [f"# {title}", "", *machine(label, main.src, env.db.version if env.db else "?",
                                          (env.server_cpus, env.load_cpus), args.argv),
             f"- rounds: {z.rounds} ((d): {min(z.d_rounds, z.rounds)}), run time {elapsed / 60:.1f} min", "",
             "Medians over rounds, [min–max] over rounds; ratios and differences are taken per round "
             "(chatterd vs the direct path, back to back) and then summarised. "
             "Absolute figures hold for this run only.", ""]
    if len(env.variants) > 1:
        parts += [f"Variants, measured side by side in every round: "
                  + "; ".join(f"**{v.label}** ({v.src}{' ' + ' '.join(v.args) if v.args else ''})"
                              for v in env.variants), "",
                  "## Variants compared", "", compare(results, [v.label for v in env.variants]), ""]
    for variant in env.variants:
        own = results[variant.label]
        if len(env.variants) > 1:
            parts += [f"## {variant.label}", ""]
        parts += [own.table(), "", f"### Details{' (' + variant.label + ')' if len(env.variants) > 1 else ''}",
                  "", own.details(), ""]
    if env.problems:
        parts += ["", f"## chatterd's log: {len(env.problems)} error lines", "",
                  *[f"    {line}" for line in env.problems[:20]]]
    return "\n".join(parts) + "\n"


def export(repo: Path, rev: str) -> tuple[Path, str]:
    """``git archive`` ``rev``'s chatterd into a temporary directory; return it and the short hash."""
    short = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], capture_output=True,
                           text=True, check=True, timeout=30).stdout.strip()
    target = Path(tempfile.mkdtemp(prefix="chatterd-"))
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "chatterd", "twisted"],
                             capture_output=True, check=True, timeout=60).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(target, filter="data")
    return target, short


def compare(results: dict[str, Results], labels: list[str]) -> str:
    """
    Each variant against the first, per round (the same scenario, back to
    back in one round) and then summarised: for every row, the variant's
    figure (chatterd vs direct, or chatterd's own) ÷ the first variant's.
    """
    base, others = labels[0], labels[1:]
    head = f"| | metric | {base} | " + " | ".join(f"{o} | {o} ÷ {base}" for o in others) + " |"
    lines = [head, "|---|---|---|" + "---|---|" * len(others)]
    for row in ROWS:
        mine = results[base].rounds.get(row.scenario)
        if not mine:
            continue
        first = [summarise(row, [r]).compared for r in mine]
        if not any(first):
            continue
        suffix = "×" if row.kind == "ratio" else (f" {row.unit}" if row.unit else "")
        cells = [Summary.spread([c[0] for c in first if c]) + suffix]
        for other in others:
            theirs = [summarise(row, [r]).compared for r in results[other].rounds.get(row.scenario, [])]
            ratios = [t[0] / f[0] for f, t in zip(first, theirs) if f and t and f[0]]
            cells += [Summary.spread([t[0] for t in theirs if t]) + suffix, Summary.spread(ratios, "×")]
        lines.append(f"| {row.scenario} | {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    exported: list[Path] = []
    try:
        repo = Path(args.src).resolve()
        if args.rev:
            src, short = export(repo, args.rev)
            exported.append(src)
            label = f"{short} ({args.rev}, exported)"
        else:
            src, label = repo, commit(repo)
        # the revisions to compare against come first: the table then shows
        # this tree ÷ each of them, and each --variant ÷ this tree
        main = Variant(label.split(" ")[0], src)
        variants = []
        for rev in args.against:
            other, short = export(repo, rev)
            exported.append(other)
            variants.append(Variant(f"{short} ({rev})", other))
        variants.append(main)
        variants += [Variant(text.partition("=")[0].strip(), src, tuple(shlex.split(text.partition("=")[2])))
                     for text in args.variant]
        return _run(args, variants, main, label)
    finally:
        for path in exported:
            shutil.rmtree(path, ignore_errors=True)


def _run(args: argparse.Namespace, variants: list[Variant], main: Variant, label: str) -> int:
    src = main.src
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    z = sizes_for(args)
    results = {v.label: Results(ROWS, TITLES, qualifiers={"d.held": d_qualifier},
                                direct_prefixes={"d.held": d_direct_prefix}) for v in variants}
    first = results[main.label]
    started = time.monotonic()
    budget = args.max_minutes * 60
    with Env(src, pin=not args.no_pin, profile=args.profile, lifetime=budget + 600,
             keep=args.keep, variants=variants) as env:
        env.use(main)
        progress(started, f"database, emulator and chatterd up (work dir {env.work})")
        run_rounds(env, z, args.scenarios, results, started, budget)
        if "g" in args.scenarios:
            from bench.dbscale import scenario_g

            progress(started, f"(g) {TITLES['g']}: {z.g_rows:,} rows")
            env.use(main)
            scenario_g(env, z, first)
        progress(started, "stopping")
    direct = chatterd = 0
    for own in results.values():
        d, c = total_errors(own)
        own.add("all", {"errors.direct": d, "errors.chatterd": c})
        direct, chatterd = direct + d, chatterd + c
    text = render(results, env, z, args, time.monotonic() - started, label, main)
    print(text)
    out = Path(args.out) if args.out else None
    if out is None and not args.smoke and not args.profile:
        out = results_path(RESULTS_DIR, "-quick" if args.quick else "")
    if args.profile:
        out = Path(args.out) if args.out else results_path(
            RESULTS_DIR, f"-profile-{''.join(args.scenarios)}-{args.profile}")
        text += "\n" + profile_report(env, args.profile)
    if out is not None:
        write_atomic(out, text)
        print(f"written to {out}", file=sys.stderr)
    return 1 if (direct or chatterd) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return run(args)


def smoke() -> int:
    """
    Run every scenario at toy sizes (one round, 10k rows) and return the exit
    status: 0 if every stream and request passed its checks.  Targets are not
    judged.  Writes no results file; the test suite calls this.
    """
    try:
        return main(["--smoke", "--max-minutes", "3"])
    except Exception:  # the bench itself broke: report, do not raise into the test
        traceback.print_exc()
        return 2
