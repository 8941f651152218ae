"""
The generated certificate and the TLS listeners: a certificate that verifies
for each of its names but cannot vouch for any other, a warning for the older
ones that can, HTTP/2 by ALPN, TLS 1.2 as the floor with only AEAD suites with
forward secrecy, served certificate chains, and a key only its owner reads.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import ipaddress
import os
import socket
import ssl
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from klein import Klein
from OpenSSL import crypto
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from chatterd import tls
from tests import tlsclient

#: Names a test certificate covers besides the host's own.
EXTRA_NAMES = ["chat.example", "203.0.113.7"]

#: Names and addresses outside the test certificate's (the next address, too).
UNRELATED_NAMES = ["example.com", "chat.example.com", "198.51.100.9", "203.0.113.8", "2001:db8::1"]

#: A subdomain of one of its names: name constraints permit it (RFC 5280), so
#: only the missing ``keyCertSign`` refuses it.
SUBDOMAIN = "evil.chat.example"

# --- certificates made by the tests ----------------------------------------------

#: The common name of a minted leaf: not a host name, which OpenSSL would check
#: against DNS name constraints when a leaf names no DNS name, so that each
#: leaf is judged by its subjectAltName alone.
MINTED_CN = "Minted Leaf"

Key = Any  # an EC or RSA private key


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _usage(*, digital_signature: bool = True, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, key_cert_sign=cert_sign, crl_sign=cert_sign,
        content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, encipher_only=False, decipher_only=False,
    )


def issue(
    name: str, key: Key, issuer: tuple[x509.Certificate, Key] | None = None, *,
    ca: bool = False, sans: Sequence[str] = (),
) -> x509.Certificate:
    """
    A certificate for ``name`` that a strict verifier accepts: a CA, or a
    server certificate for ``sans`` (default ``name``), signed by ``issuer``
    (certificate, key), or self-signed.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_usage(digital_signature=not ca, cert_sign=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in sans or [name]]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def legacy_certificate(names: Sequence[str], key: Key, *, constrained: bool = False) -> x509.Certificate:
    """
    A certificate as chatterd made them before it could not sign: a CA with
    path length 0 and ``keyCertSign``, and no name constraints (unless
    ``constrained``: then it is no longer the old kind).
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825) - datetime.timedelta(minutes=5))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if constrained:
        subtrees = [x509.DNSName(n) for n in names if isinstance(_general_name(n), x509.DNSName)]
        builder = builder.add_extension(x509.NameConstraints(subtrees, None), critical=True)
    return builder.sign(key, hashes.SHA256())


def with_cert_sign(cert: x509.Certificate, key: Key) -> x509.Certificate:
    """
    ``cert`` as it was, but with ``keyCertSign``: only its name constraints
    then stand between its key and a certificate for another name.
    """
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        value = extension.value
        if isinstance(value, x509.KeyUsage):
            value = _usage(cert_sign=True)
        builder = builder.add_extension(value, critical=extension.critical)
    return builder.sign(key, hashes.SHA256())


def write_pem(path: Path, *items: x509.Certificate | Key) -> Path:
    """
    Write certificates and (unencrypted) keys to ``path``, in order, as PEM.
    """
    data = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            data += item.public_bytes(serialization.Encoding.PEM)
        else:
            data += item.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
    path.write_bytes(data)
    return path


def new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def load_key(path: Path) -> Key:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


# --- verifiers -------------------------------------------------------------------


def openssl_verify(
    anchor: x509.Certificate, cert: x509.Certificate, chain: Sequence[x509.Certificate] = (), *,
    strict: bool = False,
) -> None:
    """
    Verify ``cert`` with OpenSSL, ``anchor`` being the only trusted
    certificate; ``strict`` as Python 3.13 verifies by default.

    :raises crypto.X509StoreContextError: if it does not verify.
    """
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(anchor))
    if strict:
        store.set_flags(crypto.X509StoreFlags.X509_STRICT | crypto.X509StoreFlags.PARTIAL_CHAIN)
    untrusted = [crypto.X509.from_cryptography(c) for c in chain]
    crypto.X509StoreContext(store, crypto.X509.from_cryptography(cert), untrusted).verify_certificate()


def cryptography_verify(
    anchor: x509.Certificate, cert: x509.Certificate, name: str, *, anchor_as_leaf: bool = False
) -> None:
    """
    Verify ``cert`` for the server ``name`` with ``cryptography``'s verifier,
    ``anchor`` being the only trusted certificate.

    ``anchor_as_leaf`` checks chatterd's certificate as a phone does, as both
    the trusted certificate and the server's: the web PKI's profile for a
    server certificate (not a CA, no name constraints) then does not apply.

    :raises verification.VerificationError: if it does not verify.
    """
    builder = verification.PolicyBuilder().store(verification.Store([anchor]))
    if anchor_as_leaf:
        server = verification.ExtensionPolicy.permit_all().require_present(
            x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
        )
        builder = builder.extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=server
        )
    general = _general_name(name)
    subject = (
        verification.IPAddress(general.value) if isinstance(general, x509.IPAddress)
        else verification.DNSName(name)
    )
    builder.build_server_verifier(subject).verify(cert, [])


# --- the generated certificate ---------------------------------------------------


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

    def test_cannot_sign_and_is_constrained_to_its_names(self) -> None:
        """
        The certificate cannot sign certificates (no ``keyCertSign``, hence no
        path length) and carries critical name constraints that permit its
        own names, each address as a /32 or /128, and nothing else.
        """
        cert_path, _, _ = tls.ensure_certificate(self.certs, EXTRA_NAMES)
        cert = tls.load_certificate(cert_path)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertFalse(usage.value.key_cert_sign)
        self.assertIsNone(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length)
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
        self.assertTrue(constraints.critical)
        self.assertIsNone(constraints.value.excluded_subtrees)
        permitted = set()
        for subtree in constraints.value.permitted_subtrees:
            if isinstance(subtree, x509.IPAddress):
                self.assertEqual(subtree.value.prefixlen, subtree.value.max_prefixlen)
                permitted.add(str(subtree.value.network_address))
            else:
                permitted.add(subtree.value)
        self.assertEqual(permitted, set(tls.certificate_names(cert)))
        self.assertFalse(tls.is_legacy(cert))

    def test_every_name_form_is_constrained(self) -> None:
        """
        A certificate without host names (or without addresses) still limits
        that form, to loopback: a form with no subtree would be unconstrained.
        """
        for names, expected in ((["203.0.113.7"], "localhost"), (["chat.example"], "127.0.0.1/32")):
            cert = x509.load_pem_x509_certificate(tls.make_certificate(names)[0])
            subtrees = cert.extensions.get_extension_for_class(x509.NameConstraints).value.permitted_subtrees
            self.assertIn(expected, [str(s.value) for s in subtrees])

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
        The fingerprint is the SHA-256 of the certificate's DER, as
        colon-separated upper-case hex (computed here with the standard
        library alone, from the PEM file).
        """
        cert_path, _, _ = tls.ensure_certificate(self.certs)
        fp = tls.fingerprint(tls.load_certificate(cert_path))
        self.assertRegex(fp, r"^([0-9A-F]{2}:){31}[0-9A-F]{2}$")
        der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
        self.assertEqual(fp.replace(":", ""), hashlib.sha256(der).hexdigest().upper())

    def test_validity_is_capped(self) -> None:
        """
        A validity over 825 days is refused.
        """
        self.assertRaises(ValueError, tls.make_certificate, ["x"], days=826)

    def test_command_line(self) -> None:
        """
        ``chatterd-cert --name IP`` makes a certificate for that IP without a
        server, and says that phones need the new one.
        """
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(tls.main(["--certs", str(self.certs), "--name", "198.51.100.4"]), 0)
        self.assertIn("every phone", out.getvalue())
        cert = tls.load_certificate(self.certs / tls.CERT_FILE)
        self.assertIn("198.51.100.4", tls.certificate_names(cert))
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(tls.main(["--certs", str(self.certs), "--name", "198.51.100.5", "--force"]), 0)
        cert = tls.load_certificate(self.certs / tls.CERT_FILE)
        self.assertIn("198.51.100.5", tls.certificate_names(cert))


