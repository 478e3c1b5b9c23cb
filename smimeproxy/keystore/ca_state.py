"""The internal CA's own state in the key store, and the store-wide operations of the
command line that span several tables (reseal, bulk rotation bookkeeping).

What lives here (schema migration 2):

- ``ca_keys``: the root and, optionally, an issuing CA; private keys sealed with the
  store's key-encryption key exactly like users' keys (AES-GCM, owner ``ca:<name>`` and
  the certificate fingerprint as associated data), the CRL counter (RFC 5280 5.2.3) and
  the CRL distribution point template.
- ``ca_issued``: every certificate the CA issued, by serial, with its revocation.
- ``pending_keys``: keys generated here whose certificate an external CA has yet to
  return (``keys generate --csr-out``), sealed the same way.
- ``rotation_runs``: which users a named bulk rotation has done (a rerun skips them)
  and which new certificates still have to be republished.

The PKI itself (certificate profiles, CRL encoding) is :mod:`smimeproxy.pki.ca`; this
module only persists what it returns. Not guaranteed: two nodes running ``ca crl`` at
the same moment each get their own CRL number (the counter is atomic), but only the
CRL with the later thisUpdate is kept by the store.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)

from smimeproxy.errors import CertificateError, KeyNotFound, KeystoreError, SealError
from smimeproxy.keystore import audit
from smimeproxy.keystore import certificates as certs
from smimeproxy.keystore.interface import KeyState, TrustKind
from smimeproxy.keystore.schema import Tx, bump_generation, from_text, to_text
from smimeproxy.keystore.sealing import MasterSecret, Sealer, new_kdf_parameters
from smimeproxy.keystore.store import SyncStore
from smimeproxy.pki import ca as pki
from smimeproxy.smime.status import fingerprint

ROOT = "root"
ISSUING = "issuing"


def serial_text(serial: int) -> str:
    """A serial as stored and shown: lower-case hex without leading zeros (as
    ``openssl x509 -serial`` prints it, modulo case)."""
    return format(serial, "x")


def parse_serial(text: str) -> int:
    """A serial from a command line: hexadecimal, colons and a ``0x`` prefix allowed."""
    clean = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(clean, 16)
    except ValueError:
        raise CertificateError(f"not a hexadecimal serial number: {text!r}") from None
    if value <= 0:
        raise CertificateError("a serial number is positive")
    return value


@dataclass(frozen=True)
class IssuedRecord:
    """One certificate the internal CA issued."""

    serial: int
    issuer: str  # "root" or "issuing"
    fingerprint: str
    subject: str  # first address (or the CA's name for the issuing CA)
    certificate: x509.Certificate
    issued: datetime.datetime
    not_after: datetime.datetime
    revoked_at: datetime.datetime | None
    reason: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


_ISSUED_COLUMNS = (
    "serial, issuer, fingerprint, subject, certificate, issued, not_after, revoked_at, reason"
)


def _issued(row: tuple[Any, ...]) -> IssuedRecord:
    return IssuedRecord(
        int(row[0], 16),
        row[1],
        row[2],
        row[3],
        certs.load_certificate(row[4]),
        from_text(row[5]),
        from_text(row[6]),
        None if row[7] is None else from_text(row[7]),
        row[8],
    )


def _pkcs8(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _spki_id(public_key: Any) -> str:
    import hashlib

    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


class CAState:
    """The internal CA over one open :class:`SyncStore` (blocking, like the store).

    It seals with the store's key-encryption key, so it must be used with the store it
    was built from; nothing is cached between calls (other nodes may change the CA).
    """

    def __init__(self, store: SyncStore):
        self.store = store

    @property
    def _sealer(self) -> Sealer:
        return self.store._sealer  # the store's KEK: the CA key is sealed like any other

    def _now(self) -> datetime.datetime:
        return self.store._now()

    # -- the CA's keys -------------------------------------------------------------------

    def certificates(self) -> dict[str, x509.Certificate]:
        """``{"root": cert, "issuing": cert}`` (the latter only when there is one)."""
        with self.store.db.transaction(write=False) as tx:
            rows = tx.all("SELECT name, certificate FROM ca_keys")
        return {r[0]: certs.load_certificate(r[1]) for r in rows}

    def initialised(self) -> bool:
        return ROOT in self.certificates()

    def init(
        self,
        root_name: str,
        *,
        key_kind: str = "p256",
        valid_days: int = 3650,
        issuing_name: str | None = None,
        crl_url_template: str | None = None,
        actor: str = "system",
    ) -> dict[str, x509.Certificate]:
        """Create the root (and an issuing CA), seal their keys, trust the root.

        Refuses (KeystoreError) when this store already has a CA: a second root would
        orphan every certificate issued under the first.
        """
        if self.initialised():
            raise KeystoreError("this key store already has an internal CA (see ca show)")
        pki.CAProfile(crl_url_template=crl_url_template)  # validates the template
        root_key, root_cert = pki.create_root(root_name, key_kind=key_kind, valid_days=valid_days)
        made = {ROOT: (root_key, root_cert)}
        if issuing_name:
            made[ISSUING] = pki.create_issuing_ca(
                root_key,
                root_cert,
                issuing_name,
                key_kind=key_kind,
                valid_days=min(valid_days, 1825),
            )
        now = self._now()
        with self.store.db.transaction() as tx:
            for name, (key, cert) in made.items():
                row = (
                    name,
                    certs.der(cert),
                    self._sealer.seal(_pkcs8(key), owner_id=f"ca:{name}", key_id=fingerprint(cert)),
                    to_text(now),
                    crl_url_template,
                )

                def insert(t: Tx, row: tuple[Any, ...] = row) -> None:
                    t.run(
                        "INSERT INTO ca_keys (name, certificate, sealed, created,"
                        " crl_number, crl_url_template) VALUES (?, ?, ?, ?, 0, ?)",
                        row,
                    )

                try:
                    tx.attempt(f"ca_{name}", insert)
                except tx.integrity_errors:
                    raise KeystoreError("another node created the internal CA meanwhile") from None
                certs.add_trust(tx, cert, TrustKind.ANCHOR if name == ROOT else None, now)
                if name == ISSUING:
                    self._record(tx, cert, ROOT, cert.subject.rfc4514_string(), now)
            bump_generation(tx)
            audit.append(
                tx,
                self._now,
                actor,
                "ca.init",
                root_cert.subject.rfc4514_string(),
                {"root": fingerprint(root_cert), "issuing": bool(issuing_name), "kind": key_kind},
            )
        return {n: c for n, (_, c) in made.items()}

    def _ca_key(self, name: str) -> tuple[PrivateKeyTypes, x509.Certificate, str | None]:
        with self.store.db.transaction(write=False) as tx:
            row = tx.one(
                "SELECT certificate, sealed, crl_url_template FROM ca_keys WHERE name = ?",
                (name,),
            )
        if row is None:
            raise KeyNotFound("this key store has no internal CA yet (run smimeproxy ca init)")
        cert = certs.load_certificate(row[0])
        der = self._sealer.open(bytes(row[1]), owner_id=f"ca:{name}", key_id=fingerprint(cert))
        try:
            key = serialization.load_der_private_key(der, None)
        except (ValueError, TypeError):
            raise SealError(f"the {name} CA key opened but is unreadable") from None
        return key, cert, row[2]

    def issuer(self) -> tuple[PrivateKeyTypes, x509.Certificate, str, pki.CAProfile]:
        """The CA that issues users' certificates (the issuing CA if there is one)."""
        name = ISSUING if ISSUING in self.certificates() else ROOT
        key, cert, template = self._ca_key(name)
        return key, cert, name, pki.CAProfile(crl_url_template=template)

    # -- issuing -------------------------------------------------------------------------

    def _record(
        self, tx: Tx, cert: x509.Certificate, issuer: str, subject: str, now: datetime.datetime
    ) -> None:
        tx.run(
            f"INSERT INTO ca_issued ({_ISSUED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
            (
                serial_text(cert.serial_number),
                issuer,
                fingerprint(cert),
                subject,
                certs.der(cert),
                to_text(now),
                to_text(cert.not_valid_after_utc),
            ),
        )

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        addresses: list[str],
        *,
        common_name: str | None = None,
        actor: str = "system",
    ) -> x509.Certificate:
        """A user certificate for ``addresses`` from the issuing CA, recorded and audited."""
        key, ca_cert, name, profile = self.issuer()
        cert = pki.issue_user_certificate(
            key, ca_cert, public_key, addresses, common_name=common_name, profile=profile
        )
        self._store_issued(cert, name, actor)
        return cert

    def issue_for_csr(
        self, csr: x509.CertificateSigningRequest, *, actor: str = "system"
    ) -> x509.Certificate:
        """Issue for an external key's PKCS#10 request (see :func:`pki.certificate_from_csr`
        for what is taken from it)."""
        key, ca_cert, name, profile = self.issuer()
        cert = pki.certificate_from_csr(key, ca_cert, csr, profile=profile)
        self._store_issued(cert, name, actor)
        return cert

    def _store_issued(self, cert: x509.Certificate, issuer: str, actor: str) -> None:
        subject = (pki.certificate_addresses(cert) or [cert.subject.rfc4514_string()])[0]
        with self.store.db.transaction() as tx:
            self._record(tx, cert, issuer, subject, self._now())
            bump_generation(tx)
            audit.append(
                tx,
                self._now,
                actor,
                "ca.issue",
                subject,
                {"serial": serial_text(cert.serial_number), "certificate": fingerprint(cert)},
            )

    def issued(self, address: str | None = None) -> list[IssuedRecord]:
        """Every certificate issued (or one address's), newest first."""
        sql = f"SELECT {_ISSUED_COLUMNS} FROM ca_issued"
        params: tuple[Any, ...] = ()
        if address is not None:
            sql += " WHERE subject = ?"
            params = (certs.normalise(address),)
        with self.store.db.transaction(write=False) as tx:
            rows = tx.all(sql + " ORDER BY issued DESC, serial", params)
        return [_issued(r) for r in rows]

    def issued_by_serial(self, serial: int) -> IssuedRecord:
        with self.store.db.transaction(write=False) as tx:
            row = tx.one(
                f"SELECT {_ISSUED_COLUMNS} FROM ca_issued WHERE serial = ?", (serial_text(serial),)
            )
        if row is None:
            raise KeyNotFound(f"the internal CA issued no certificate with serial {serial:x}")
        return _issued(row)

    # -- revocation and CRLs -------------------------------------------------------------

    def revoke(
        self, serial: int, reason: str | None, *, actor: str = "system"
    ) -> tuple[IssuedRecord, str | None]:
        """Mark a certificate revoked (it goes into the next CRL) and, if it belongs to
        one of the store's keys, revoke that key too. Returns the record and the key id
        revoked (if any). Revoking twice keeps the first date and reason."""
        flag = pki.parse_reason(reason)
        record = self.issued_by_serial(serial)
        if not record.revoked:
            with self.store.db.transaction() as tx:
                tx.run(
                    "UPDATE ca_issued SET revoked_at = ?, reason = ?"
                    " WHERE serial = ? AND revoked_at IS NULL",
                    (to_text(self._now()), pki.reason_name(flag), serial_text(serial)),
                )
                bump_generation(tx)
                audit.append(
                    tx,
                    self._now,
                    actor,
                    "ca.revoke",
                    record.subject,
                    {"serial": serial_text(serial), "reason": pki.reason_name(flag)},
                )
        key_id = None
        try:
            key = self.store.key(record.fingerprint)
        except KeyNotFound:
            key = None
        if key is not None and key.state is not KeyState.REVOKED:
            self.store.revoke_key(key.id, pki.reason_name(flag), actor=actor)
            key_id = key.id
        return self.issued_by_serial(serial), key_id

    def make_crl(
        self, *, next_update: datetime.timedelta | None = None, actor: str = "system"
    ) -> x509.CertificateRevocationList:
        """A fresh CRL of the issuing CA (and one of the root when there is an issuing
        CA), stored in the key store so validation uses it at once; returns the former.
        The CRL number grows by one per CRL (RFC 5280 5.2.3)."""
        names = list(self.certificates())
        latest = {r.crl.issuer.public_bytes(): r.this_update for r in self.store.crl_records()}
        made: dict[str, x509.CertificateRevocationList] = {}
        for name in sorted(names, key=lambda n: n != ROOT):
            key, cert, _template = self._ca_key(name)
            issued = [r for r in self.issued() if r.issuer == name and r.revoked]
            entries = [
                pki.RevokedEntry(r.serial, r.revoked_at, pki.parse_reason(r.reason))  # type: ignore[arg-type]
                for r in issued
            ]
            with self.store.db.transaction() as tx:
                tx.run("UPDATE ca_keys SET crl_number = crl_number + 1 WHERE name = ?", (name,))
                row = tx.one("SELECT crl_number FROM ca_keys WHERE name = ?", (name,))
            assert row is not None
            # the store keeps a CRL only if its thisUpdate is later than the one it has,
            # and thisUpdate has whole seconds: never reuse the previous one's second
            this_update = self._now().replace(microsecond=0)
            previous = latest.get(cert.subject.public_bytes())
            if previous is not None and this_update <= previous:
                this_update = previous + datetime.timedelta(seconds=1)
            crl = pki.make_crl(
                key,
                cert,
                entries,
                crl_number=int(row[0]),
                this_update=this_update,
                next_update=this_update + next_update if next_update else None,
            )
            self.store.add_crl(crl, actor=actor)
            made[name] = crl
        return made[ISSUING] if ISSUING in made else made[ROOT]

    # -- keys waiting for an external CA ---------------------------------------------------

    def add_pending(self, key: PrivateKeyTypes, address: str, *, actor: str = "system") -> str:
        """Keep a key whose certificate an external CA will return; its id is the
        SHA-256 of its SubjectPublicKeyInfo."""
        pid = _spki_id(key.public_key())
        address = certs.normalise(address)
        with self.store.db.transaction() as tx:
            tx.run(
                "INSERT INTO pending_keys (id, address, sealed, created) VALUES (?, ?, ?, ?)",
                (
                    pid,
                    address,
                    self._sealer.seal(_pkcs8(key), owner_id=f"pending:{address}", key_id=pid),
                    to_text(self._now()),
                ),
            )
            audit.append(tx, self._now, actor, "key.pending", address, {"pending": pid})
        return pid

    def pending(self) -> list[tuple[str, str, datetime.datetime]]:
        """``(id, address, created)`` of every key still waiting for its certificate."""
        with self.store.db.transaction(write=False) as tx:
            rows = tx.all("SELECT id, address, created FROM pending_keys ORDER BY created")
        return [(r[0], r[1], from_text(r[2])) for r in rows]

    def pending_key_for(self, certificate: x509.Certificate) -> PrivateKeyTypes | None:
        """The pending key whose public key ``certificate`` carries, if any."""
        pid = _spki_id(certificate.public_key())
        with self.store.db.transaction(write=False) as tx:
            row = tx.one("SELECT address, sealed FROM pending_keys WHERE id = ?", (pid,))
        if row is None:
            return None
        der = self._sealer.open(bytes(row[1]), owner_id=f"pending:{row[0]}", key_id=pid)
        return serialization.load_der_private_key(der, None)

    def drop_pending(self, certificate: x509.Certificate) -> None:
        with self.store.db.transaction() as tx:
            tx.run("DELETE FROM pending_keys WHERE id = ?", (_spki_id(certificate.public_key()),))

    # -- bulk rotation bookkeeping ---------------------------------------------------------

    def start_run(self, run: str) -> datetime.datetime:
        """When the rotation run ``run`` first started (recorded on first use)."""
        with self.store.db.transaction() as tx:
            tx.run(
                "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (f"rotation_run:{run}", to_text(self._now())),
            )
            row = tx.one("SELECT value FROM meta WHERE name = ?", (f"rotation_run:{run}",))
        assert row is not None
        return from_text(row[0])

    def rotated_in_run(self, run: str) -> dict[str, str]:
        """``{address: new key id}`` for the users the run has already rotated."""
        with self.store.db.transaction(write=False) as tx:
            rows = tx.all("SELECT address, key FROM rotation_runs WHERE run = ?", (run,))
        return {r[0]: r[1] for r in rows}

    def record_rotation(self, run: str, address: str, key_id: str) -> None:
        with self.store.db.transaction() as tx:
            tx.run(
                "INSERT INTO rotation_runs (run, address, key, rotated, published)"
                " VALUES (?, ?, ?, ?, 0) ON CONFLICT (run, address) DO NOTHING",
                (run, certs.normalise(address), key_id, to_text(self._now())),
            )

    def to_republish(self) -> list[tuple[str, str, str]]:
        """``(address, key id, run)`` of rotated certificates not yet marked published."""
        with self.store.db.transaction(write=False) as tx:
            rows = tx.all(
                "SELECT address, key, run FROM rotation_runs WHERE published = 0"
                " ORDER BY rotated, address"
            )
        return [(r[0], r[1], r[2]) for r in rows]

    def mark_published(self, address: str) -> int:
        with self.store.db.transaction() as tx:
            return tx.run(
                "UPDATE rotation_runs SET published = 1 WHERE address = ? AND published = 0",
                (certs.normalise(address),),
            )


