# -*- test-case-name: tests.test_tls -*-
"""
chatterd's certificate and TLS listeners.

The course's phones reach chatterd by IP address and trust a self-signed
certificate that the user installs on the phone.  So the certificate must be a
CA (phones install it as one), name every address the server may be reached by
in its subjectAltName, and live no longer than 825 days (iOS refuses more).

A phone trusts such a CA for every certificate it signs, so chatterd's cannot
sign any: its key usage lacks ``keyCertSign``, and critical name constraints
permit only its own names and addresses.  Verifiers differ in which of the two
they honour in a trust anchor (OpenSSL, ``cryptography`` and iOS honour both;
Android neither: see the README).  Older chatterd certificates have neither
limit (see :func:`legacy_warning`).

Run ``chatterd-cert --name 203.0.113.7 --force`` (or ``python -m chatterd.tls``)
to make one for a public IP without starting the server.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import ipaddress
import os
import socket
import struct
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import endpoints, interfaces, ssl
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from chatterd.clients import ConnectionLimit
from chatterd.eager import eager_reactor

log = Logger()

CERT_FILE = "chatterd.crt"
KEY_FILE = "chatterd.key"
VALIDITY_DAYS = 825

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class CertificateError(Exception):
    """
    The certificate directory holds something chatterd cannot use.
    """


# --- names and addresses -------------------------------------------------------


def _interface_ipv4() -> list[IPAddress]:
    """
    The IPv4 address of every network interface (Linux ``SIOCGIFADDR``).
    """
    found: list[IPAddress] = []
    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            found.append(ipaddress.IPv4Address(packed[20:24]))
    return found


def _interface_ipv6() -> list[IPAddress]:
    """
    The IPv6 addresses of every interface, from ``/proc/net/if_inet6``, except
    link-local ones (they need a zone and phones cannot use them in a URL).
    """
    try:
        text = Path("/proc/net/if_inet6").read_text()
    except OSError:
        return []
    found: list[IPAddress] = []
    for row in text.splitlines():
        address = ipaddress.IPv6Address(int(row.split()[0], 16))
        if not address.is_link_local:
            found.append(address)
    return found


def host_addresses() -> list[IPAddress]:
    """
    Loopback, the addresses of every interface, and what the host name resolves to.
    """
    found: list[IPAddress] = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    try:
        found += _interface_ipv4() + _interface_ipv6()
    except OSError:
        pass
    try:
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None):
            found.append(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]))
    except (OSError, ValueError):
        pass
    return list(dict.fromkeys(found))


def host_names() -> list[str]:
    """
    ``localhost``, the host name and the fully qualified host name.
    """
    names = ["localhost", socket.gethostname(), socket.getfqdn()]
    return [n for n in dict.fromkeys(names) if n and n.isascii() and "." != n[0]]


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _name_constraints(names: Sequence[x509.GeneralName]) -> x509.NameConstraints:
    """
    Permit exactly ``names``: each host name (and, as RFC 5280 has it, its
    subdomains) and each address as a /32 or /128.  A name form the certificate
    does not use is limited to loopback, so that no form is left unconstrained.
    """
    dns = [n for n in names if isinstance(n, x509.DNSName)] or [x509.DNSName("localhost")]
    ips = [ipaddress.ip_network(n.value) for n in names if isinstance(n, x509.IPAddress)]
    ips = ips or [ipaddress.ip_network("127.0.0.1")]
    return x509.NameConstraints(permitted_subtrees=[*dns, *map(x509.IPAddress, ips)], excluded_subtrees=None)


# --- making and loading certificates ------------------------------------------


def make_certificate(
    names: Iterable[str],
    *,
    now: datetime.datetime | None = None,
    days: int = VALIDITY_DAYS,
) -> tuple[bytes, bytes]:
    """
    Make a self-signed P-256 certificate for ``names`` (host names or IP addresses).

    It is a CA, so that phones install it as one, but it cannot vouch for any
    other certificate: no ``keyCertSign`` (hence no path length either, which
    RFC 5280 allows only with it) and critical name constraints that permit
    only ``names``.

    :returns: ``(certificate PEM, private key PEM)``.
    """
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError("a certificate needs at least one name")
    if not 1 <= days <= VALIDITY_DAYS:
        raise ValueError(f"validity must be 1..{VALIDITY_DAYS} days (iOS refuses longer)")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    general_names = [_general_name(n) for n in names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days) - datetime.timedelta(minutes=5))
        .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_name_constraints(general_names), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write(path: Path, data: bytes, mode: int) -> None:
    """
    Write ``data`` to ``path`` atomically, created with ``mode`` from the start.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def default_names(extra: Sequence[str] = ()) -> list[str]:
    """
    What a generated certificate covers: ``extra`` first (the first one also
    becomes the common name), then the host's names and addresses.
    """
    return list(dict.fromkeys([*extra, *host_names(), *map(str, host_addresses())]))


