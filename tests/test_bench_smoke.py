"""
The benchmark suite still runs: ``python -m bench --smoke`` (toy sizes, every
scenario, every stream checked frame by frame).  Timings are not judged here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parent.parent


class BenchSmokeTests(TestCase):
    timeout = 300

    async def test_smoke(self) -> None:
        """
        Every scenario of the benchmark runs, and every stream it makes passes
        its checks (JSON frames, exact count, a done line, no error event).
        """
        result = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "bench", "--smoke"],
            cwd=ROOT, capture_output=True, text=True, timeout=240,
        )
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