def reseal(store: SyncStore, new_master: MasterSecret, *, actor: str = "system") -> int:
    """Re-seal every private key (users', the CA's, pending ones) under ``new_master``
    in one transaction; returns how many. :meth:`SyncStore.reseal` covers users' keys
    only, so the command line uses this. Other nodes must restart with the new secret.
    """
    old: Sealer = store._sealer
    params = new_kdf_parameters(new_master)
    new = Sealer.derive(new_master, params)
    count = 0
    with store.db.transaction() as tx:
        for row in tx.all("SELECT id, owner, sealed FROM keys WHERE sealed IS NOT NULL"):
            plain = old.open(bytes(row[2]), owner_id=row[1], key_id=row[0])
            tx.run(
                "UPDATE keys SET sealed = ? WHERE id = ?",
                (new.seal(plain, owner_id=row[1], key_id=row[0]), row[0]),
            )
            count += 1
        for row in tx.all("SELECT name, certificate, sealed FROM ca_keys"):
            owner, key_id = f"ca:{row[0]}", fingerprint(certs.load_certificate(row[1]))
            plain = old.open(bytes(row[2]), owner_id=owner, key_id=key_id)
            tx.run(
                "UPDATE ca_keys SET sealed = ? WHERE name = ?",
                (new.seal(plain, owner_id=owner, key_id=key_id), row[0]),
            )
            count += 1
        for row in tx.all("SELECT id, address, sealed FROM pending_keys"):
            owner = f"pending:{row[1]}"
            plain = old.open(bytes(row[2]), owner_id=owner, key_id=row[0])
            tx.run(
                "UPDATE pending_keys SET sealed = ? WHERE id = ?",
                (new.seal(plain, owner_id=owner, key_id=row[0]), row[0]),
            )
            count += 1
        tx.run("UPDATE meta SET value = ? WHERE name = 'kek_kdf'", (json.dumps(params),))
        tx.run("UPDATE meta SET value = ? WHERE name = 'kek_check'", (new.check_value().hex(),))
        bump_generation(tx)
        audit.append(
            tx,
            store._now,
            actor,
            "store.reseal",
            store.db.describe(),
            {"keys": count, "master": new_master.origin, "kdf": params["kdf"]},
        )
    store._sealer = new
    return count