def ensure_certificate(
    certs: Path | str, names: Sequence[str] = (), *, force: bool = False
) -> tuple[Path, Path, bool]:
    """
    Make ``chatterd.crt`` and ``chatterd.key`` in ``certs`` unless both exist.

    An existing pair is never replaced without ``force`` (phones have that
    certificate installed); if an older chatterd made it, a warning says how
    to re-issue it (:func:`legacy_warning`).

    :param names: extra names (``--cert-name``) besides the host's own.
    :param force: replace an existing pair.
    :returns: ``(certificate path, key path, whether they were made now)``.
    :raises CertificateError: if only one of the two files exists.
    """
    certs = Path(certs)
    cert_path, key_path = certs / CERT_FILE, certs / KEY_FILE
    if not force:
        have = cert_path.exists(), key_path.exists()
        if all(have):
            warning = legacy_warning(load_certificate(cert_path), certs)
            if warning:
                log.warn("{notice}", notice=warning)
            return cert_path, key_path, False
        if any(have):
            present, missing = (cert_path, key_path) if have[0] else (key_path, cert_path)
            raise CertificateError(
                f"{present} exists but {missing} does not: restore it, or make a new pair "
                f"with: chatterd-cert --certs {certs} --force"
            )
    certs.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = make_certificate(default_names(names))
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert_pem, 0o644)
    return cert_path, key_path, True


def load_certificate(path: Path | str) -> x509.Certificate:
    """
    Read a PEM certificate.
    """
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def fingerprint(cert: x509.Certificate) -> str:
    """
    The SHA-256 fingerprint as phones and browsers show it: ``AB:CD:...``.
    """
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def is_legacy(cert: x509.Certificate) -> bool:
    """
    Whether an older chatterd made ``cert``: a self-signed CA with path length
    0, ``keyCertSign``, server-auth only, and no name constraints.  Every phone
    that installed it trusts whatever its key signs, for any name.
    """
    constraints, usage, eku = (
        _extension(cert, kind)
        for kind in (x509.BasicConstraints, x509.KeyUsage, x509.ExtendedKeyUsage)
    )
    return (
        cert.issuer == cert.subject
        and constraints is not None and constraints.value.ca and constraints.value.path_length == 0
        and usage is not None and usage.value.key_cert_sign
        and eku is not None and list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
        and _extension(cert, x509.NameConstraints) is None
    )


def legacy_warning(cert: x509.Certificate, certs: Path | str) -> str | None:
    """
    What to tell the operator about a certificate made by an older chatterd
    (:func:`is_legacy`), with the command that re-issues it for the same
    names; ``None`` for any other certificate.
    """
    if not is_legacy(cert):
        return None
    host = set(default_names())
    extra = "".join(f" --name {n}" for n in certificate_names(cert) if n not in host)
    return (
        f"{Path(certs) / CERT_FILE} was made by an older chatterd: it can sign certificates "
        "for any web site, and every phone that trusts it would trust those too, so anyone "
        f"who copies {KEY_FILE} could intercept those phones' traffic to any site. Re-issue it "
        f'with "chatterd-cert --certs {certs} --force{extra}", restart chatterd, then on every '
        "phone remove the old certificate and install the new chatterd.crt."
    )


