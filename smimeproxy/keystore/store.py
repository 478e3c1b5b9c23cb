"""The key store itself: one implementation of the SQL, called directly (blocking) by
the command line and through :class:`smimeproxy.keystore.interface.Keystore` by the
services.

Everything that must hold across nodes is held by the database: one owner per address
(primary key), one current key per user (partial unique index), rotation as one
transaction, the audit chain by sequence-number primary key. The object keeps no state
but the database handle, the key-encryption key and the clock; nothing is cached here.
Every write that can change a lookup's answer moves the store generation in its own
transaction (:meth:`generation`), which is what lets callers keep lookups in memory
safely across nodes (:mod:`smimeproxy.keystore.cache`).

Not guaranteed here: certificate *path* validation (chain to an anchor, CRL status).
:meth:`SyncStore.encryption_certificate` checks only what the store can decide alone
(validity period, not marked revoked, emailProtection and key usage fit for
encryption); the PKI layer validates the path with :meth:`trust_anchors`,
:meth:`intermediates` and :meth:`crls`.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from twisted.logger import Logger

from smimeproxy.errors import (
    CertificateError,
    KeyNotFound,
    KeystoreError,
    MasterKeyError,
    SealError,
)
from smimeproxy.keystore import audit, users
from smimeproxy.keystore import certificates as certs
from smimeproxy.keystore.interface import (
    CertificateRecord,
    CertificateSource,
    KeyRecord,
    KeyState,
    SigningIdentity,
)
from smimeproxy.keystore.public import PublicRecords
from smimeproxy.keystore.schema import (
    Database,
    Row,
    Tx,
    bump_generation,
    from_text,
    migrate,
    to_text,
)
from smimeproxy.keystore.sealing import MasterSecret, Sealer, new_kdf_parameters
from smimeproxy.smime.keys import KeyPair, PrivateKey, SoftwareKey
from smimeproxy.smime.status import fingerprint

#: Resolves a key held in a PKCS#11 token: (hsm_reference, certificate) -> PrivateKey.
HSMResolver = Callable[[str, x509.Certificate], PrivateKey]

#: How often a rotation is redone after losing a race with another node's rotation.
ROTATION_ATTEMPTS = 5

_KEY_COLUMNS = (
    "id, owner, certificate, state, created, not_after, revoked_reason, sealed, hsm_reference"
)


class _CurrentKeyRace(Exception):
    """Another node made a key current for the same user inside our transaction."""


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _spki(public: Any) -> bytes:
    return bytes(
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _material(key: PrivateKeyTypes | PrivateKey) -> PrivateKeyTypes:
    """The ``cryptography`` key inside ``key`` (a SoftwareKey or a raw key object)."""
    if isinstance(key, SoftwareKey):
        return key.private_key
    if hasattr(key, "private_bytes"):
        return key  # type: ignore[return-value]
    raise KeystoreError(
        f"a {type(key).__name__} cannot be sealed in the store; import token keys by hsm_reference"
    )


class SyncStore(PublicRecords):
    """The blocking key store over a :class:`Database`. Use :meth:`open`."""

    _log = Logger()

    def __init__(
        self,
        db: Database,
        sealer: Sealer,
        *,
        now: Callable[[], datetime.datetime] = utcnow,
        hsm: HSMResolver | None = None,
    ):
        self.db = db
        self._sealer = sealer
        self._now = now
        self._hsm = hsm

    def __repr__(self) -> str:
        return f"<SyncStore {self.db.describe()}>"

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        db: Database,
        master: MasterSecret,
        *,
        create: bool = False,
        now: Callable[[], datetime.datetime] = utcnow,
        hsm: HSMResolver | None = None,
    ) -> SyncStore:
        """Open (and with ``create``, initialise) the store, migrating its schema.

        Raises :class:`MasterKeyError` naming where ``master`` came from when it is not
        the secret this store was sealed with, and :class:`KeystoreError` when the
        store was never initialised and ``create`` is false.
        """
        migrate(db, now)
        params, check = cls._read_kek_meta(db)
        if params is None or check is None:
            if not create:
                raise KeystoreError(
                    f"the key store at {db.describe()} is not initialised (run smimeproxy init)"
                )
            fresh = new_kdf_parameters(master)
            sealer = Sealer.derive(master, fresh)
            with db.transaction() as tx:
                for name, value in (
                    ("kek_kdf", json.dumps(fresh)),
                    ("kek_check", sealer.check_value().hex()),
                ):
                    tx.run(
                        "INSERT INTO meta (name, value) VALUES (?, ?)"
                        " ON CONFLICT (name) DO NOTHING",
                        (name, value),
                    )
            params, check = cls._read_kek_meta(db)
            if params is None or check is None:  # pragma: no cover - defensive
                raise KeystoreError("the key store's meta table could not be initialised")
        sealer = Sealer.derive(master, params)
        sealer.verify_check_value(check)
        return cls(db, sealer, now=now, hsm=hsm)

    @staticmethod
    def _read_kek_meta(db: Database) -> tuple[dict[str, Any] | None, bytes | None]:
        with db.transaction(write=False) as tx:
            rows: dict[str, str] = dict(
                tx.all("SELECT name, value FROM meta WHERE name IN ('kek_kdf', 'kek_check')")
            )
        try:
            params = json.loads(rows["kek_kdf"]) if "kek_kdf" in rows else None
            check = bytes.fromhex(rows["kek_check"]) if "kek_check" in rows else None
        except ValueError:
            raise MasterKeyError("the store's key check value is damaged") from None
        return params, check

    def close(self) -> None:
        """Close the calling thread's connection."""
        self.db.close()

    # -- keys -------------------------------------------------------------------------

    def import_key(
        self,
        key: PrivateKeyTypes | PrivateKey | None,
        certificate: x509.Certificate,
        *,
        current: bool | None = None,
        hsm_reference: str | None = None,
        create_user: bool = True,
        actor: str = "system",
    ) -> KeyRecord:
        """Store a private key with its certificate; the owner is the user holding the
        certificate's address (created when missing and ``create_user``).

        With ``current=True`` the key becomes the user's current key and the one before
        it becomes ``previous``, in one transaction; with ``False`` it is stored as
        ``previous`` (an old key kept to read old mail); with ``None`` (the default) it
        becomes current only if the user has no current key or its certificate is not
        older (notBefore) than the current one, so importing an old PKCS#12 to read
        old mail never demotes a newer key. A key held in a PKCS#11 token is given as
        ``key=None`` and ``hsm_reference``.
        """
        return self._store_key(
            None, key, certificate, current, hsm_reference, create_user, actor, "key.import"
        )

    def rotate(
        self,
        address: str,
        key: PrivateKeyTypes | PrivateKey | None,
        certificate: x509.Certificate,
        *,
        hsm_reference: str | None = None,
        actor: str = "system",
    ) -> KeyRecord:
        """Make a new key ``address``'s current one; the old current key becomes
        ``previous`` (kept for decryption). Atomic: a concurrent rotation of the same
        user on another node makes one of the two fail with KeystoreError."""
        return self._store_key(
            address, key, certificate, True, hsm_reference, False, actor, "key.rotate"
        )

    def _store_key(
        self,
        address: str | None,
        key: PrivateKeyTypes | PrivateKey | None,
        certificate: x509.Certificate,
        current: bool | None,
        hsm_reference: str | None,
        create_user: bool,
        actor: str,
        action: str,
    ) -> KeyRecord:
        key_id = fingerprint(certificate)
        sealed_plain: bytes | None = None
        if key is None:
            if not hsm_reference:
                raise KeystoreError("a key needs either private key material or an hsm_reference")
        else:
            material = _material(key)
            if _spki(material.public_key()) != _spki(certificate.public_key()):
                raise CertificateError("the private key does not belong to the certificate")
            sealed_plain = material.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        addresses = certs.certificate_addresses(certificate)
        if not addresses:
            raise CertificateError("the certificate names no email address")
        now = self._now()
        for _attempt in range(ROTATION_ATTEMPTS):
            try:
                with self.db.transaction() as tx:
                    user_id, state, sealed = self._write_key(
                        tx, address, key_id, sealed_plain, certificate, addresses, current,
                        hsm_reference, create_user, now, actor, action,
                    )  # fmt: skip
                break
            except _CurrentKeyRace:
                continue  # another node rotated this user meanwhile: redo on top of it
        else:
            raise KeystoreError(
                f"could not make key {key_id} current: other nodes keep rotating this user"
            )
        self._log.info(
            "key {action} for {owner}: {key_id} ({state})",
            action=action,
            owner=addresses[0],
            key_id=key_id,
            state=str(state),
        )
        return KeyRecord(
            key_id,
            user_id,
            certificate,
            state,
            now,
            certificate.not_valid_after_utc,
            None,
            sealed,
            hsm_reference,
        )

    def _write_key(
        self,
        tx: Tx,
        address: str | None,
        key_id: str,
        sealed_plain: bytes | None,
        certificate: x509.Certificate,
        addresses: tuple[str, ...],
        current: bool | None,
        hsm_reference: str | None,
        create_user: bool,
        now: datetime.datetime,
        actor: str,
        action: str,
    ) -> tuple[str, KeyState, bytes | None]:
        if address is not None:
            user_id = users.user_id(tx, address)
            if not users.user_addresses(tx, user_id).intersection(addresses):
                raise CertificateError(
                    f"the certificate is for {', '.join(addresses)}, not {certs.normalise(address)}"
                )
        else:
            user_id = self._owner_for(tx, addresses, create_user)
        sealed = (
            None
            if sealed_plain is None
            else self._sealer.seal(sealed_plain, owner_id=user_id, key_id=key_id)
        )
        if current is None:
            row = tx.one(
                "SELECT certificate FROM keys WHERE owner = ? AND state = 'current'",
                (user_id,),
            )
            current = row is None or (
                certificate.not_valid_before_utc
                >= certs.load_certificate(row[0]).not_valid_before_utc
            )
        replaced = None
        if current:
            row = tx.one("SELECT id FROM keys WHERE owner = ? AND state = 'current'", (user_id,))
            replaced = None if row is None else row[0]
            tx.run(
                "UPDATE keys SET state = 'previous' WHERE owner = ? AND state = 'current'",
                (user_id,),
            )
        state = KeyState.CURRENT if current else KeyState.PREVIOUS

        def insert(t: Tx) -> None:
            t.run(
                f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    user_id,
                    certs.der(certificate),
                    str(state),
                    to_text(now),
                    to_text(certificate.not_valid_after_utc),
                    None,
                    sealed,
                    hsm_reference,
                ),
            )

        try:
            tx.attempt("key", insert)
        except tx.integrity_errors:
            if tx.one("SELECT 1 FROM keys WHERE id = ?", (key_id,)):
                raise KeystoreError(f"key {key_id} is already in the store") from None
            raise _CurrentKeyRace() from None
        detail: dict[str, Any] = {"key": key_id, "state": str(state)}
        if replaced:
            detail["replaced"] = replaced
        if hsm_reference:
            detail["hsm"] = True
        bump_generation(tx)
        audit.append(tx, self._now, actor, action, addresses[0], detail)
        return user_id, state, sealed

    def _owner_for(self, tx: Tx, addresses: tuple[str, ...], create_user: bool) -> str:
        try:
            found = users.owner_of(tx, addresses)
        except KeystoreError:
            raise CertificateError(
                f"the certificate's addresses {', '.join(addresses)} belong to different users"
            ) from None
        if found is not None:
            return found
        if not create_user:
            raise KeyNotFound(f"no user {addresses[0]}")
        uid = users.insert_user(tx, addresses[0], self._now())
        for alias in addresses[1:]:
            users.insert_address(tx, uid, alias, "alias")
        audit.append(tx, self._now, "system", "user.add", addresses[0], {"from": "key import"})
        return uid

    def revoke_key(self, key_id: str, reason: str, *, actor: str = "system") -> KeyRecord:
        """Mark a key revoked (it still decrypts old mail; it no longer signs or is
        encrypted to). The CA's CRL is the PKI layer's business."""
        with self.db.transaction() as tx:
            record = self._key_row(tx, key_id)
            tx.run(
                "UPDATE keys SET state = 'revoked', revoked_reason = ? WHERE id = ?",
                (reason, record.id),
            )
            bump_generation(tx)
            owner = users.user_by_id(tx, record.owner).address
            audit.append(
                tx,
                self._now,
                actor,
                "key.revoke",
                owner,
                {"key": record.id, "reason": reason, "was": str(record.state)},
            )
        self._log.info("key revoked for {owner}: {key_id}", owner=owner, key_id=record.id)
        return self.key(record.id)

    def key(self, key_id: str) -> KeyRecord:
        with self.db.transaction(write=False) as tx:
            return self._key_row(tx, key_id)

    def _key_row(self, tx: Tx, key_id: str) -> KeyRecord:
        row = tx.one(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id.lower(),))
        if row is None:
            raise KeyNotFound(f"no key {key_id}")
        return self._to_key(row)

    def keys(self, address_or_login: str | None = None) -> list[KeyRecord]:
        """Key records (still sealed): all, or one user's, current first, newest first."""
        order = (
            " ORDER BY CASE state WHEN 'current' THEN 0 WHEN 'previous' THEN 1 ELSE 2 END,"
            " created DESC, id"
        )
        with self.db.transaction(write=False) as tx:
            if address_or_login is None:
                rows = tx.all(f"SELECT {_KEY_COLUMNS} FROM keys" + order)
            else:
                user_id = users.user_id(tx, address_or_login)
                rows = tx.all(
                    f"SELECT {_KEY_COLUMNS} FROM keys WHERE owner = ?" + order, (user_id,)
                )
        return [self._to_key(r) for r in rows]

    @staticmethod
    def _to_key(row: Row) -> KeyRecord:
        return KeyRecord(
            row[0],
            row[1],
            certs.load_certificate(row[2]),
            KeyState(row[3]),
            from_text(row[4]),
            from_text(row[5]),
            row[6],
            None if row[7] is None else bytes(row[7]),
            row[8],
        )

    def key_pair(self, record: KeyRecord) -> KeyPair:
        """Unseal one key record into a :class:`KeyPair` the engine can use."""
        if fingerprint(record.certificate) != record.id:
            raise SealError(f"key {record.id}: the stored certificate was replaced")
        if record.sealed is None:
            if record.hsm_reference is None:  # pragma: no cover - excluded by a CHECK
                raise KeystoreError(f"key {record.id} has neither sealed material nor a token")
            if self._hsm is None:
                raise KeystoreError(
                    f"key {record.id} is held in a PKCS#11 token, but no token is configured"
                )
            return KeyPair(record.certificate, self._hsm(record.hsm_reference, record.certificate))
        return KeyPair(record.certificate, SoftwareKey(self._unseal(record)))

    def _unseal(self, record: KeyRecord) -> PrivateKeyTypes:
        assert record.sealed is not None
        try:
            der = self._sealer.open(record.sealed, owner_id=record.owner, key_id=record.id)
        except SealError:
            self._check_master_still_valid()
            raise
        try:
            # The bytes were validated at import and are authenticated by AES-GCM, so
            # the slow RSA consistency check need not run again on every lookup.
            return serialization.load_der_private_key(
                der, None, unsafe_skip_rsa_key_validation=True
            )
        except (ValueError, TypeError):
            raise SealError(f"key {record.id} opened but is not a readable private key") from None

    def _check_master_still_valid(self) -> None:
        params, check = self._read_kek_meta(self.db)
        if check is None or params is None:
            raise KeystoreError("the key store's meta table lost its check value")
        try:
            self._sealer.verify_check_value(check)
        except MasterKeyError:
            raise MasterKeyError(
                "the store was resealed under a new master secret since it was opened;"
                " restart with the new master key"
            ) from None

    def export_key(
        self,
        key_id: str,
        *,
        reason: str,
        password: bytes | None = None,
        actor: str = "system",
    ) -> bytes:
        """The private key as PKCS#8 PEM (encrypted when ``password`` is given).
        Always audited, with ``reason``; token-held keys cannot be exported."""
        record = self.key(key_id)
        if record.sealed is None:
            raise KeystoreError(f"key {record.id} is held in a PKCS#11 token and cannot leave it")
        material = self._unseal(record)
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        pem = material.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        with self.db.transaction() as tx:
            owner = users.user_by_id(tx, record.owner).address
            audit.append(
                tx,
                self._now,
                actor,
                "key.export",
                owner,
                {"key": record.id, "reason": reason, "encrypted": bool(password)},
            )
        self._log.info("private key exported for {owner}: {key_id}", owner=owner, key_id=record.id)
        return pem

    def reseal(self, new_master: MasterSecret, *, actor: str = "system") -> int:
        """Re-seal every private key under ``new_master`` in one transaction; returns
        how many. Other nodes still holding the old secret fail with MasterKeyError at
        their next unseal and must restart with the new one."""
        params = new_kdf_parameters(new_master)
        new = Sealer.derive(new_master, params)
        with self.db.transaction() as tx:
            rows = tx.all(f"SELECT {_KEY_COLUMNS} FROM keys WHERE sealed IS NOT NULL")
            for row in rows:
                record = self._to_key(row)
                assert record.sealed is not None
                plain = self._sealer.open(record.sealed, owner_id=record.owner, key_id=record.id)
                tx.run(
                    "UPDATE keys SET sealed = ? WHERE id = ?",
                    (new.seal(plain, owner_id=record.owner, key_id=record.id), record.id),
                )
            tx.run("UPDATE meta SET value = ? WHERE name = 'kek_kdf'", (json.dumps(params),))
            tx.run("UPDATE meta SET value = ? WHERE name = 'kek_check'", (new.check_value().hex(),))
            bump_generation(tx)
            audit.append(
                tx,
                self._now,
                actor,
                "store.reseal",
                self.db.describe(),
                {"keys": len(rows), "master": new_master.origin, "kdf": params["kdf"]},
            )
        self._sealer = new
        self._log.info("key store resealed: {count} keys", count=len(rows))
        return len(rows)

    # -- the lookups the faces need -----------------------------------------------------

    def decryption_keys(self, address_or_login: str) -> list[KeyPair]:
        """Every key of the user (current, previous and revoked: old mail stays
        readable), unsealed; current first. KeyNotFound for an unknown user."""
        return [self.key_pair(r) for r in self.keys(address_or_login)]

    def signing_key(self, address: str) -> SigningIdentity:
        """The current key pair of the user owning ``address``, with intermediates.
        KeyNotFound when there is no such user or no current key."""
        with self.db.transaction(write=False) as tx:
            user_id = users.user_id(tx, address)
            row = tx.one(
                f"SELECT {_KEY_COLUMNS} FROM keys WHERE owner = ? AND state = 'current'",
                (user_id,),
            )
            if row is None:
                raise KeyNotFound(f"{certs.normalise(address)} has no current key")
            intermediates = [
                certs.load_certificate(r[0])
                for r in tx.all("SELECT certificate FROM trust WHERE kind = 'intermediate'")
            ]
        record = self._to_key(row)
        return SigningIdentity(
            self.key_pair(record), certs.chain_for(record.certificate, intermediates)
        )

    def encryption_certificate(self, address: str) -> CertificateRecord | None:
        """The best certificate to encrypt to ``address``, or None.

        A local user's current certificate wins; otherwise the external certificates
        for the address that are valid now, not revoked and fit for encryption (see
        :func:`certificates.usable_for_encryption`): the one the owner's most recent signature
        preferred (SMIMEEncryptionKeyPreference) if it is among them, else the one
        issued last. The chain is not validated here. A local user whose current
        certificate is expired or unfit falls back to external certificates.
        """
        name = certs.normalise(address)
        now = self._now()
        with self.db.transaction(write=False) as tx:
            local = self._local_certificate(tx, name)
            if local is not None and certs.usable_for_encryption(local.certificate, now):
                return local
            return certs.best_for_encryption(tx, name, now)

    def encryption_candidates(self, address: str) -> certs.EncryptionCandidates:
        """What :meth:`encryption_certificate` chooses from, independent of the time:
        ``encryption_candidates(a).best(now)`` is ``encryption_certificate(a)`` at
        ``now`` for as long as :meth:`generation` is unchanged. For callers that keep
        lookups in memory (one more query than :meth:`encryption_certificate`)."""
        name = certs.normalise(address)
        with self.db.transaction(write=False) as tx:
            return certs.EncryptionCandidates(
                name, self._local_certificate(tx, name), certs.external_candidates(tx, name)
            )

    @staticmethod
    def _local_certificate(tx: Tx, name: str) -> CertificateRecord | None:
        """The current certificate of the local user owning address ``name``."""
        row = tx.one(
            "SELECT k.certificate, k.created FROM addresses a"
            " JOIN keys k ON k.owner = a.user_id AND k.state = 'current'"
            " WHERE a.address = ?",
            (name,),
        )
        if row is None:
            return None
        cert = certs.load_certificate(row[0])
        created = from_text(row[1])
        return CertificateRecord(
            fingerprint(cert),
            certs.certificate_addresses(cert),
            cert,
            CertificateSource.LOCAL,
            created,
            created,
        )