class MintingTests(SynchronousTestCase):
    """
    A stolen ``chatterd.key`` cannot make a certificate for another name that
    verifies against ``chatterd.crt``, yet ``chatterd.crt`` verifies for each
    of its own names; with OpenSSL's strict checks (Python 3.13's default) on
    and off, and with ``cryptography``'s verifier.
    """

    def setUp(self) -> None:
        cert_path, key_path, _ = tls.ensure_certificate(Path(self.mktemp()), EXTRA_NAMES)
        self.cert = tls.load_certificate(cert_path)
        self.key = load_key(key_path)

    def assertCannotVouch(self, anchor: x509.Certificate, key: Key, names: Sequence[str]) -> None:
        for name in names:
            leaf = issue(MINTED_CN, new_key(), (anchor, key), sans=[name])
            for strict in (False, True):
                self.assertRaises(crypto.X509StoreContextError, openssl_verify, anchor, leaf, strict=strict)
            self.assertRaises(verification.VerificationError, cryptography_verify, anchor, leaf, name)

    def assertVouches(self, anchor: x509.Certificate, key: Key, names: Sequence[str]) -> None:
        for name in names:
            leaf = issue(MINTED_CN, new_key(), (anchor, key), sans=[name])
            for strict in (False, True):
                openssl_verify(anchor, leaf, strict=strict)
            cryptography_verify(anchor, leaf, name)

    def test_a_stolen_key_cannot_mint(self) -> None:
        """
        Leaves for other names and addresses, signed with chatterd.key, fail
        verification when chatterd.crt is the only trust anchor.  The same
        leaves signed by an older chatterd's certificate verify: that is what
        the fix removes, and it shows that the leaves are otherwise valid.
        """
        self.assertCannotVouch(self.cert, self.key, [*UNRELATED_NAMES, SUBDOMAIN])
        old_key = new_key()
        old = legacy_certificate(tls.default_names(EXTRA_NAMES), old_key)
        self.assertVouches(old, old_key, [*UNRELATED_NAMES, SUBDOMAIN])

    def test_name_constraints_alone_stop_it(self) -> None:
        """
        Even with ``keyCertSign`` put back (as for a verifier that ignores key
        usage in a trust anchor), the name constraints refuse other names and
        addresses, and permit the certificate's own (and subdomains of its
        host names, as RFC 5280 has it).
        """
        signing = with_cert_sign(self.cert, self.key)
        self.assertCannotVouch(signing, self.key, UNRELATED_NAMES)
        self.assertVouches(signing, self.key, [*tls.certificate_names(self.cert), SUBDOMAIN])

    def test_own_certificate_verifies_for_each_name(self) -> None:
        """
        chatterd.crt, as both anchor and server certificate, verifies with
        OpenSSL (strict and not) and, for each of its names, with
        ``cryptography``; a name it does not hold fails.
        """
        for strict in (False, True):
            openssl_verify(self.cert, self.cert, strict=strict)
        names = tls.certificate_names(self.cert)
        self.assertTrue({"chat.example", "localhost", "203.0.113.7", "::1"} <= set(names))
        for name in names:
            cryptography_verify(self.cert, self.cert, name, anchor_as_leaf=True)
        for name in [*UNRELATED_NAMES, SUBDOMAIN]:
            self.assertRaises(
                verification.VerificationError, cryptography_verify, self.cert, self.cert, name, anchor_as_leaf=True
            )