def certificate_names(cert: x509.Certificate) -> list[str]:
    """
    The host names and addresses in the certificate's subjectAltName.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(a) for a in san.get_values_for_type(x509.IPAddress)
    ]


# --- TLS listeners -------------------------------------------------------------

#: TLS 1.2 cipher suites: Mozilla's "intermediate" profile, that is ECDHE key
#: exchange (forward secrecy) with AES-GCM or ChaCha20-Poly1305 (AEAD), for
#: ECDSA and RSA certificates.  Its DHE suites are left out: they need DH
#: parameters, cost more, and every phone the course supports has ECDHE.
#: TLS 1.3 suites are set apart by OpenSSL and stay at its defaults.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])


def certificate_options(
    cert_path: Path | str, key_path: Path | str, chain_path: Path | str | None = None
) -> ssl.CertificateOptions:
    """
    TLS settings for the server: TLS 1.2 or newer, TLS 1.2 with only
    :data:`TLS12_CIPHERS`, ALPN ``h2`` and ``http/1.1``.

    Built from ``cryptography`` objects: Twisted's own ``ssl:`` parser hands
    pyOpenSSL ``X509``/``PKey`` objects to pyOpenSSL, which prints a
    deprecation warning on the first handshake.  (ALPN is offered by Twisted
    itself, because ``Site`` provides ``IProtocolNegotiationFactory``.)
    """
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    chain = []
    if chain_path is not None:
        chain = x509.load_pem_x509_certificates(Path(chain_path).read_bytes())
    return ssl.CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=load_certificate(cert_path),  # type: ignore[arg-type]
        extraCertChain=chain or None,  # type: ignore[arg-type]
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
    )


def parse_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split a Twisted endpoint description into positional and keyword parts,
    honouring ``\\:`` escapes, as ``serverFromString`` does.
    """
    parts, current, escaped = [], "", False
    for ch in description:
        if escaped:
            current, escaped = current + ch, False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if eq:
            kwargs[key] = value
        else:
            args.append(part)
    return args, kwargs


_SSL_KEYS = ("port", "privateKey", "certKey")

#: Connections the kernel queues for ``accept`` (Twisted's default is 50).  A
#: burst of phones (a class starting at once, or reconnecting after a network
#: blip) overflows a short queue while the reactor is busy, and each SYN the
#: kernel drops costs that phone a second before it retries.
DEFAULT_BACKLOG = 1024


@implementer(interfaces.IStreamServerEndpoint)
class _TLSServerEndpoint:
    """
    TLS over another server endpoint (an inherited socket's, say): Twisted
    wraps clients' endpoints (``wrapClientTLS``) but not servers'.
    """

    def __init__(self, endpoint: interfaces.IStreamServerEndpoint, options: ssl.CertificateOptions) -> None:
        self._endpoint = endpoint
        self._options = options

    def listen(self, factory: Any) -> Any:
        return self._endpoint.listen(TLSMemoryBIOFactory(self._options, False, factory))


