"""
``scripts/test``: run the suite with trial and end with a plain count.

``python -m tests.run [trial options] [tests...]`` runs ``python -m
twisted.trial`` with ``--jobs`` set to the number of CPUs (unless the
arguments choose ``-j``/``--jobs`` themselves) on ``tests`` (unless they name
what to run), passes trial's output through, and then prints one line, ``N
passed, N failed`` (plus ``, N skipped``), computed from trial's summary.  Its
exit status is trial's, and 1 if trial ran no test at all (trial itself
says ``PASSED`` then).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence

#: trial's last line: ``PASSED (successes=9)`` or ``FAILED (skips=1, failures=2, successes=6)``.
_SUMMARY = re.compile(r"^(PASSED|FAILED)(?: \((?P<counts>[^)]*)\))?\s*$")
_FAILED = ("failures", "errors", "unexpectedSuccesses")


def trial_arguments(argv: Sequence[str], cpus: int) -> list[str]:
    """
    trial's command line for ``argv``: ``--jobs`` per CPU unless chosen,
    and the whole ``tests`` package unless something to run is named.
    """
    args = list(argv)
    if cpus > 1 and not any(a == "-j" or a.startswith(("-j", "--jobs")) for a in args):
        args = [f"--jobs={cpus}", *args]
    if not _names_tests(args):
        args.append("tests")
    return args


def _names_tests(args: Sequence[str]) -> bool:
    """
    Whether ``args`` name something to run: an argument that is neither an
    option nor the value of one given separately (``-j 1``, ``--reporter text``).
    """
    from twisted.scripts.trial import Options

    options = Options()
    takes_value = {"--" + o[:-1] for o in options.longOpt if o.endswith("=")}
    takes_value |= {"-" + c for c, colon in zip(options.shortOpt, options.shortOpt[1:] + " ") if colon == ":" and c != ":"}
    value_next = False
    for i, a in enumerate(args):
        if value_next:
            value_next = False
        elif a == "--":
            return i + 1 < len(args)
        elif a.startswith("--"):
            name = a.split("=", 1)[0]
            matches = {o for o in takes_value if o.startswith(name)}  # getopt takes a unique prefix
            value_next = "=" not in a and (name in takes_value or len(matches) == 1)
        elif a.startswith("-") and len(a) > 1:
            value_next = a in takes_value  # "-j1" holds its value
        else:
            return True
    return False


def counts(output: str) -> dict[str, int] | None:
    """
    The counts in trial's summary line (the last one), or ``None`` if there is none.
    """
    for line in reversed(output.splitlines()):
        match = _SUMMARY.match(line)
        if match:
            found: dict[str, int] = {}
            for part in (match.group("counts") or "").split(","):
                name, _, value = part.strip().partition("=")
                if value.isdigit():
                    found[name] = int(value)
            return found
    return None


def plain_line(found: dict[str, int]) -> str:
    """
    ``N passed, N failed`` (``, N skipped`` if any), from trial's counts.
    Expected failures count as passed: the test asserted what it meant to.
    """
    passed = found.get("successes", 0) + found.get("expectedFailures", 0)
    failed = sum(found.get(name, 0) for name in _FAILED)
    line = f"{passed} passed, {failed} failed"
    if found.get("skips"):
        line += f", {found['skips']} skipped"
    return line


def main(argv: Sequence[str]) -> int:
    command = [sys.executable, "-m", "twisted.trial", *trial_arguments(argv, os.cpu_count() or 1)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="backslashreplace")
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    status = process.wait()
    found = counts("".join(lines))
    if found is None:
        print("0 passed, 1 failed (trial printed no summary)")
        return status or 1
    print(plain_line(found))
    if not found.get("successes") and not found.get("skips") and status == 0:
        return 1  # trial ran nothing
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
