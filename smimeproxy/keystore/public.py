"""Users and the public material of the store: partners' certificates, trust anchors,
intermediates, CRLs and the audit log, as the methods :class:`SyncStore` inherits.

Nothing here is secret. Administrators' changes are audited in the same transaction
that makes them; harvesting (frequent, automatic) is not audited.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509

from smimeproxy.errors import KeyNotFound, KeystoreError
from smimeproxy.keystore import audit, users
from smimeproxy.keystore import certificates as certs
from smimeproxy.keystore.interface import (
    AuditEntry,
    AuditVerification,
    CertificateRecord,
    CertificateSource,
    CRLRecord,
    TrustKind,
    TrustRecord,
    User,
)
from smimeproxy.keystore.schema import Database, bump_generation, read_generation, to_text
from smimeproxy.smime.status import fingerprint


class PublicRecords:
    """Users, certificates, trust, CRLs and audit over ``self.db`` (mixed into
    :class:`smimeproxy.keystore.store.SyncStore`)."""

    db: Database
    _now: Callable[[], datetime.datetime]

    # -- users ------------------------------------------------------------------------

    def add_user(
        self,
        address: str,
        *,
        aliases: Sequence[str] = (),
        login_names: Sequence[str] = (),
        actor: str = "system",
    ) -> User:
        """A new user; every address and login must be unused (else KeystoreError)."""
        primary = certs.normalise(address)
        with self.db.transaction() as tx:
            uid = users.insert_user(tx, primary, self._now())
            for alias in aliases:
                users.insert_address(tx, uid, certs.normalise(alias), "alias")
            for login in login_names:
                users.insert_login(tx, uid, certs.normalise(login))
            bump_generation(tx)
            audit.append(tx, self._now, actor, "user.add", primary)
            return users.user_by_id(tx, uid)

    def add_alias(self, address_or_login: str, alias: str, *, actor: str = "system") -> User:
        alias = certs.normalise(alias)
        with self.db.transaction() as tx:
            uid = users.user_id(tx, address_or_login)
            users.insert_address(tx, uid, alias, "alias")
            bump_generation(tx)
            audit.append(tx, self._now, actor, "user.alias.add", alias)
            return users.user_by_id(tx, uid)

    def remove_alias(self, alias: str, *, actor: str = "system") -> User:
        alias = certs.normalise(alias)
        with self.db.transaction() as tx:
            row = tx.one(
                "SELECT user_id FROM addresses WHERE address = ? AND kind = 'alias'", (alias,)
            )
            if row is None:
                raise KeyNotFound(f"no alias {alias}")
            tx.run("DELETE FROM addresses WHERE address = ?", (alias,))
            bump_generation(tx)
            audit.append(tx, self._now, actor, "user.alias.remove", alias)
            return users.user_by_id(tx, row[0])

    def add_login(self, address_or_login: str, login: str, *, actor: str = "system") -> User:
        login = certs.normalise(login)
        with self.db.transaction() as tx:
            uid = users.user_id(tx, address_or_login)
            users.insert_login(tx, uid, login)
            bump_generation(tx)
            audit.append(tx, self._now, actor, "user.login.add", login)
            return users.user_by_id(tx, uid)

    def remove_login(self, login: str, *, actor: str = "system") -> User:
        login = certs.normalise(login)
        with self.db.transaction() as tx:
            row = tx.one("SELECT user_id FROM logins WHERE login = ?", (login,))
            if row is None:
                raise KeyNotFound(f"no login {login}")
            tx.run("DELETE FROM logins WHERE login = ?", (login,))
            bump_generation(tx)
            audit.append(tx, self._now, actor, "user.login.remove", login)
            return users.user_by_id(tx, row[0])

    def remove_user(self, address: str, *, actor: str = "system") -> None:
        """Remove a user that holds no keys (keys are never deleted: revoke them)."""
        with self.db.transaction() as tx:
            uid = users.user_id(tx, address)
            if tx.one("SELECT 1 FROM keys WHERE owner = ? LIMIT 1", (uid,)):
                raise KeystoreError(f"user {certs.normalise(address)} has keys; revoke them")
            tx.run("DELETE FROM users WHERE id = ?", (uid,))
            bump_generation(tx)
            audit.append(tx, self._now, actor, "user.remove", certs.normalise(address))

    def user(self, address_or_login: str) -> User:
        """The user with this login name, primary address or alias (KeyNotFound)."""
        with self.db.transaction(write=False) as tx:
            return users.user_by_id(tx, users.user_id(tx, address_or_login))

    def find_user(self, address_or_login: str) -> User | None:
        with self.db.transaction(write=False) as tx:
            uid = users.find_user_id(tx, address_or_login)
            return None if uid is None else users.user_by_id(tx, uid)

    def users(self) -> list[User]:
        with self.db.transaction(write=False) as tx:
            ids = [r[0] for r in tx.all("SELECT id FROM users ORDER BY address")]
            return [users.user_by_id(tx, i) for i in ids]

    # -- certificates -------------------------------------------------------------------

    def harvest(
        self,
        certificate: x509.Certificate,
        capabilities: Sequence[str] = (),
        encryption_key_preference: x509.Certificate | None = None,
        *,
        verified: bool,
        seen_at: datetime.datetime | None = None,
    ) -> CertificateRecord:
        """Remember the certificate of a signer whose signature on incoming mail was
        *verified* (signature, path and address), with the SMIMECapabilities and the
        SMIMEEncryptionKeyPreference (RFC 8551 sections 2.5.2, 2.5.3) it advertised.

        Refuses (KeystoreError) unless ``verified`` is true: a certificate from an
        unverified signature would let anyone redirect mail encrypted to that address.
        A preferred encryption certificate other than the signer's is stored too.
        """
        if verified is not True:
            raise KeystoreError("refusing to harvest a certificate from an unverified signature")
        seen = seen_at or self._now()
        with self.db.transaction() as tx:
            preference = None
            touched = [fingerprint(certificate)]
            if encryption_key_preference is not None:
                preference = fingerprint(encryption_key_preference)
                if preference != touched[0]:
                    touched.append(preference)
            before = [certs.lookup_facts(tx, fp) for fp in touched]
            if len(touched) > 1:
                certs.upsert(
                    tx, encryption_key_preference, CertificateSource.HARVESTED, seen, None, None
                )
            record = certs.upsert(
                tx, certificate, CertificateSource.HARVESTED, seen, tuple(capabilities), preference
            )
            # harvesting is frequent (every verified inbound signature): move the
            # generation only when what an encryption lookup would choose can differ
            if any(
                certs.refresh_changes_lookups(tx, fp, old, certs.lookup_facts(tx, fp))
                for fp, old in zip(touched, before, strict=True)
            ):
                bump_generation(tx)
            return record

    def import_certificate(
        self,
        certificate: x509.Certificate,
        *,
        source: CertificateSource = CertificateSource.IMPORTED,
        capabilities: Sequence[str] | None = None,
        actor: str = "system",
    ) -> CertificateRecord:
        """Store a partner's certificate (from an administrator, SMIMEA or a directory)."""
        if source in (CertificateSource.HARVESTED, CertificateSource.LOCAL):
            raise KeystoreError(f"certificates of source {source} are not imported")
        with self.db.transaction() as tx:
            record = certs.upsert(
                tx,
                certificate,
                source,
                self._now(),
                None if capabilities is None else tuple(capabilities),
                None,
            )
            bump_generation(tx)
            if source is CertificateSource.IMPORTED:
                audit.append(
                    tx,
                    self._now,
                    actor,
                    "certificate.import",
                    record.addresses[0],
                    {"certificate": record.fingerprint},
                )
            return record

    def certificate(self, fingerprint_hex: str) -> CertificateRecord:
        with self.db.transaction(write=False) as tx:
            return certs.get(tx, fingerprint_hex)

    def certificates(self, address: str | None = None) -> list[CertificateRecord]:
        """Stored partner certificates, all or one address's, newest first."""
        with self.db.transaction(write=False) as tx:
            return certs.listing(tx, address)

    def revoke_certificate(
        self, fingerprint_hex: str, reason: str, *, actor: str = "system"
    ) -> CertificateRecord:
        """Never encrypt to this certificate again (kept for the record)."""
        with self.db.transaction() as tx:
            record = certs.get(tx, fingerprint_hex)
            tx.run(
                "UPDATE certificates SET revoked = 1 WHERE fingerprint = ?", (record.fingerprint,)
            )
            bump_generation(tx)
            audit.append(
                tx,
                self._now,
                actor,
                "certificate.revoke",
                record.addresses[0],
                {"certificate": record.fingerprint, "reason": reason},
            )
            return certs.get(tx, record.fingerprint)

    def remove_certificate(self, fingerprint_hex: str, *, actor: str = "system") -> None:
        with self.db.transaction() as tx:
            record = certs.get(tx, fingerprint_hex)
            tx.run("DELETE FROM certificates WHERE fingerprint = ?", (record.fingerprint,))
            bump_generation(tx)
            audit.append(
                tx,
                self._now,
                actor,
                "certificate.remove",
                record.addresses[0],
                {"certificate": record.fingerprint},
            )

    # -- trust anchors, intermediates, CRLs -----------------------------------------------

    def add_trust(
        self, certificate: x509.Certificate, *, kind: TrustKind | None = None, actor: str = "system"
    ) -> TrustRecord:
        """Add a trust anchor or intermediate (self-signed means anchor unless ``kind``)."""
        with self.db.transaction() as tx:
            record = certs.add_trust(tx, certificate, kind, self._now())
            bump_generation(tx)
            audit.append(
                tx,
                self._now,
                actor,
                f"trust.add.{record.kind}",
                certificate.subject.rfc4514_string(),
                {"certificate": record.fingerprint},
            )
            return record

    def remove_trust(self, fingerprint_hex: str, *, actor: str = "system") -> None:
        with self.db.transaction() as tx:
            if not tx.run("DELETE FROM trust WHERE fingerprint = ?", (fingerprint_hex.lower(),)):
                raise KeyNotFound(f"no trust anchor or intermediate {fingerprint_hex}")
            bump_generation(tx)
            audit.append(tx, self._now, actor, "trust.remove", fingerprint_hex.lower())

    def generation(self) -> int:
        """The store generation: a number that changes with every committed write that
        can change a lookup's answer, on any node (see
        :func:`smimeproxy.keystore.schema.bump_generation`). One indexed read; callers
        holding lookups in memory compare it before reusing them."""
        with self.db.transaction(write=False) as tx:
            return read_generation(tx)

    def trust_records(self, kind: TrustKind | None = None) -> list[TrustRecord]:
        with self.db.transaction(write=False) as tx:
            return certs.trust_records(tx, kind)

    def trust_anchors(self) -> list[x509.Certificate]:
        return [r.certificate for r in self.trust_records(TrustKind.ANCHOR)]

    def intermediates(self) -> list[x509.Certificate]:
        return [r.certificate for r in self.trust_records(TrustKind.INTERMEDIATE)]

    def add_crl(self, crl: x509.CertificateRevocationList, *, actor: str = "system") -> bool:
        """Keep ``crl`` if it is the newest for its issuer; True if it was kept.
        The CRL's signature is the PKI layer's to check before adding."""
        with self.db.transaction() as tx:
            kept = certs.add_crl(tx, crl, self._now())
            if kept:
                bump_generation(tx)
                audit.append(
                    tx,
                    self._now,
                    actor,
                    "crl.add",
                    crl.issuer.rfc4514_string(),
                    {"this_update": to_text(crl.last_update_utc)},
                )
            return kept

    def crl_records(self) -> list[CRLRecord]:
        with self.db.transaction(write=False) as tx:
            return certs.latest_crls(tx)

    def crls(self) -> list[x509.CertificateRevocationList]:
        return [r.crl for r in self.crl_records()]

    # -- audit ------------------------------------------------------------------------

    def audit(
        self, actor: str, action: str, subject: str, detail: dict[str, Any] | None = None
    ) -> AuditEntry:
        """Append an entry (faces audit their own sensitive uses, e.g. archive
        decryption). ``detail`` must be JSON without bytes or PEM."""
        with self.db.transaction() as tx:
            return audit.append(tx, self._now, actor, action, subject, detail)

    def audit_entries(self, after: int = 0, limit: int | None = None) -> list[AuditEntry]:
        with self.db.transaction(write=False) as tx:
            return audit.entries(tx, after, limit)

    def audit_head(self) -> tuple[int, str]:
        """Last sequence number and hash: record it elsewhere to detect truncation."""
        with self.db.transaction(write=False) as tx:
            return audit.head(tx)

    def verify_audit(self) -> AuditVerification:
        with self.db.transaction(write=False) as tx:
            return audit.verify_all(tx)