def server_endpoint(
    reactor: object, description: str, cert_path: Path, key_path: Path, limit: ConnectionLimit | None = None,
    inherited: tuple[int, int] | None = None,
) -> interfaces.IStreamServerEndpoint:
    """
    The listening endpoint for one ``--listen`` description.

    ``ssl:`` descriptions are served with :func:`certificate_options`; one that
    names no ``privateKey`` uses ``cert_path``/``key_path``.  Any other
    description (``tcp:``, ``unix:``, ...) goes to ``serverFromString`` as is.
    ``tcp:`` and ``ssl:`` listen with :class:`chatterd.eager.EagerPort`, and
    with a backlog of :data:`DEFAULT_BACKLOG` unless the description gives one;
    they refuse at accept the connections that ``limit`` has no room for.

    :param inherited: a worker's listening socket for this description,
        bound by its parent (``(descriptor, address family)``): the endpoint
        then takes it up with Twisted's ``adoptStreamPort`` instead of binding.
    """
    args, kwargs = parse_description(description)
    if inherited is not None:
        if args[0] not in ("tcp", "ssl"):
            raise ValueError(f"only tcp: and ssl: listeners can be shared by workers, not {args[0]}:")
        adopted = endpoints.AdoptedStreamServerEndpoint(eager_reactor(reactor, limit), *inherited)
        if args[0] == "tcp":
            return adopted
    if args[0] != "ssl":
        if args[0] == "tcp":
            reactor = eager_reactor(reactor, limit)
            if "backlog" not in kwargs:
                description += f":backlog={DEFAULT_BACKLOG}"
        return endpoints.serverFromString(reactor, description)
    for name, value in zip(_SSL_KEYS, args[1:]):
        kwargs.setdefault(name, value)
    if len(args) > 1 + len(_SSL_KEYS):
        raise ValueError(f"too many positional parts in {description!r}")
    unknown = set(kwargs) - {*_SSL_KEYS, "extraCertChain", "interface", "backlog"}
    if unknown or "port" not in kwargs:
        raise ValueError(
            f"bad listen description {description!r}: ssl takes a port and optionally "
            "interface, backlog, privateKey, certKey and extraCertChain"
            + (f" (not {', '.join(sorted(unknown))})" if unknown else "")
        )
    if "privateKey" in kwargs:
        key_path = Path(kwargs["privateKey"])
        cert_path = Path(kwargs.get("certKey", kwargs["privateKey"]))
    options = certificate_options(cert_path, key_path, kwargs.get("extraCertChain"))
    if inherited is not None:
        return _TLSServerEndpoint(adopted, options)
    return endpoints.SSL4ServerEndpoint(
        eager_reactor(reactor, limit),
        int(kwargs["port"]),
        options,
        backlog=int(kwargs.get("backlog", DEFAULT_BACKLOG)),
        interface=kwargs.get("interface", ""),
    )


# --- command line --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """
    ``chatterd-cert``: make (or remake) chatterd's certificate without starting it.
    """
    parser = argparse.ArgumentParser(
        prog="chatterd-cert",
        description="Make chatterd's self-signed certificate (chatterd.crt, chatterd.key).",
        epilog=(
            "The certificate cannot sign other certificates and is limited to its own names. "
            "Certificates made by older versions of chatterd can sign a certificate for any "
            "site, which every phone that trusts them would accept: re-issue such a "
            "certificate with --force (and the same --name options), then install the new "
            "chatterd.crt on every phone and remove the old one."
        ),
    )
    parser.add_argument("--certs", default="certs", help="directory for the files (default: certs)")
    parser.add_argument(
        "--name", "--cert-name", action="append", default=[], dest="names",
        help="a host name or IP address to cover, e.g. the server's public IP (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing certificate")
    options = parser.parse_args(argv)
    try:
        cert_path, _, made = ensure_certificate(options.certs, options.names, force=options.force)
    except (CertificateError, OSError, ValueError) as e:
        print(f"chatterd-cert: {e}", file=sys.stderr)
        return 1
    cert = load_certificate(cert_path)
    verb = "made" if made else "kept existing (use --force to replace)"
    print(f"{verb}: {cert_path}")
    print(f"SHA-256 fingerprint: {fingerprint(cert)}")
    print(f"valid until: {cert.not_valid_after_utc:%Y-%m-%d}; names: {', '.join(certificate_names(cert))}")
    if made:
        print("Install this chatterd.crt on every phone (and remove any older one), then (re)start chatterd.")
    warning = legacy_warning(cert, options.certs)
    if warning:
        print(f"chatterd-cert: WARNING: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
