"""
The test runner's own pieces (``tests/run.py``) and the suite's layout:
every module names test modules that exist.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests import run

ROOT = Path(__file__).resolve().parent.parent
_HEADER = re.compile(r"^# -\*- test-case-name: (?P<names>[\w.,\s]+?) -\*-$")


class RunnerTests(SynchronousTestCase):
    def test_jobs_per_cpu_and_the_whole_suite_by_default(self) -> None:
        """
        With no arguments trial runs ``tests`` with one worker per CPU.
        """
        self.assertEqual(run.trial_arguments([], 2), ["--jobs=2", "tests"])
        self.assertEqual(run.trial_arguments([], 1), ["tests"])

    def test_arguments_pass_through(self) -> None:
        """
        What to run and trial's options pass through; a chosen ``-j`` wins.
        """
        self.assertEqual(run.trial_arguments(["tests.test_sse"], 2), ["--jobs=2", "tests.test_sse"])
        self.assertEqual(run.trial_arguments(["-j1", "tests.test_sse"], 4), ["-j1", "tests.test_sse"])
        self.assertEqual(run.trial_arguments(["--jobs=3"], 4), ["--jobs=3", "tests"])
        self.assertEqual(run.trial_arguments(["--random=0"], 2), ["--jobs=2", "--random=0", "tests"])

    def test_an_option_value_given_separately_is_not_a_test_name(self) -> None:
        """
        ``-j 1`` or ``--reporter text`` name nothing to run: the whole suite
        still runs; a name after them is what runs.
        """
        self.assertEqual(run.trial_arguments(["-j", "1"], 2), ["-j", "1", "tests"])
        self.assertEqual(run.trial_arguments(["--reporter", "text"], 2), ["--jobs=2", "--reporter", "text", "tests"])
        self.assertEqual(run.trial_arguments(["--rep", "text", "-x"], 1), ["--rep", "text", "-x", "tests"])
        self.assertEqual(run.trial_arguments(["-j", "1", "tests.test_sse"], 2), ["-j", "1", "tests.test_sse"])
        self.assertEqual(run.trial_arguments(["--reporter", "text", "-x", "tests.test_sse"], 1),
                         ["--reporter", "text", "-x", "tests.test_sse"])

    def test_counts_from_trial_summary(self) -> None:
        """
        The plain line counts trial's successes, failures and errors, and
        skips when there are some.
        """
        passed = "Ran 9 tests in 1.0s\n\nPASSED (successes=9)\n"
        self.assertEqual(run.plain_line(run.counts(passed) or {}), "9 passed, 0 failed")
        failed = "...\nFAILED (skips=2, expectedFailures=1, failures=3, errors=4, successes=6)\n"
        self.assertEqual(run.plain_line(run.counts(failed) or {}), "7 passed, 7 failed, 2 skipped")
        self.assertEqual(run.counts("Ran 0 tests in 0.0s\n\nPASSED\n"), {})
        self.assertIsNone(run.counts("Traceback (most recent call last):\n"))


class LayoutTests(SynchronousTestCase):
    def test_every_module_names_existing_test_modules(self) -> None:
        """
        Each module of chatterd (and the plugin) has a ``test-case-name``
        header, and every module it names exists, so that ``trial
        --testmodule chatterd/x.py`` runs its tests.
        """
        modules = sorted((ROOT / "chatterd").glob("*.py")) + [ROOT / "twisted" / "plugins" / "chatterd_plugin.py"]
        self.assertGreater(len(modules), 10)
        for path in modules:
            if path.name == "__init__.py":
                continue
            first = path.read_text().splitlines()[0]
            match = _HEADER.match(first)
            self.assertIsNotNone(match, f"{path.name} has no test-case-name header: {first!r}")
            assert match is not None
            for name in match.group("names").split(","):
                self.assertIsNotNone(importlib.util.find_spec(name.strip()), f"{path.name} names {name.strip()}")

    def test_the_package_docstring_names_every_module(self) -> None:
        """
        ``chatterd/__init__.py`` lists every module, so a newcomer's map is whole.
        """
        import chatterd

        for path in sorted((ROOT / "chatterd").glob("*.py")):
            if path.name != "__init__.py":
                self.assertIn(f"``chatterd.{path.stem}``", chatterd.__doc__ or "", path.name)
