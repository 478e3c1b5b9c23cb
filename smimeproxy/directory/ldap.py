"""A read-only LDAP directory of certificates (ldaptor), for mail clients that look a
recipient's certificate up by LDAP (Thunderbird, Outlook, Apple Mail).

A search whose filter names addresses by equality (``(mail=alice@acme.test)``, also
inside ``&``/``|``, attribute ``mail``, ``email`` or ``rfc822Mailbox``) returns, for
each address we publish, one entry ``mail=<address>,dc=<domain labels>`` with
``objectClass``, ``mail``, ``cn``, ``userCertificate;binary`` (the DER certificates,
RFC 4523) and ``userSMIMECertificate`` (a PKCS#7 certs-only SignedData, RFC 2798
section 9.1.2). Only the requested attributes are sent (all without a list or
with ``*``). The base DN is not checked: clients are configured with all sorts.

What is *not* offered: enumeration (substring, presence and other filters find
nothing, so the directory does not list the organisation's users), binds other than
anonymous (no entry has a password: invalidCredentials), any write (unwillingToPerform).
Malformed BER closes the connection (RFC 4511 section 4.1.1 allows nothing better);
an error while answering becomes a result code, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ldaptor.protocols import pureber, pureldap
from ldaptor.protocols.ldap import ldaperrors
from ldaptor.protocols.ldap.ldapserver import BaseLDAPServer
from twisted.internet import protocol
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from smimeproxy.directory.http import p7c_body
from smimeproxy.directory.publication import LivePublication, Published

__all__ = ["CertificateLDAPFactory", "CertificateLDAPServer", "addresses_in"]

_MAIL_ATTRIBUTES = {b"mail", b"email", b"rfc822mailbox"}
_MAX_ADDRESSES = 50  # per search: a filter listing more is answered for the first 50


def addresses_in(filter_: Any) -> Iterator[str]:
    """The addresses an LDAP filter asks for by equality on a mail attribute."""
    if isinstance(filter_, pureldap.LDAPFilter_equalityMatch):
        name = bytes(filter_.attributeDesc.value).lower()
        if name in _MAIL_ATTRIBUTES:
            try:
                yield bytes(filter_.assertionValue.value).decode("utf-8").strip().lower()
            except UnicodeDecodeError:
                return
    elif isinstance(filter_, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
        for part in filter_:
            yield from addresses_in(part)


def _entry_dn(address: str) -> str:
    domain = address.rpartition("@")[2]
    escaped = address.replace("\\", "\\5c").replace(",", "\\2c").replace("+", "\\2b")
    return ",".join([f"mail={escaped}", *(f"dc={label}" for label in domain.split("."))])


def _attributes(published: Published, wanted: list[bytes]) -> list[tuple[bytes, list[bytes]]]:
    from cryptography.hazmat.primitives import serialization

    ders = [c.public_bytes(serialization.Encoding.DER) for c in published.certificates]
    every = [
        (b"objectClass", [b"top", b"inetOrgPerson"]),
        (b"mail", [published.address.encode()]),
        (b"cn", [published.address.encode()]),
        (b"userCertificate;binary", ders),
        (b"userSMIMECertificate", [p7c_body(published)]),
    ]
    names = {w.lower() for w in wanted}
    if not names or b"*" in names:
        return every
    # "userCertificate" asked without ";binary" gets the same values (RFC 4522)
    if b"usercertificate" in names:
        names.add(b"usercertificate;binary")
    return [(k, v) for k, v in every if k.lower() in names]


#: seconds an LDAP connection may stay silent before it is closed
LDAP_IDLE_TIMEOUT = 120


class CertificateLDAPServer(BaseLDAPServer, TimeoutMixin):
    """One LDAP connection; see the module docstring. A connection silent for
    :data:`LDAP_IDLE_TIMEOUT` seconds is closed."""

    _log = Logger()

    def __init__(self, live: LivePublication) -> None:
        super().__init__()
        self.live = live

    def connectionMade(self) -> None:
        super().connectionMade()
        self.setTimeout(LDAP_IDLE_TIMEOUT)

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        try:
            super().dataReceived(data)
        except (pureber.BERException, ValueError, TypeError, AssertionError, IndexError) as e:
            self._log.info("malformed LDAP message ({error}); closing", error=type(e).__name__)
            self.buffer = b""
            if self.transport is not None:
                self.transport.loseConnection()

    fail_LDAPBindRequest = pureldap.LDAPBindResponse

    def handle_LDAPBindRequest(self, request: Any, controls: Any, reply: Any) -> Any:
        if request.version != 3:
            raise ldaperrors.LDAPProtocolError(f"version {request.version} not supported")
        self.checkControls(controls)
        if request.dn:
            raise ldaperrors.LDAPInvalidCredentials("only anonymous binds")
        return pureldap.LDAPBindResponse(resultCode=ldaperrors.Success.resultCode)

    def handle_LDAPUnbindRequest(self, request: Any, controls: Any, reply: Any) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    fail_LDAPSearchRequest = pureldap.LDAPSearchResultDone

    def handle_LDAPSearchRequest(self, request: Any, controls: Any, reply: Any) -> Any:
        self.checkControls(controls)
        if request.baseObject == b"" and request.scope == pureldap.LDAP_SCOPE_baseObject:
            reply(
                pureldap.LDAPSearchResultEntry(
                    objectName="",
                    attributes=[(b"supportedLDAPVersion", [b"3"])],
                )
            )
            return pureldap.LDAPSearchResultDone(resultCode=ldaperrors.Success.resultCode)
        wanted = list(dict.fromkeys(addresses_in(request.filter)))[:_MAX_ADDRESSES]
        attributes = [bytes(a) for a in request.attributes]

        def send(found: list[Published | None]) -> Any:
            for published in found:
                if published is not None:
                    reply(
                        pureldap.LDAPSearchResultEntry(
                            objectName=_entry_dn(published.address),
                            attributes=_attributes(published, attributes),
                        )
                    )
            return pureldap.LDAPSearchResultDone(resultCode=ldaperrors.Success.resultCode)

        def failed(failure: Any) -> Any:
            self._log.failure("LDAP certificate search failed", failure)
            return pureldap.LDAPSearchResultDone(
                resultCode=ldaperrors.LDAPUnavailable.resultCode, errorMessage="unavailable"
            )

        lookups: list[Deferred[Published | None]] = [self.live.by_address(a) for a in wanted]
        return gatherResults(lookups, consumeErrors=True).addCallbacks(send, failed)

    def _refuse(self, request: Any, controls: Any, reply: Any) -> Any:
        raise ldaperrors.LDAPUnwillingToPerform("this directory is read-only")

    fail_LDAPAddRequest = pureldap.LDAPAddResponse
    fail_LDAPDelRequest = pureldap.LDAPDelResponse
    fail_LDAPModifyRequest = pureldap.LDAPModifyResponse
    fail_LDAPModifyDNRequest = pureldap.LDAPModifyDNResponse
    handle_LDAPAddRequest = _refuse
    handle_LDAPDelRequest = _refuse
    handle_LDAPModifyRequest = _refuse
    handle_LDAPModifyDNRequest = _refuse


class CertificateLDAPFactory(protocol.ServerFactory):
    def __init__(self, live: LivePublication) -> None:
        self.live = live

    def buildProtocol(self, addr: Any) -> CertificateLDAPServer:
        proto = CertificateLDAPServer(self.live)
        proto.factory = self
        return proto
