"""
The command line (``Options``), the .tac's environment, and the service tree
``makeService`` builds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatterd import tap, tls
from chatterd.clients import AdmittingFactory
from chatterd.eager import EagerPort
from chatterd.relay import RelayConfig
from chatterd.site import ChatterSite
from chatterd.web import ReadinessResource


def parse(*argv: str, environ: dict[str, str] | None = None) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(tap.os, "environ", {})

    def test_defaults(self) -> None:
        """
        With no options: ssl:443, certs/, Ollama on localhost:11434, the
        embedded database, 15 s heartbeats, 1 MiB bodies.
        """
        o = parse()
        self.assertEqual(o["listen"], ["ssl:443"])
        self.assertEqual(o["certs"], "certs")
        self.assertEqual(o["ollama"], ["http://localhost:11434"])
        self.assertIsNone(o["database"])
        self.assertIsNone(o["data-dir"])
        self.assertEqual(o["heartbeat"], 15.0)
        self.assertEqual(o["max-body"], 1024 * 1024)
        self.assertEqual(o["cert-name"], [])

    def test_everything(self) -> None:
        """
        Every option as the contract spells it.
        """
        o = parse(
            "--listen", "ssl:8443:interface=127.0.0.1", "--listen", "tcp:8080",
            "--certs", "/etc/chatterd", "--ollama", "http://gpu:11434", "--database", "dbname=x",
            "--data-dir", "/srv/chatterd", "--heartbeat", "2.5", "--max-body", "4096",
            "--cert-name", "203.0.113.7", "--cert-name", "chat.example",
        )
        self.assertEqual(o["listen"], ["ssl:8443:interface=127.0.0.1", "tcp:8080"])
        self.assertEqual(o["certs"], "/etc/chatterd")
        self.assertEqual(o["ollama"], ["http://gpu:11434"])
        self.assertEqual(o["database"], "dbname=x")
        self.assertEqual(o["data-dir"], "/srv/chatterd")
        self.assertEqual(o["heartbeat"], 2.5)
        self.assertEqual(o["max-body"], 4096)
        self.assertEqual(o["cert-name"], ["203.0.113.7", "chat.example"])

    def test_ollama_host_environment(self) -> None:
        """
        ``$OLLAMA_HOST`` is the default Ollama, read as Ollama's tools read it.
        """
        self.patch(tap.os, "environ", {"OLLAMA_HOST": "0.0.0.0"})
        self.assertEqual(parse()["ollama"], ["http://127.0.0.1:11434"])
        self.assertEqual(parse("--ollama", "http://x:1")["ollama"], ["http://x:1"])
        self.assertEqual(parse("--ollama", "a", "--ollama", "b:1")["ollama"], ["http://a:11434", "http://b:1"])

    def test_ollama_urls(self) -> None:
        """
        Scheme and port default as in Ollama; IPv6 and paths survive.
        """
        self.assertEqual(tap.ollama_url("http://gpu"), "http://gpu")
        self.assertEqual(tap.ollama_url("gpu"), "http://gpu:11434")
        self.assertEqual(tap.ollama_url("gpu:8000"), "http://gpu:8000")
        self.assertEqual(tap.ollama_url("https://gpu/"), "https://gpu")
        self.assertEqual(tap.ollama_url("http://[::1]:5000"), "http://[::1]:5000")
        self.assertEqual(tap.ollama_url("[::]"), "http://[::1]:11434")
        self.assertRaises(usage.UsageError, tap.ollama_url, "ftp://x")

    def test_bad_numbers(self) -> None:
        """
        Non-numbers and non-positive numbers are usage errors.
        """
        for argv in (["--heartbeat", "x"], ["--heartbeat", "0"], ["--max-body", "-1"], ["--max-body", "1.5"]):
            self.assertRaises(usage.UsageError, parse, *argv)

    def test_per_client_limits(self) -> None:
        """
        By default one address may hold 1024 connections and a quarter of
        --max-streams streams; 0 turns either off; negatives are refused.
        """
        o = parse()
        self.assertEqual((o["max-client-connections"], o["max-client-streams"]), (1024, 250))
        self.assertEqual(parse("--max-streams", "40")["max-client-streams"], 10)
        self.assertEqual(parse("--max-streams", "3")["max-client-streams"], 1)
        o = parse("--max-client-connections", "0", "--max-client-streams", "0")
        self.assertEqual((o["max-client-connections"], o["max-client-streams"]), (0, 0))
        self.assertEqual(parse("--max-client-streams", "7", "--max-streams", "8")["max-client-streams"], 7)
        for argv in (["--max-client-connections", "-1"], ["--max-client-streams", "x"]):
            self.assertRaises(usage.UsageError, parse, *argv)

    def test_bad_listen(self) -> None:
        """
        A --listen that is not an endpoint description is a usage error.
        """
        self.assertRaises(usage.UsageError, parse, "--listen", "8443")


class EnvironmentTests(SynchronousTestCase):
    def test_tac_environment(self) -> None:
        """
        chatterd.tac's variables stand for the same options.
        """
        argv = tap.options_from_environment({
            "CHATTERD_LISTEN": "ssl:8443 tcp:8080",
            "CHATTERD_CERTS": "/c",
            "CHATTERD_OLLAMA": "http://o:1",
            "CHATTERD_DATABASE": "dbname=x user=y",
            "CHATTERD_DATA_DIR": "/d",
            "CHATTERD_HEARTBEAT": "3",
            "CHATTERD_MAX_BODY": "2048",
            "CHATTERD_METRICS": "tcp:9100:interface=127.0.0.1",
            "CHATTERD_LOG_FORMAT": "json",
            "CHATTERD_ARGS": "--cert-name 1.2.3.4",
        })
        o = parse(*argv)
        self.assertEqual(o["listen"], ["ssl:8443", "tcp:8080"])
        self.assertEqual((o["certs"], o["ollama"], o["database"], o["data-dir"], o["heartbeat"]),
                         ("/c", ["http://o:1"], "dbname=x user=y", "/d", 3.0))
        self.assertEqual(o["cert-name"], ["1.2.3.4"])
        self.assertEqual((o["max-body"], o["metrics"], o["log-format"]), (2048, "tcp:9100:interface=127.0.0.1", "json"))

    def test_empty_environment(self) -> None:
        """
        No variables, no options: the defaults.
        """
        self.assertEqual(tap.options_from_environment({}), [])


class MakeServiceTests(SynchronousTestCase):
    def test_tree_with_a_dsn(self) -> None:
        """
        With --database: the store and one TLS listener per --listen, the
        certificate generated in --certs.
        """
        certs = Path(self.mktemp())
        reactor = MemoryReactorClock()
        o = parse("--database", "host=/nonexistent dbname=x", "--certs", str(certs),
                  "--listen", "ssl:8443:interface=127.0.0.1", "--listen", "tcp:8080:interface=127.0.0.1")
        service = tap.makeService(o, reactor=reactor)
        self.assertTrue((certs / tls.CERT_FILE).exists())
        service.privilegedStartService()
        self.assertEqual([(p[0], p[4]) for p in reactor.sslServers], [(8443, "127.0.0.1")])
        self.assertEqual([(p[0], p[3]) for p in reactor.tcpServers], [(8080, "127.0.0.1")])
        [sequential] = service
        self.assertEqual([s.name for s in sequential][:4], ["store", None, "ollama", "streams"])
        self.flushLoggedErrors()

    def metrics_readyz(self, *argv: str) -> ReadinessResource:
        """
        The ``/readyz`` of the ``--metrics`` listener (tcp:9100) of a service
        made with ``argv``.
        """
        reactor = MemoryReactorClock()
        o = parse("--database", "host=/nonexistent dbname=x", "--listen", "tcp:8080:interface=127.0.0.1",
                  "--metrics", "tcp:9100:interface=127.0.0.1", *argv)
        self.service = tap.makeService(o, reactor=reactor)
        self.service.privilegedStartService()
        self.service_reactor = reactor
        [site] = [p[1] for p in reactor.tcpServers if p[0] == 9100]
        readyz = site.resource.children[b"readyz"]
        self.assertIsInstance(readyz, ReadinessResource)
        return readyz  # type: ignore[no-any-return]

    def test_the_metrics_listener_has_the_whole_readyz(self) -> None:
        """
        --metrics serves, beside /metrics, the /readyz with the whole story
        (``tests.test_operations.HealthTests`` checks what it says) of the
        app that serves --listen: its store, its Ollama servers.
        """
        readyz = self.metrics_readyz()
        [sequential] = self.service
        services = {s.name: s for s in sequential if s.name}
        self.assertIs(readyz._app.store, services["store"])
        self.assertIs(readyz._app.ollama, services["ollama"])
        self.flushLoggedErrors()

    def test_max_reply_reaches_the_relay(self) -> None:
        """
        --max-reply BYTES parses (a positive integer, 4 MiB by default) and
        is the relay's limit.
        """
        self.assertEqual(parse()["max-reply"], 4 * 1024 * 1024)
        self.assertEqual(parse("--max-reply", "1000")["max-reply"], 1000)
        for value in ("0", "-1", "x", "1.5"):
            self.assertRaises(usage.UsageError, parse, "--max-reply", value)
        config: RelayConfig = self.metrics_readyz("--max-reply", "1000")._app.relaying.config
        self.assertEqual(config.max_reply, 1000)
        self.assertEqual(self.metrics_readyz()._app.relaying.config.max_reply, 4 * 1024 * 1024)
        self.flushLoggedErrors()

    def test_each_option_reaches_its_component(self) -> None:
        """
        Every option makeService passes on is found, with its value, on the
        component of the tree that uses it.
        """
        readyz = self.metrics_readyz(
            "--ollama", "http://o1:1", "--ollama", "http://o2:2",
            "--db-pool-size", "7", "--db-wait", "3.5", "--max-history", "1234",
            "--max-streams", "40", "--max-client-streams", "6", "--grace", "4.5", "--lock-wait", "8.5",
            "--heartbeat", "2.5", "--first-byte-timeout", "11", "--stall-timeout", "12", "--max-reply", "999",
            "--max-body", "4321", "--request-timeout", "13", "--idle-timeout", "14",
            "--tags-refresh", "15", "--log-content",
        )
        [sequential] = self.service
        services = {s.name: s for s in sequential if s.name}
        store, streams, ollama = services["store"], services["streams"], services["ollama"]
        self.assertEqual((store._pool_size, store._acquire_timeout, store._max_history), (7, 3.5, 1234))
        self.assertEqual((streams.max_streams, streams.per_client.limit, streams.grace, streams.lock_wait),
                         (40, 6, 4.5, 8.5))
        self.assertEqual(readyz._app.relaying.config, RelayConfig(
            heartbeat=2.5, first_byte_timeout=11, stall_timeout=12, max_reply=999))
        self.assertEqual([s.url for s in ollama.servers], ["http://o1:1", "http://o2:2"])
        self.assertEqual(ollama._refresh, 15)
        self.assertTrue(readyz._app.log_content)
        [site] = [p[1] for p in self.service_reactor.tcpServers if p[0] == 8080]
        self.assertEqual((site.max_body, site.request_timeout, site.timeOut), (4321, 13, 14))
        self.assertFalse(self.metrics_readyz()._app.log_content)
        self.flushLoggedErrors()

    def test_tcp_only_needs_no_certificate(self) -> None:
        """
        A server behind a TLS terminator (tcp: only) makes no certificate.
        """
        certs = Path(self.mktemp())
        tap.makeService(parse("--database", "dbname=x", "--certs", str(certs), "--listen", "tcp:8080"),
                        reactor=MemoryReactorClock())
        self.assertFalse(certs.exists())

    def test_bad_listen_description(self) -> None:
        """
        An ssl: description with unknown options is a usage error at start.
        """
        o = parse("--database", "dbname=x", "--certs", self.mktemp(), "--listen", "ssl:443:bogus=1")
        self.assertRaises(usage.UsageError, tap.makeService, o, MemoryReactorClock())


class ListenerLimitTests(TestCase):
    """
    ``--max-client-connections`` sits in the listening port, which only a
    real reactor makes (on a fake one the ports are the reactor's own).
    """

    def listening_ports(self, *argv: str) -> list[Any]:
        """
        The ports of a service made with ``argv`` on the real reactor, two
        ``tcp:0`` listeners of 127.0.0.1, bound (then closed at cleanup).
        """
        o = parse("--database", "host=/nonexistent dbname=x", "--listen", "tcp:0:interface=127.0.0.1",
                  "--listen", "tcp:0:interface=127.0.0.1", *argv)
        service = tap.makeService(o, reactor=reactor)

        def walk(s: Any) -> Iterator[Any]:
            yield s
            for child in getattr(s, "services", []):
                yield from walk(child)

        listeners = [s for s in walk(service) if isinstance(s, StreamServerEndpointService)]
        ports: list[Any] = []
        for listener in listeners:
            listener.privilegedStartService()
            self.addCleanup(listener.stopService)
            listener._waitingForPort.addCallback(lambda port: ports.append(port) or port)
        self.assertEqual(len(ports), 2)
        return ports

    def test_max_client_connections_reaches_every_port(self) -> None:
        """
        Every listening port admits its connections through one
        ``ConnectionLimit`` holding the option's value (default 1024).
        """
        ports = self.listening_ports("--max-client-connections", "5")
        for port in ports:
            self.assertIsInstance(port, EagerPort)
            self.assertIsInstance(port.factory, AdmittingFactory)
            self.assertIs(port.factory.limit, port.limit)
            self.assertEqual(port.limit.counts.limit, 5)
            self.assertIsInstance(port.factory._factory, ChatterSite)
        self.assertIs(ports[0].limit, ports[1].limit)  # one count across listeners
        [default] = {port.limit.counts.limit for port in self.listening_ports()}
        self.assertEqual(default, 1024)
