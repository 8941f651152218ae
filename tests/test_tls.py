"""
The generated certificate and the TLS listener: verification for 127.0.0.1,
HTTP/2 by ALPN, TLS 1.2 as the floor, a private key only its owner reads.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
import warnings
from pathlib import Path

from cryptography import x509
from klein import Klein
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from chatterd import tls
from tests import tlsclient


class CertificateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.certs = Path(self.mktemp())

    def test_generated_pair(self) -> None:
        """
        A missing pair is generated: a P-256 CA certificate for server auth,
        valid at most 825 days, naming loopback, localhost and extra names.
        """
        cert_path, key_path, made = tls.ensure_certificate(self.certs, ["203.0.113.7", "chat.example"])
        self.assertTrue(made)
        cert = tls.load_certificate(cert_path)
        names = tls.certificate_names(cert)
        for name in ("127.0.0.1", "::1", "localhost", "203.0.113.7", "chat.example"):
            self.assertIn(name, names)
        self.assertEqual(cert.subject.rfc4514_string(), "CN=203.0.113.7")
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertLessEqual(life, datetime.timedelta(days=825))
        self.assertTrue(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, list(eku))
        self.assertEqual(cert.public_key().curve.name, "secp256r1")

    def test_host_addresses_are_covered(self) -> None:
        """
        Every address of the host's interfaces is in the certificate.
        """
        cert_path, _, _ = tls.ensure_certificate(self.certs)
        names = set(tls.certificate_names(tls.load_certificate(cert_path)))
        for address in tls.host_addresses():
            self.assertIn(str(address), names)
        self.assertIn(ipaddress.ip_address("127.0.0.1"), tls.host_addresses())

    def test_key_is_private(self) -> None:
        """
        The key file is created with mode 0600; the certificate is public.
        """
        cert_path, key_path, _ = tls.ensure_certificate(self.certs)
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(cert_path).st_mode), 0o644)

    def test_existing_pair_is_kept(self) -> None:
        """
        An existing pair is used as it is; ``force`` replaces it.
        """
        cert_path, _, _ = tls.ensure_certificate(self.certs)
        before = cert_path.read_bytes()
        self.assertFalse(tls.ensure_certificate(self.certs)[2])
        self.assertEqual(cert_path.read_bytes(), before)
        self.assertTrue(tls.ensure_certificate(self.certs, force=True)[2])
        self.assertNotEqual(cert_path.read_bytes(), before)

    def test_half_a_pair_is_an_error(self) -> None:
        """
        A certificate without its key (or the reverse) is reported, not overwritten.
        """
        _, key_path, _ = tls.ensure_certificate(self.certs)
        key_path.unlink()
        e = self.assertRaises(tls.CertificateError, tls.ensure_certificate, self.certs)
        self.assertIn("--force", str(e))

    def test_fingerprint(self) -> None:
        """
        The fingerprint is the SHA-256 of the DER, as colon-separated hex.
        """
        cert_path, _, _ = tls.ensure_certificate(self.certs)
        fp = tls.fingerprint(tls.load_certificate(cert_path))
        self.assertRegex(fp, r"^([0-9A-F]{2}:){31}[0-9A-F]{2}$")

    def test_validity_is_capped(self) -> None:
        """
        A validity over 825 days is refused.
        """
        self.assertRaises(ValueError, tls.make_certificate, ["x"], days=826)

    def test_command_line(self) -> None:
        """
        ``chatterd-cert --name IP`` makes a certificate for that IP without a server.
        """
        self.assertEqual(tls.main(["--certs", str(self.certs), "--name", "198.51.100.4"]), 0)
        cert = tls.load_certificate(self.certs / tls.CERT_FILE)
        self.assertIn("198.51.100.4", tls.certificate_names(cert))
        self.assertEqual(tls.main(["--certs", str(self.certs), "--name", "198.51.100.5", "--force"]), 0)
        cert = tls.load_certificate(self.certs / tls.CERT_FILE)
        self.assertIn("198.51.100.5", tls.certificate_names(cert))


class DescriptionTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """
        Descriptions split on unescaped colons into positional and keyword parts.
        """
        self.assertEqual(
            tls.parse_description(r"ssl:8443:interface=\:\:1:privateKey=/a\:b"),
            (["ssl", "8443"], {"interface": "::1", "privateKey": "/a:b"}),
        )

    def test_bad_ssl_description(self) -> None:
        """
        Unknown ssl options are refused with a message naming them.
        """
        certs = Path(self.mktemp())
        cert, key, _ = tls.ensure_certificate(certs)
        e = self.assertRaises(ValueError, tls.server_endpoint, reactor, "ssl:443:sslmethod=SSLv3_METHOD", cert, key)
        self.assertIn("sslmethod", str(e))


class ListenerTests(TestCase):
    """
    A real TLS listener on 127.0.0.1 and real clients that verify it.
    """

    def setUp(self) -> None:
        self.certs = Path(self.mktemp())
        self.cert, self.key, _ = tls.ensure_certificate(self.certs)
        app = Klein()

        @app.route("/")
        def index(request: object) -> bytes:
            return b"hello"

        endpoint = tls.server_endpoint(reactor, "ssl:0:interface=127.0.0.1", self.cert, self.key)
        d = endpoint.listen(Site(app.resource()))

        def listening(port: object) -> None:
            self.port = port.getHost().port  # type: ignore[attr-defined]
            self.addCleanup(port.stopListening)  # type: ignore[attr-defined]

        return d.addCallback(listening)

    async def test_http2_is_negotiated_and_verified(self) -> None:
        """
        An h2 client that trusts chatterd.crt verifies https://127.0.0.1 and gets HTTP/2.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            reply = await deferToThread(tlsclient.h2_request, "127.0.0.1", self.port, "/", str(self.cert))
        self.assertEqual(reply.alpn, "h2")
        self.assertEqual((reply.status, reply.body), (200, b"hello"))

    async def test_http11_still_works(self) -> None:
        """
        A client that offers no ALPN gets HTTP/1.1, verified for 127.0.0.1.
        """
        reply = await deferToThread(tlsclient.https_request, "127.0.0.1", self.port, "/", str(self.cert))
        self.assertEqual((reply.status, reply.body), (200, b"hello"))

    async def test_old_tls_is_refused(self) -> None:
        """
        TLS 1.0 and 1.1 handshakes fail; TLS 1.2 works.
        """
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            try:
                await deferToThread(tlsclient.handshake, "127.0.0.1", self.port, str(self.cert), maximum=version)
            except ssl.SSLError as e:
                self.assertIn("PROTOCOL_VERSION", str(e))  # the server's alert
            else:
                self.fail(f"{version.name} was accepted")
        agreed = await deferToThread(tlsclient.handshake, "127.0.0.1", self.port, str(self.cert), maximum=ssl.TLSVersion.TLSv1_2)
        self.assertEqual(agreed, "TLSv1.2")

    async def test_wrong_name_fails_verification(self) -> None:
        """
        Host name checking is really on: a name not in the certificate fails.
        """
        ctx = tlsclient.context(str(self.cert))

        def connect() -> None:
            import socket
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
                ctx.wrap_socket(raw, server_hostname="not-this-host.example").close()

        with self.assertRaises(ssl.SSLCertVerificationError):
            await deferToThread(connect)
