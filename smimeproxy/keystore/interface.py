"""The key store as the faces see it: record types and the asynchronous face.

There is one implementation of the store, :class:`smimeproxy.keystore.store.SyncStore`,
whose methods block on the database. The command line calls it directly. Twisted
services use :class:`Keystore`, which runs each of those same methods in an injected
thread pool and returns a Deferred, so no database call ever runs on the reactor.

Records are frozen snapshots: a record read a moment ago may already be stale if
another node changed the store; nothing here caches or refreshes them.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from smimeproxy.smime.keys import KeyPair, PrivateKey

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    from smimeproxy.keystore.store import SyncStore


class KeyState(enum.StrEnum):
    """Where a private key is in its life. Rotation never deletes: old keys still
    decrypt old mail."""

    CURRENT = "current"  # signs, and is the one encrypted to
    PREVIOUS = "previous"  # replaced by rotation; decrypts only
    REVOKED = "revoked"  # withdrawn (compromise, leaver ...); still decrypts old mail


class CertificateSource(enum.StrEnum):
    """How a certificate came to the store."""

    IMPORTED = "imported"  # an administrator imported it
    HARVESTED = "harvested"  # from a verified signature on incoming mail
    SMIMEA = "smimea"  # from a DNS SMIMEA record (RFC 8162)
    DIRECTORY = "directory"  # from an LDAP or HTTP directory
    LOCAL = "local"  # one of our own users' current certificates


class TrustKind(enum.StrEnum):
    ANCHOR = "anchor"
    INTERMEDIATE = "intermediate"


@dataclass(frozen=True)
class User:
    """A local user: primary address, aliases and IMAP login names, as the store compares
    them (:func:`smimeproxy.keystore.certificates.normalise`: ASCII lower-cased; a non-ASCII
    local part kept as written, its domain in U-labels, RFC 8398 section 5)."""

    id: str
    address: str
    aliases: tuple[str, ...]
    login_names: tuple[str, ...]
    created: datetime.datetime

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.address, *self.aliases)


@dataclass(frozen=True)
class KeyRecord:
    """One of a user's private keys with its certificate.

    ``id`` is the certificate's SHA-256 fingerprint (hex). ``sealed`` is the AES-GCM
    sealed PKCS#8 key (never shown by ``repr``); ``hsm_reference`` names a key held in a
    PKCS#11 token instead, and then ``sealed`` is ``None``.
    """

    id: str
    owner: str
    certificate: x509.Certificate
    state: KeyState
    created: datetime.datetime
    not_after: datetime.datetime
    revoked_reason: str | None = None
    sealed: bytes | None = field(default=None, repr=False)
    hsm_reference: str | None = None

    @property
    def fingerprint(self) -> str:
        return self.id


@dataclass(frozen=True)
class CertificateRecord:
    """A certificate we may encrypt to: a partner's, or (source ``LOCAL``) our own.

    ``capabilities`` are the SMIMECapabilities the owner advertised in signed mail, as
    the engine names them; ``encryption_key_preference`` is the fingerprint of the
    certificate the owner asked to be encrypted to (RFC 8551 section 2.5.3), if any.
    """

    fingerprint: str
    addresses: tuple[str, ...]
    certificate: x509.Certificate
    source: CertificateSource
    first_seen: datetime.datetime
    last_seen: datetime.datetime
    capabilities: tuple[str, ...] = ()
    encryption_key_preference: str | None = None
    revoked: bool = False


@dataclass(frozen=True)
class TrustRecord:
    fingerprint: str
    kind: TrustKind
    certificate: x509.Certificate
    added: datetime.datetime


@dataclass(frozen=True)
class CRLRecord:
    """The latest CRL the store holds for one issuer."""

    issuer: str  # RFC 4514 string, for people
    crl: x509.CertificateRevocationList
    this_update: datetime.datetime
    next_update: datetime.datetime | None
    added: datetime.datetime


@dataclass(frozen=True)
class SigningIdentity:
    """A user's current key pair and the intermediates to send with signatures
    (leaf issuer first; the trust anchor is not included)."""

    pair: KeyPair
    chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the append-only audit log; ``detail`` never holds secrets."""

    seq: int
    time: datetime.datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class AuditVerification:
    """Result of checking the hash chain: ``first_broken`` is the first sequence
    number whose entry is missing, altered or out of chain (``None`` when intact)."""

    ok: bool
    entries: int
    first_broken: int | None = None
    reason: str = ""


P = ParamSpec("P")
T = TypeVar("T")


