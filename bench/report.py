"""
Statistics over rounds and the results table.

Every figure is a median over rounds; ``[lo–hi]`` is the spread (min–max)
over rounds.  A *ratio* is computed per round (chatterd ÷ direct, both
measured back to back in that round) and only then summarised, so drift
between rounds cancels; an *added* figure is chatterd − direct per round.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Round = dict[str, float]


def pct(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return float(ordered[k])


def fmt(x: float) -> str:
    """Three significant digits, without exponent for everyday magnitudes."""
    if x != x:  # NaN
        return "—"
    if x == 0:
        return "0"
    if float(x).is_integer() and abs(x) < 1e7:
        return f"{int(x):,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


@dataclass(frozen=True)
class Target:
    """A bound to report against: ``op`` is ``>=``, ``<=`` or ``<``."""

    op: str
    bound: float
    text: str

    def check(self, value: float) -> bool:
        return {"<=": value <= self.bound, ">=": value >= self.bound, "<": value < self.bound}[self.op]


@dataclass(frozen=True)
class Row:
    """
    One line of the table.

    :param kind: ``ratio`` (chatterd ÷ direct), ``added`` (chatterd − direct)
        or ``value`` (chatterd's own figure).
    :param key: per-round figures are ``<key>.direct`` and ``<key>.chatterd``.
    """

    scenario: str
    label: str
    kind: str
    key: str
    unit: str = ""
    target: Target | None = None


@dataclass
class Summary:
    """A row's numbers: medians of each path and of the comparison, with spreads."""

    direct: list[float]
    chatterd: list[float]
    compared: list[float]

    @staticmethod
    def spread(values: list[float], suffix: str = "") -> str:
        if not values:
            return "—"
        mid = statistics.median(values)
        if len(values) == 1:
            return f"{fmt(mid)}{suffix}"
        return f"{fmt(mid)}{suffix} [{fmt(min(values))}–{fmt(max(values))}]"


def summarise(row: Row, rounds: list[Round]) -> Summary:
    direct = [r[f"{row.key}.direct"] for r in rounds if f"{row.key}.direct" in r]
    chatterd = [r[f"{row.key}.chatterd"] for r in rounds if f"{row.key}.chatterd" in r]
    compared: list[float] = []
    for r in rounds:
        d, c = r.get(f"{row.key}.direct"), r.get(f"{row.key}.chatterd")
        if c is None:
            continue
        if row.kind == "ratio" and d:
            compared.append(c / d)
        elif row.kind == "added" and d is not None:
            compared.append(c - d)
        elif row.kind == "value":
            compared.append(c)
    return Summary(direct, chatterd, compared)


@dataclass
class Results:
    """Per-scenario rounds, notes and the rows to show."""

    rows: list[Row]
    titles: dict[str, str]
    rounds: dict[str, list[Round]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    qualifiers: dict[str, Callable[[list[Round]], str]] = field(default_factory=dict)
    direct_prefixes: dict[str, Callable[[list[Round]], str]] = field(default_factory=dict)

    def add(self, scenario: str, figures: Round) -> None:
        self.rounds.setdefault(scenario, []).append(figures)

    def note(self, scenario: str, text: str) -> None:
        self.notes.setdefault(scenario, []).append(text)

    def table(self) -> str:
        lines = [
            "| | metric | direct | chatterd | chatterd vs direct | target | |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            rounds = self.rounds.get(row.scenario)
            if not rounds:
                continue
            s = summarise(row, rounds)
            if not (s.direct or s.chatterd):
                continue
            unit = f" {row.unit}" if row.unit else ""
            if row.kind == "value":
                shown = f"{Summary.spread(s.compared)}{unit}"
                qualifier = self.qualifiers.get(row.key)
                if qualifier is not None:
                    shown += qualifier(rounds)
                direct = Summary.spread(s.direct) + unit if s.direct else "—"
                prefix = self.direct_prefixes.get(row.key)
                if prefix is not None and s.direct:
                    direct = prefix(rounds) + direct
                cells = [direct, shown, "—"]
            else:
                suffix = "×" if row.kind == "ratio" else unit
                sign = "+" if row.kind == "added" and s.compared and statistics.median(s.compared) >= 0 else ""
                cells = [Summary.spread(s.direct) + unit, Summary.spread(s.chatterd) + unit,
                         sign + Summary.spread(s.compared, suffix)]
            verdict = ""
            if row.target is not None and s.compared:
                verdict = "pass" if row.target.check(statistics.median(s.compared)) else "**FAIL**"
            target = row.target.text if row.target else ""
            lines.append(f"| {row.scenario} | {row.label} | {' | '.join(cells)} | {target} | {verdict} |")
        return "\n".join(lines)

    def details(self) -> str:
        out = []
        for scenario, notes in self.notes.items():
            out.append(f"- **({scenario}) {self.titles.get(scenario, '')}**")
            out += [f"  - {n}" for n in notes]
        return "\n".join(out)


# --- the machine -------------------------------------------------------------


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def commit(src: Path) -> str:
    """``<short hash>`` of ``src``'s checkout, ``+dirty`` if chatterd/ has local changes."""
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "chatterd"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "not a git checkout") + ("+dirty" if dirty else "")


def machine(label: str, src: Path, pg_version: str, cores: tuple[Any, Any], argv: list[str]) -> list[str]:
    server, load = cores
    pinning = f"server (chatterd, PostgreSQL) on CPU {sorted(server)}, load (generator, emulator) on CPU {sorted(load)}" \
        if server else "not pinned (one CPU)"
    return [
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- host: {socket.gethostname()} — {cpu_model()}, {os.cpu_count()} cores "
        f"({len(os.sched_getaffinity(0))} usable), Linux {platform.release()}",
        f"- Python {platform.python_version()}, Twisted {_version('twisted')}, h2 {_version('h2')}, "
        f"psycopg2 {_version('psycopg2-binary')}, PostgreSQL {pg_version}",
        f"- chatterd {label} from {src}",
        f"- pinning: {pinning}",
        f"- command: `{' '.join(['python -m bench', *argv])}`",
    ]


def results_path(directory: Path, suffix: str = "") -> Path:
    return directory / f"{datetime.date.today():%Y-%m-%d}-{socket.gethostname()}{suffix}.md"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
