"""TLS for the IMAP proxy: STARTTLS towards clients (RFC 3501 6.2.1 / RFC 8314) and
towards the server, with the server's identity checked by service-identity (through
Twisted's ``optionsForClientTLS``).

An implicit-TLS listener (``ssl:`` in ``[imap] listen``) is a TCP listener wrapped in
TLS whose context :class:`ReloadableServerTLS` holds, so a reload that reads new
certificate files applies to the next handshake.

Not guaranteed: client certificates; the opportunistic upstream mode does not protect
against an attacker who strips STARTTLS from the server's capabilities (use
``upstream_tls = "starttls"`` or an implicit-TLS upstream for that).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from smimeproxy.errors import ConfigError, UpstreamError

if TYPE_CHECKING:  # pragma: no cover
    from smimeproxy.imap.upstream import UpstreamProtocol


def server_tls_options(imap: Any) -> Any:
    """Options for STARTTLS towards clients, or None when no certificate is configured."""
    if not imap.tls_certificate or not imap.tls_key:
        return None
    try:
        cert = ssl.PrivateCertificate.loadPEM(
            imap.tls_certificate.read_text() + imap.tls_key.read_text()
        )
    except (OSError, ValueError, crypto.Error) as exc:
        raise ConfigError(f"imap.tls_certificate / imap.tls_key: {exc}") from exc
    return cert.options()


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """The TLS of an implicit-TLS (``ssl:``) listener, replaceable on reload: each new
    handshake takes the context of the current ``options``; connections already made
    keep theirs."""

    def __init__(self, options: Any):
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL import SSL

        return SSL.Connection(self.options.getContext(), None)


def implicit_tls_listener(listen: str) -> tuple[str, Any]:
    """An ``ssl:`` listen string as ``(tcp: string for the same port, interface and
    backlog, CertificateOptions read from its files now)``, built as Twisted's
    ``serverFromString`` builds them (``certKey`` defaults to ``privateKey``;
    ``extraCertChain``, ``dhParameters`` and ``sslmethod`` as there).  ConfigError when
    a file cannot be read or does not hold what it should."""
    import re

    from smimeproxy.endpoints import parse_endpoint

    params = dict(parse_endpoint(listen, "server").params)

    def escaped(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")

    tcp = "tcp:" + escaped(params["port"])
    for name in ("interface", "backlog"):
        if params.get(name):
            tcp += f":{name}={escaped(params[name])}"
    key_file = params["privateKey"]
    cert_file = params.get("certKey") or key_file
    try:
        with open(cert_file, "rb") as f:
            cert_pem = f.read()
        with open(key_file, "rb") as f:
            key_pem = f.read()
        private = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        chain = None
        if params.get("extraCertChain"):
            with open(params["extraCertChain"], "rb") as f:
                text = f.read().decode("ascii", "replace")
            found = re.findall(
                r"(-----BEGIN CERTIFICATE-----\n.+?\n-----END CERTIFICATE-----)", text, re.DOTALL
            )
            if not found:
                raise ValueError("no certificate in extraCertChain")
            chain = [ssl.Certificate.loadPEM(pem).original for pem in found]
        dh = None
        if params.get("dhParameters"):
            from twisted.python.filepath import FilePath

            dh = ssl.DiffieHellmanParameters.fromFile(FilePath(params["dhParameters"]))
        extra: dict[str, Any] = {}
        if params.get("sslmethod"):
            extra["method"] = getattr(ssl.SSL, params["sslmethod"])
        options = ssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            extraCertChain=chain,
            dhParameters=dh,
            **extra,
        )
        options.getContext()  # a key that does not match its certificate fails here
    except (OSError, ValueError, AttributeError, ssl.SSL.Error, crypto.Error) as exc:
        raise ConfigError(f"imap.listen {listen.split(':', 1)[0]}: TLS files: {exc}") from exc
    return tcp, options


def client_tls_options(imap: Any) -> Any:
    """Options for TLS to the server: hostname checked, CA bundle or the system's."""
    host = imap.upstream_tls_hostname
    if not host:
        parts = imap.upstream.split(":")
        host = parts[1] if len(parts) > 1 else "localhost"
    trust = None
    if imap.upstream_ca_file:
        try:
            trust = ssl.Certificate.loadPEM(imap.upstream_ca_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"imap.upstream_ca_file: {exc}") from exc
    return ssl.optionsForClientTLS(host, trustRoot=trust)


def upstream_starttls(
    options: Any, *, required: bool
) -> Callable[[UpstreamProtocol], Deferred[Any]]:
    """What the session runs after the server's greeting: STARTTLS if offered (or, when
    ``required``, fail), then CAPABILITY again."""

    async def run(upstream: UpstreamProtocol) -> None:
        session = upstream.session
        if b"STARTTLS" not in session.upstream_caps:
            caps = await session.command(b"CAPABILITY")
            del caps
        if b"STARTTLS" not in session.upstream_caps:
            if required:
                raise UpstreamError("the upstream server does not offer STARTTLS")
            return
        result = await session.command(b"STARTTLS")
        if not result.ok:
            raise UpstreamError("the upstream server refused STARTTLS")
        session.restart_upstream_parser()
        upstream.transport.startTLS(options)
        session.upstream_caps = set()
        await session.command(b"CAPABILITY")

    def start(upstream: UpstreamProtocol) -> Deferred[Any]:
        return Deferred.fromCoroutine(run(upstream))

    return start