class LegacyCertificateTests(SynchronousTestCase):
    """
    A certificate made by an older chatterd (one that can mint) is kept, since
    phones have it installed, with a warning that says how to re-issue it.
    """

    def setUp(self) -> None:
        self.certs = Path(self.mktemp())
        self.certs.mkdir()
        key = new_key()
        self.names = tls.default_names(["203.0.113.7", "198.51.100.77"])
        self.cert_path = write_pem(self.certs / tls.CERT_FILE, legacy_certificate(self.names, key))
        write_pem(self.certs / tls.KEY_FILE, key)
        self.before = self.cert_path.read_bytes()

    def test_is_legacy(self) -> None:
        """
        Only chatterd's old profile counts: not today's certificate, nor one
        with name constraints, nor a CA made some other way.
        """
        self.assertTrue(tls.is_legacy(tls.load_certificate(self.cert_path)))
        self.assertFalse(tls.is_legacy(x509.load_pem_x509_certificate(tls.make_certificate(["x"])[0])))
        key = new_key()
        self.assertFalse(tls.is_legacy(legacy_certificate(self.names, key, constrained=True)))
        self.assertFalse(tls.is_legacy(issue("Course CA", key, ca=True)))

    def test_start_warns_and_keeps_it(self) -> None:
        """
        At start (``ensure_certificate``), chatterd logs one warning with the
        command that re-issues it for the same names, and leaves the files as
        they are.
        """
        with capturedLogs() as events:
            _, _, made = tls.ensure_certificate(self.certs)
        self.assertFalse(made)
        self.assertEqual(self.cert_path.read_bytes(), self.before)
        warnings_ = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings_), 1)
        text = warnings_[0]["notice"]
        self.assertIn(f"chatterd-cert --certs {self.certs} --force", text)
        self.assertIn('--force --name 203.0.113.7 --name 198.51.100.77"', text)  # the host's own need none
        self.assertIn("any web site", text)
        self.assertIn("install the new chatterd.crt", text)

    def test_no_warning_for_a_new_certificate(self) -> None:
        """
        A certificate made by this chatterd draws no warning.
        """
        certs = Path(self.mktemp())
        tls.ensure_certificate(certs)
        with capturedLogs() as events:
            tls.ensure_certificate(certs)
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.warn], [])

    def test_command_line_warns_then_reissues(self) -> None:
        """
        ``chatterd-cert`` keeps the old certificate with a warning on stderr;
        with ``--force`` it makes one that cannot mint, and warns no more.
        """
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            self.assertEqual(tls.main(["--certs", str(self.certs)]), 0)
        self.assertIn("WARNING", err.getvalue())
        self.assertIn("--force", err.getvalue())
        self.assertEqual(self.cert_path.read_bytes(), self.before)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            self.assertEqual(tls.main(["--certs", str(self.certs), "--force", "--name", "203.0.113.7"]), 0)
        self.assertEqual(err.getvalue(), "")
        self.assertIn("every phone", out.getvalue())
        self.assertFalse(tls.is_legacy(tls.load_certificate(self.cert_path)))

    def test_help_explains_reissue(self) -> None:
        """
        ``chatterd-cert --help`` says that older certificates can mint, and
        that they need ``--force`` and a new install on every phone.
        """
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertRaises(SystemExit, tls.main, ["--help"])
        text = " ".join(out.getvalue().split())
        self.assertIn("older versions of chatterd can sign a certificate for any site", text)
        self.assertIn("--force", text)
        self.assertIn("every phone", text)


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