class Keystore:
    """The asynchronous face of a :class:`SyncStore`: every call runs in ``threadpool``
    and returns a Deferred firing with the same result (or failing with the same
    :mod:`smimeproxy.errors` exception).

    The reactor and the thread pool are injected; the caller starts and stops the pool
    (a Twisted service usually does both).
    """

    def __init__(self, store: SyncStore, reactor: IReactorFromThreads, threadpool: ThreadPool):
        self.store = store
        self._reactor = reactor
        self._threadpool = threadpool

    def _defer(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._threadpool, fn, *args, **kwargs)

    # -- lookups the faces need -----------------------------------------------------

    def encryption_certificate(self, address: str) -> Deferred[CertificateRecord | None]:
        return self._defer(self.store.encryption_certificate, address)

    def decryption_keys(self, address_or_login: str) -> Deferred[list[KeyPair]]:
        return self._defer(self.store.decryption_keys, address_or_login)

    def signing_key(self, address: str) -> Deferred[SigningIdentity]:
        return self._defer(self.store.signing_key, address)

    def harvest(
        self,
        certificate: x509.Certificate,
        capabilities: Sequence[str] = (),
        encryption_key_preference: x509.Certificate | None = None,
        *,
        verified: bool,
    ) -> Deferred[CertificateRecord]:
        return self._defer(
            self.store.harvest,
            certificate,
            capabilities,
            encryption_key_preference,
            verified=verified,
        )

    def generation(self) -> Deferred[int]:
        """See :meth:`SyncStore.generation`."""
        return self._defer(self.store.generation)

    def trust_anchors(self) -> Deferred[list[x509.Certificate]]:
        return self._defer(self.store.trust_anchors)

    def intermediates(self) -> Deferred[list[x509.Certificate]]:
        return self._defer(self.store.intermediates)

    def crls(self) -> Deferred[list[x509.CertificateRevocationList]]:
        return self._defer(self.store.crls)

    # -- users ----------------------------------------------------------------------

    def add_user(
        self,
        address: str,
        *,
        aliases: Sequence[str] = (),
        login_names: Sequence[str] = (),
        actor: str = "system",
    ) -> Deferred[User]:
        return self._defer(
            self.store.add_user, address, aliases=aliases, login_names=login_names, actor=actor
        )

    def user(self, address_or_login: str) -> Deferred[User]:
        return self._defer(self.store.user, address_or_login)

    def users(self) -> Deferred[list[User]]:
        return self._defer(self.store.users)

    # -- keys -----------------------------------------------------------------------

    def import_key(
        self,
        key: PrivateKeyTypes | PrivateKey | None,
        certificate: x509.Certificate,
        *,
        current: bool | None = None,
        hsm_reference: str | None = None,
        actor: str = "system",
    ) -> Deferred[KeyRecord]:
        return self._defer(
            self.store.import_key,
            key,
            certificate,
            current=current,
            hsm_reference=hsm_reference,
            actor=actor,
        )

    def rotate(
        self,
        address: str,
        key: PrivateKeyTypes | PrivateKey | None,
        certificate: x509.Certificate,
        *,
        hsm_reference: str | None = None,
        actor: str = "system",
    ) -> Deferred[KeyRecord]:
        return self._defer(
            self.store.rotate, address, key, certificate, hsm_reference=hsm_reference, actor=actor
        )

    def revoke_key(self, key_id: str, reason: str, *, actor: str = "system") -> Deferred[KeyRecord]:
        return self._defer(self.store.revoke_key, key_id, reason, actor=actor)

    def keys(self, address_or_login: str | None = None) -> Deferred[list[KeyRecord]]:
        return self._defer(self.store.keys, address_or_login)

    def export_key(
        self, key_id: str, *, reason: str, password: bytes | None = None, actor: str = "system"
    ) -> Deferred[bytes]:
        return self._defer(
            self.store.export_key, key_id, reason=reason, password=password, actor=actor
        )

    # -- certificates, trust, CRLs ----------------------------------------------------

    def import_certificate(
        self,
        certificate: x509.Certificate,
        *,
        source: CertificateSource = CertificateSource.IMPORTED,
        actor: str = "system",
    ) -> Deferred[CertificateRecord]:
        return self._defer(self.store.import_certificate, certificate, source=source, actor=actor)

    def certificates(self, address: str | None = None) -> Deferred[list[CertificateRecord]]:
        return self._defer(self.store.certificates, address)

    def revoke_certificate(
        self, fingerprint: str, reason: str, *, actor: str = "system"
    ) -> Deferred[CertificateRecord]:
        return self._defer(self.store.revoke_certificate, fingerprint, reason, actor=actor)

    def add_trust(
        self, certificate: x509.Certificate, *, kind: TrustKind | None = None, actor: str = "system"
    ) -> Deferred[TrustRecord]:
        return self._defer(self.store.add_trust, certificate, kind=kind, actor=actor)

    def add_crl(
        self, crl: x509.CertificateRevocationList, *, actor: str = "system"
    ) -> Deferred[bool]:
        return self._defer(self.store.add_crl, crl, actor=actor)

    # -- audit ----------------------------------------------------------------------

    def audit(
        self, actor: str, action: str, subject: str, detail: dict[str, Any] | None = None
    ) -> Deferred[AuditEntry]:
        return self._defer(self.store.audit, actor, action, subject, detail)

    def audit_entries(self, after: int = 0, limit: int | None = None) -> Deferred[list[AuditEntry]]:
        return self._defer(self.store.audit_entries, after, limit)

    def verify_audit(self) -> Deferred[AuditVerification]:
        return self._defer(self.store.verify_audit)
