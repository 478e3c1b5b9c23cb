"""The proxy's connection to the real IMAP server, and what it learns about the server.

:class:`UpstreamProtocol` is a thin Twisted protocol: bytes go to its session, the
session writes through it.  Capability handling lives here too, since it is the one
place where the proxy deliberately changes what the server says (RFC 3501 7.2.1).

Not guaranteed: capabilities are filtered by name; an extension the server announces
under a name unknown here passes through (add it to :data:`REMOVED` when it turns out
to let content bypass the proxy).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from smimeproxy.sockets import write_now

if TYPE_CHECKING:  # pragma: no cover
    from smimeproxy.imap.session import ProxySession

#: Capabilities the proxy cannot honour or that would let content bypass it:
#: COMPRESS (RFC 4978) would hide the stream; NOTIFY (RFC 5465) pushes unsolicited FETCH
#: bodies; CATENATE (RFC 4469) / URLAUTH (RFC 4467) build Sent messages server-side;
#: UTF8=ACCEPT/ONLY (RFC 6855) changes APPEND syntax; STARTTLS/LOGINDISABLED are the
#: proxy's own to announce (they concern the client link, not the upstream one).
REMOVED = (
    b"COMPRESS=",
    b"NOTIFY",
    b"CATENATE",
    b"URLAUTH",
    b"UTF8=",
    b"STARTTLS",
    b"LOGINDISABLED",
    b"AUTH=",
    b"X-DOVECOT-",
    b"XAPPLEPUSHSERVICE",
)
#: SASL mechanisms whose login name the proxy can read (RFC 4616).
KEPT_AUTH = (b"AUTH=PLAIN",)

_CAPS_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_CAPS_UNTAGGED = re.compile(rb"^\* CAPABILITY (.*?)\r?\n?\Z", re.IGNORECASE | re.DOTALL)


def filter_capabilities(
    caps: Iterable[bytes], *, starttls: bool, logindisabled: bool
) -> list[bytes]:
    """The capability list the client sees."""
    out = []
    for cap in caps:
        upper = cap.upper()
        if upper in KEPT_AUTH:
            out.append(cap)
        elif not any(upper.startswith(prefix) for prefix in REMOVED):
            out.append(cap)
    if starttls:
        out.append(b"STARTTLS")
    if logindisabled:
        out.append(b"LOGINDISABLED")
    return out


def rewrite_capability_line(line: bytes, *, starttls: bool, logindisabled: bool) -> bytes:
    """``line`` with any capability list in it filtered (greeting, tagged OK, untagged)."""
    match = _CAPS_UNTAGGED.match(line)
    if match:
        caps = filter_capabilities(
            match.group(1).split(), starttls=starttls, logindisabled=logindisabled
        )
        return b"* CAPABILITY " + b" ".join(caps) + b"\r\n"

    def repl(m: re.Match[bytes]) -> bytes:
        caps = filter_capabilities(
            m.group(1).split(), starttls=starttls, logindisabled=logindisabled
        )
        return b"[CAPABILITY " + b" ".join(caps) + b"]"

    return _CAPS_CODE.sub(repl, line)


def capabilities_in(line: bytes) -> list[bytes] | None:
    """The raw capability list a response line carries, if any (upper-cased)."""
    match = _CAPS_UNTAGGED.match(line)
    if match:
        return match.group(1).upper().split()
    code = _CAPS_CODE.search(line)
    if code:
        return code.group(1).upper().split()
    return None


class UpstreamProtocol(Protocol):
    """Bytes from the server go to the session; nothing else happens here."""

    def __init__(self, session: ProxySession):
        self.session = session

    def connectionMade(self) -> None:
        self.session.upstream_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.session.upstream_data(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.session.upstream_lost(reason)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            write_now(self.transport, data)