# --- listeners -------------------------------------------------------------------


def _site() -> Site:
    app = Klein()

    @app.route("/")
    def index(request: object) -> bytes:
        return b"hello"

    return Site(app.resource())


async def listen(case: TestCase, description: str, cert: Path, key: Path) -> int:
    """
    Serve ``description`` (with ``cert``/``key`` as chatterd's own pair) until
    the test ends; the port it listens on.
    """
    port = await tls.server_endpoint(reactor, description, cert, key).listen(_site())
    case.addCleanup(port.stopListening)
    return port.getHost().port  # type: ignore[no-any-return]


def accepted_suites(port: int, cafile: str) -> set[str]:
    """
    The TLS 1.2 suites the server at ``port`` takes, of all this client knows,
    offered one per handshake.
    """
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.set_ciphers("ALL:@SECLEVEL=0")
    accepted = set()
    for suite in {c["name"] for c in probe.get_ciphers() if c["protocol"] == "TLSv1.2"}:
        try:
            agreed = tlsclient.handshake(
                "127.0.0.1", port, cafile, maximum=ssl.TLSVersion.TLSv1_2, ciphers=f"{suite}:@SECLEVEL=0"
            )
        except ssl.SSLError:
            continue
        accepted.add(agreed.cipher)
    return accepted


