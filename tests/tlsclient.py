"""
Blocking HTTPS clients for tests, run in a thread: one speaks HTTP/2 (with the
``h2`` library), one HTTP/1.1 (``http.client``).  Both verify the server's
certificate against a given CA file with host name checking on, as a phone
that installed chatterd's certificate does.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import h2.config
import h2.connection
import h2.events


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    alpn: str | None
    version: str | None = None
    chunks: list[bytes] = field(default_factory=list)


class Agreed(NamedTuple):
    version: str
    cipher: str


#: What Python 3.13's ``ssl.create_default_context`` adds to the verify flags.
STRICT = ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN


def context(
    cafile: str, *, alpn: list[str] | None = None, maximum: ssl.TLSVersion | None = None,
    strict: bool = False,
) -> ssl.SSLContext:
    """
    A client context that trusts only ``cafile`` and checks host names;
    ``strict`` verifies as Python 3.13 does by default (:data:`STRICT`).
    """
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = True
    if strict:
        ctx.verify_flags |= STRICT
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = maximum
    return ctx


def h2_request(
    host: str, port: int, path: str, cafile: str, *, method: str = "GET", body: bytes = b"",
    headers: dict[str, str] | None = None, timeout: float = 20.0,
) -> Reply:
    """
    One HTTP/2 request over TLS with ALPN ``h2``; the body's DATA frames are
    kept in ``chunks`` as they arrived.
    """
    ctx = context(cafile, alpn=["h2", "http/1.1"])
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as sock:
            alpn = sock.selected_alpn_protocol()
            if alpn != "h2":
                return Reply(0, {}, b"", alpn)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            stream = conn.get_next_available_stream_id()
            request_headers = [(":method", method), (":path", path), (":scheme", "https"), (":authority", f"{host}:{port}")]
            request_headers += list((headers or {}).items())
            if body:
                request_headers.append(("content-length", str(len(body))))
            conn.send_headers(stream, request_headers, end_stream=not body)
            if body:
                conn.send_data(stream, body, end_stream=True)
            sock.sendall(conn.data_to_send())
            reply = Reply(0, {}, b"", alpn, "HTTP/2")
            ended = False
            while not ended:
                data = sock.recv(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        hs = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v for k, v in event.headers}
                        reply.status = int(hs.pop(":status"))
                        reply.headers = hs
                    elif isinstance(event, h2.events.DataReceived):
                        reply.chunks.append(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        ended = True
                sock.sendall(conn.data_to_send())
            reply.body = b"".join(reply.chunks)
            return reply


def https_request(
    host: str, port: int, path: str, cafile: str, *, method: str = "GET", body: bytes | None = None,
    headers: dict[str, str] | None = None, timeout: float = 20.0,
) -> Reply:
    """
    One HTTP/1.1 request over TLS, verifying the certificate for ``host``.
    """
    conn = http.client.HTTPSConnection(host, port, context=context(cafile), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        alpn = conn.sock.selected_alpn_protocol() if conn.sock else None
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data, alpn, "HTTP/1.1")
    finally:
        conn.close()


def handshake(
    host: str, port: int, cafile: str, *, maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    minimum: ssl.TLSVersion | None = None, ciphers: str | None = None,
    server_hostname: str | None = None, strict: bool = False,
) -> Agreed:
    """
    A bare TLS handshake to ``host`` between ``minimum`` and ``maximum``,
    offering only ``ciphers`` (OpenSSL's names, TLS 1.2 and older) if given,
    and verifying the certificate for ``server_hostname`` (default ``host``).

    :raises ssl.SSLError: if the server refuses it or verification fails.
    """
    with warnings.catch_warnings():  # ssl warns that TLS 1.0/1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = context(cafile, maximum=maximum, strict=strict)
        if minimum is not None:
            ctx.minimum_version = minimum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    elif maximum < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection((host, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname or host) as sock:
            cipher = sock.cipher()
            return Agreed(str(sock.version()), cipher[0] if cipher else "")
