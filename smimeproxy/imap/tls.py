"""TLS for the IMAP proxy: STARTTLS towards clients (RFC 3501 6.2.1 / RFC 8314) and
towards the server, with the server's identity checked by service-identity (through
Twisted's ``optionsForClientTLS``).

Not guaranteed: client certificates; the opportunistic upstream mode does not protect
against an attacker who strips STARTTLS from the server's capabilities (use
``upstream_tls = "starttls"`` or an implicit-TLS upstream for that).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import ssl
from twisted.internet.defer import Deferred

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
    except (OSError, ValueError) as exc:
        raise ConfigError(f"imap.tls_certificate / imap.tls_key: {exc}") from exc
    return cert.options()


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