#: Mozilla's "intermediate" TLS 1.2 suites for an ECDSA and an RSA key.
INTERMEDIATE_ECDSA = {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"}
INTERMEDIATE_RSA = {"ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"}

#: OpenSSL's default TLS 1.3 suites.
TLS13_SUITES = {"TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"}


class ListenerTests(TestCase):
    """
    A real TLS listener on 127.0.0.1 with chatterd's own certificate, and real
    clients that verify it.
    """

    async def setUp(self) -> None:  # type: ignore[override]
        self.certs = Path(self.mktemp())
        self.cert, self.key, _ = tls.ensure_certificate(self.certs, EXTRA_NAMES)
        self.port = await listen(self, "ssl:0:interface=127.0.0.1", self.cert, self.key)

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

    async def test_every_name_verifies(self) -> None:
        """
        A client that trusts only chatterd.crt verifies the server as each of
        the certificate's names, host names and addresses, with Python 3.13's
        strict checks and without them.
        """
        names = tls.certificate_names(tls.load_certificate(self.cert))

        def connect_as_each() -> list[tuple[str, bool]]:
            verified = []
            for name in names:
                for strict in (False, True):
                    tlsclient.handshake("127.0.0.1", self.port, str(self.cert), server_hostname=name, strict=strict)
                    verified.append((name, strict))
            return verified

        verified = await deferToThread(connect_as_each)
        self.assertEqual(len(verified), 2 * len(names))
        self.assertTrue({"chat.example", "localhost", "203.0.113.7", "::1"} <= set(names))

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
        self.assertEqual(agreed.version, "TLSv1.2")

    async def test_tls12_cbc_fails_and_aead_works(self) -> None:
        """
        TLS 1.2 with a CBC suite fails (the server alerts handshake_failure);
        with an AEAD suite with forward secrecy it works.
        """
        with self.assertRaises(ssl.SSLError) as caught:
            await deferToThread(
                tlsclient.handshake, "127.0.0.1", self.port, str(self.cert),
                maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA256",
            )
        self.assertIn("HANDSHAKE_FAILURE", str(caught.exception))
        agreed = await deferToThread(
            tlsclient.handshake, "127.0.0.1", self.port, str(self.cert),
            maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256",
        )
        self.assertEqual(agreed, ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"))

    async def test_tls12_takes_only_the_intermediate_suites(self) -> None:
        """
        Of every TLS 1.2 suite this client's OpenSSL knows (CBC, CCM, static
        RSA, ...), one per handshake, the server takes exactly Mozilla's
        intermediate suites for its ECDSA key.
        """
        accepted = await deferToThread(accepted_suites, self.port, str(self.cert))
        self.assertEqual(accepted, INTERMEDIATE_ECDSA)

    async def test_tls13_is_unchanged(self) -> None:
        """
        TLS 1.3 works, with OpenSSL's default suites.
        """
        agreed = await deferToThread(
            tlsclient.handshake, "127.0.0.1", self.port, str(self.cert), minimum=ssl.TLSVersion.TLSv1_3
        )
        self.assertEqual(agreed.version, "TLSv1.3")
        self.assertIn(agreed.cipher, TLS13_SUITES)

    async def test_wrong_name_fails_verification(self) -> None:
        """
        Host name checking is really on: a name not in the certificate fails.
        """
        ctx = tlsclient.context(str(self.cert))

        def connect() -> None:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
                ctx.wrap_socket(raw, server_hostname="not-this-host.example").close()

        with self.assertRaises(ssl.SSLCertVerificationError):
            await deferToThread(connect)


class OwnCertificateListenerTests(TestCase):
    """
    ``ssl:`` listeners with the operator's own certificate: a leaf signed by an
    intermediate CA, served with its chain (``privateKey``, ``certKey``,
    ``extraCertChain``), and an RSA certificate and key in one PEM file
    (``privateKey`` alone).
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        root_key, intermediate_key, leaf_key = new_key(), new_key(), new_key()
        root = issue("Course Root CA", root_key, ca=True)
        intermediate = issue("Course Intermediate CA", intermediate_key, (root, root_key), ca=True)
        leaf = issue("chat.example", leaf_key, (intermediate, intermediate_key), sans=["chat.example", "127.0.0.1"])
        self.root = write_pem(self.dir / "root.pem", root)
        self.key = write_pem(self.dir / "leaf.key", leaf_key)
        self.leaf = write_pem(self.dir / "leaf.pem", leaf)
        self.chain = write_pem(self.dir / "chain.pem", intermediate)
        # chatterd's own pair, which these listeners must not use
        self.own_cert, self.own_key, _ = tls.ensure_certificate(self.dir / "certs")

    async def test_extra_cert_chain_is_served(self) -> None:
        """
        A client that trusts only the root verifies the leaf, for its names
        and with strict checks on and off, through the intermediate that
        chatterd serves.
        """
        port = await listen(
            self, f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.leaf}:extraCertChain={self.chain}",
            self.own_cert, self.own_key,
        )

        def connect() -> None:
            for name in ("127.0.0.1", "chat.example"):
                for strict in (False, True):
                    tlsclient.handshake("127.0.0.1", port, str(self.root), server_hostname=name, strict=strict)

        await deferToThread(connect)
        reply = await deferToThread(tlsclient.h2_request, "127.0.0.1", port, "/", str(self.root))
        self.assertEqual((reply.alpn, reply.status, reply.body), ("h2", 200, b"hello"))

    async def test_without_the_chain_the_leaf_does_not_verify(self) -> None:
        """
        The same leaf served without ``extraCertChain`` fails verification: the
        chain above is what chatterd sent.
        """
        port = await listen(
            self, f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.leaf}", self.own_cert, self.own_key
        )
        with self.assertRaises(ssl.SSLCertVerificationError) as caught:
            await deferToThread(tlsclient.handshake, "127.0.0.1", port, str(self.root))
        self.assertIn("unable to get local issuer certificate", str(caught.exception))

    async def test_private_key_alone(self) -> None:
        """
        ``privateKey=`` alone names a PEM file holding both the key and the
        certificate (here RSA); TLS 1.2 then takes only the intermediate
        suites for RSA, so no static RSA key exchange.
        """
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = issue("127.0.0.1", key)
        both = write_pem(self.dir / "both.pem", key, cert)
        cafile = str(write_pem(self.dir / "rsa.pem", cert))
        port = await listen(self, f"ssl:0:interface=127.0.0.1:privateKey={both}", self.own_cert, self.own_key)
        reply = await deferToThread(tlsclient.https_request, "127.0.0.1", port, "/", cafile)
        self.assertEqual((reply.status, reply.body), (200, b"hello"))
        self.assertEqual(await deferToThread(accepted_suites, port, cafile), INTERMEDIATE_RSA)
