"""
deploy/chatterd.service: systemd accepts it, and it keeps the promises
docs/operations.md makes (unprivileged user, port 443 by capability, restart
on failure, sandbox, state directory, a stop timeout longer than the drain).

``systemd-analyze verify`` checks that ExecStart's program exists, and
``/opt/chatterd/.venv/bin/twistd`` does not exist on a build machine.  So the
test verifies a copy of the unit, with the same name, in which only that path
is replaced by an executable that does exist (this Python); every other line
is verified as written.  (``--root=DIR`` would keep the path, but then the
whole unit tree, sysinit.target and the rest, must be copied under DIR too.)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from chatterd import tap

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "chatterd.service"
TWISTD = "/opt/chatterd/.venv/bin/twistd"
STATE = "/var/lib/chatterd"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """The unit's sections as lists of (key, value), continuation lines joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def seconds(value: str) -> float:
    """A systemd time span ("60", "90s", "1min 30s", "2m") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


class UnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.text = UNIT.read_text()
        self.unit = parse_unit(self.text)
        self.service = dict(self.unit["Service"])  # the last value of each key

    def values(self, key: str) -> list[str]:
        """Every value of a [Service] key, in order."""
        return [v for k, v in self.unit["Service"] if k == key]

    def exec_start(self) -> list[str]:
        """ExecStart's command line, split as systemd splits it."""
        [command] = self.values("ExecStart")
        return shlex.split(command)

    def test_systemd_analyze_verify(self) -> None:
        """systemd-analyze verify finds nothing to say about the unit."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (it comes with systemd)")
        self.assertIn(TWISTD, self.text)
        copy = Path(self.mktemp())
        copy.mkdir(parents=True)
        unit = copy / UNIT.name
        unit.write_text(self.text.replace(TWISTD, sys.executable))
        result = subprocess.run(
            [analyze, "verify", str(unit)],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
        output = result.stdout + result.stderr
        # verify exits 0 even after "Unknown key" warnings: read what it says.
        about_unit = [line for line in output.splitlines() if UNIT.name in line or str(copy) in line]
        self.assertEqual((result.returncode, about_unit), (0, []), output)

    def test_runs_twistd_as_its_own_user(self) -> None:
        """ExecStart runs twistd in the foreground, without a pidfile, as user chatterd."""
        argv = self.exec_start()
        self.assertEqual(argv[0], TWISTD)
        self.assertIn("--nodaemon", argv[: argv.index("chatterd")])
        self.assertIn("--pidfile=", argv[: argv.index("chatterd")])
        self.assertEqual(self.service["User"], "chatterd")
        self.assertEqual(self.service["Group"], "chatterd")

    def test_chatterd_accepts_the_options(self) -> None:
        """The options after "chatterd" parse, and keep all state under StateDirectory."""
        argv = self.exec_start()
        options = tap.Options()
        options.parseOptions(argv[argv.index("chatterd") + 1:])
        self.assertEqual(self.service["StateDirectory"], "chatterd")
        self.assertEqual(options["data-dir"], STATE)
        self.assertTrue(options["certs"].startswith(STATE + "/"), options["certs"])
        self.assertEqual(self.service["WorkingDirectory"], STATE)

    def test_binds_443_without_root(self) -> None:
        """CAP_NET_BIND_SERVICE is the only capability it gets, and it cannot gain more."""
        self.assertIn("ssl:443", self.exec_start())
        self.assertEqual(self.service["AmbientCapabilities"].split(), ["CAP_NET_BIND_SERVICE"])
        self.assertEqual(self.service["CapabilityBoundingSet"].split(), ["CAP_NET_BIND_SERVICE"])
        self.assertEqual(self.service["NoNewPrivileges"], "yes")

    def test_restarts_on_failure(self) -> None:
        """A crash restarts it; a clean stop (SIGTERM) does not."""
        self.assertEqual(self.service["Restart"], "on-failure")
        self.assertNotIn("SuccessExitStatus", self.service)  # SIGTERM counts as clean already

    def test_stops_gracefully(self) -> None:
        """SIGTERM goes to chatterd alone, with more time than its --grace to drain."""
        self.assertEqual(self.service["KillSignal"], "SIGTERM")
        self.assertEqual(self.service["KillMode"], "mixed")
        grace = tap.Options()["grace"]
        self.assertEqual(grace, 30.0)
        self.assertGreater(seconds(self.service["TimeoutStopSec"]), grace + 10)

    def test_reload_is_sighup_to_the_supervisor(self) -> None:
        """
        ``systemctl reload`` sends SIGHUP to the main process, which runs
        workers (a single process cannot reload without dropping streams).
        """
        self.assertEqual(self.values("ExecReload"), ["/bin/kill -HUP $MAINPID"])
        argv = self.exec_start()
        options = tap.Options()
        options.parseOptions(argv[argv.index("chatterd") + 1:])
        self.assertEqual(argv[argv.index("--workers") + 1], "auto")
        self.assertEqual(options["workers"], os.cpu_count())

    def test_enough_descriptors(self) -> None:
        """
        LimitNOFILE covers two descriptors per stream at --max-streams and
        four client addresses (four NAT'd lecture halls) at their
        --max-client-connections.
        """
        options = tap.Options()
        needed = 2 * options["max-streams"] + 4 * options["max-client-connections"]
        self.assertGreaterEqual(int(self.service.get("LimitNOFILE", 0)), needed)

    def test_sandboxed(self) -> None:
        """The sandbox directives docs/operations.md lists are all set."""
        expected = {
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "PrivateDevices": "yes",
            "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes",
            "ProtectControlGroups": "yes",
            "LockPersonality": "yes",
            "RestrictRealtime": "yes",
            "SystemCallArchitectures": "native",
            "UMask": "0077",
        }
        self.assertEqual({k: self.service.get(k) for k in expected}, expected)
        families = set(self.service["RestrictAddressFamilies"].split())
        self.assertLessEqual({"AF_INET", "AF_INET6", "AF_UNIX"}, families)
        self.assertNotIn("ReadWritePaths", self.service)  # StateDirectory is the only writable place

    def test_seconds(self) -> None:
        """The time-span reader used above reads systemd's forms."""
        self.assertEqual([seconds(v) for v in ("60", "90s", "1min 30s", "2m", "1h")], [60, 90, 90, 120, 3600])
