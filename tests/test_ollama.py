"""
How chatterd's treq client reaches Ollama servers: one endpoint per server,
made once, with no name resolution for an IP address.
"""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported

from chatterd.ollama import OllamaError, _Endpoints, parse_chat_line


class EndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoints = _Endpoints(self.reactor, 7.0)

    def endpoint(self, url: str) -> object:
        return self.endpoints.endpointForURI(URI.fromBytes(url.encode()))

    def test_ip_addresses_connect_directly(self) -> None:
        """
        An IPv4 or IPv6 address gets a plain TCP endpoint with the connect
        timeout: nothing to resolve.
        """
        v4 = self.endpoint("http://127.0.0.1:11434/api/chat")
        self.assertIsInstance(v4, TCP4ClientEndpoint)
        v4.connect(None)  # type: ignore[attr-defined]
        host, port, _, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 11434, 7.0))
        self.assertIsInstance(self.endpoint("http://[::1]:11434/api/chat"), TCP6ClientEndpoint)

    def test_names_are_resolved(self) -> None:
        """
        A host name gets Twisted's HostnameEndpoint (resolution, happy eyeballs).
        """
        self.assertIsInstance(self.endpoint("http://localhost:11434/api/chat"), HostnameEndpoint)

    def test_made_once_per_server(self) -> None:
        """
        Every request to one server uses the same endpoint; another port or
        scheme is another server.
        """
        first = self.endpoint("http://127.0.0.1:11434/api/chat")
        self.assertIs(self.endpoint("http://127.0.0.1:11434/api/tags"), first)
        self.assertIsNot(self.endpoint("http://127.0.0.1:11435/api/chat"), first)
        self.assertIsNot(self.endpoint("https://127.0.0.1:11434/api/chat"), first)

    def test_https_and_other_schemes(self) -> None:
        """
        https wraps the connection in TLS (verified as a browser would); any
        other scheme is refused as Twisted's agent refuses it.
        """
        wrapped = self.endpoint("https://ollama.example:443/api/chat")
        self.assertNotIsInstance(wrapped, HostnameEndpoint)
        self.assertIsInstance(wrapped._wrappedEndpoint, HostnameEndpoint)  # type: ignore[attr-defined]
        self.assertRaises(SchemeNotSupported, self.endpoint, "ftp://127.0.0.1:21/x")


class ParseChatLineTests(SynchronousTestCase):
    def test_content_and_done(self) -> None:
        """
        A chat line gives its message content (or "") and whether it is the last.
        """
        line = b'{"model":"m","message":{"role":"assistant","content":"Hi \\u00e9"},"done":false}'
        self.assertEqual(parse_chat_line(line), ("Hi \u00e9", False))
        self.assertEqual(parse_chat_line(b' {"model":"m","done":true}\r'), ("", True))
        self.assertEqual(parse_chat_line(b'{"message":{"content":7},"done":"yes"}'), ("", False))

    def test_errors(self) -> None:
        """
        Ollama's error line, and anything but one whole JSON object, is an
        OllamaError naming what came.
        """
        cases = {
            b'{"error":"model not found"}': "Ollama: model not found",
            b'{"done":true} {"done":true}': "not JSON",
            b'{"done":': "not JSON",
            b"": "not JSON",
            b"\xff\xfe": "not JSON",
            b"[1, 2]": "not a JSON object",
        }
        for line, says in cases.items():
            with self.assertRaises(OllamaError, msg=line) as caught:
                parse_chat_line(line)
            self.assertIn(says, str(caught.exception))
