"""Public material in the store: partners' certificates, trust anchors,
intermediates and CRLs, as functions over one open transaction.

Nothing here is secret, so nothing is sealed; all of it is still integrity-relevant
(a swapped partner certificate redirects mail), which is why only verified signatures
may be harvested and why administrators' changes are audited.

Not guaranteed: these functions do not validate certificate paths or CRL signatures.
The PKI layer does that with what :func:`anchors`, :func:`intermediate_certificates`
and :func:`latest_crls` return.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x448, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smimeproxy.errors import CertificateError, KeyNotFound, KeystoreError
from smimeproxy.keystore.interface import (
    CertificateRecord,
    CertificateSource,
    CRLRecord,
    TrustKind,
    TrustRecord,
)
from smimeproxy.keystore.schema import Row, Tx, from_text, to_text
from smimeproxy.pki.validation import a_label_domain, smtputf8_mailboxes, u_label_domain
from smimeproxy.smime.status import fingerprint

CERT_COLUMNS = (
    "fingerprint",
    "certificate",
    "source",
    "first_seen",
    "last_seen",
    "capabilities",
    "encryption_key_preference",
    "revoked",
)
_COLS = ", ".join(CERT_COLUMNS)
#: The same columns qualified with table alias ``c`` (for joins).
QUALIFIED = ", ".join("c." + c for c in CERT_COLUMNS)
#: Longest chain of intermediates :func:`chain_for` follows.
MAX_CHAIN = 8


def normalise(address: str) -> str:
    """Addresses and login names compare lower-cased and stripped.

    Except an address whose local part is not ASCII (an SMTPUTF8 mailbox, which a
    certificate names in an SmtpUTF8Mailbox): RFC 8398 section 5 compares its local
    part exactly, so it keeps its case, and its domain is compared after conversion to
    one form, here U-labels lower-cased (:func:`u_label_domain`), so ``jösé@例子.测试``
    and ``jösé@xn--fsqu00a.xn--0zwm56d`` are one key. An ASCII address is only
    lower-cased, as before: its domain is not converted (callers that may see an IDN
    domain in U-labels convert it, see :func:`smimeproxy.smtp.transform.store_address`).
    Not done: Unicode normalisation of a local part (NFC and NFD forms are two keys).
    """
    if address.isascii():
        return address.strip().lower()
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or local.isascii():
        return address.lower()
    return f"{local}@{u_label_domain(domain)}"


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def load_certificate(data: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(bytes(data))
    except ValueError:
        raise KeystoreError("a stored certificate is unreadable") from None


def _smtputf8_key(mailbox: str) -> str:
    """An SmtpUTF8Mailbox value as the store keys it: with a non-ASCII local part as
    :func:`normalise` gives it; with an ASCII one (RFC 8398 section 3 says to use an
    rfc822Name then, but not every CA does) as that rfc822Name would be, A-labels."""
    local, _at, domain = mailbox.strip().rpartition("@")
    if local.isascii():
        return f"{local}@{a_label_domain(domain)}"
    return mailbox


def certificate_addresses(cert: x509.Certificate) -> tuple[str, ...]:
    """rfc822Name SANs, then SmtpUTF8Mailbox SANs (RFC 8398), then subject
    emailAddress values, each as :func:`normalise` gives it, no duplicates."""
    found: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        found.extend(san.value.get_values_for_type(x509.RFC822Name))
        found.extend(_smtputf8_key(m) for m in smtputf8_mailboxes(san.value))
    except x509.ExtensionNotFound:
        pass
    except ValueError as e:
        raise CertificateError(f"unreadable subjectAltName: {e}") from None
    for attr in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        if isinstance(attr.value, str):
            found.append(attr.value)
    out: list[str] = []
    for a in found:
        n = normalise(a)
        if n and n not in out:
            out.append(n)
    return tuple(out)


def usable_for_encryption(cert: x509.Certificate, now: datetime.datetime) -> bool:
    """Valid at ``now``; EKU, if present, allows emailProtection (RFC 8550 section
    4.4.4); key usage, if present, allows keyEncipherment for RSA or keyAgreement for
    EC/X25519/X448 (RFC 8550 section 4.4.2). No path validation."""
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        return False
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if not (
            ExtendedKeyUsageOID.EMAIL_PROTECTION in eku
            or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku
        ):
            return False
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        return False
    try:
        public = cert.public_key()
        ku: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    except (ValueError, TypeError):
        return False
    if isinstance(public, rsa.RSAPublicKey):
        return ku is None or ku.key_encipherment
    if isinstance(public, ec.EllipticCurvePublicKey | x25519.X25519PublicKey | x448.X448PublicKey):
        return ku is None or ku.key_agreement
    return False


def self_signed(cert: x509.Certificate) -> bool:
    """Issuer equals subject and the certificate's own key verifies it."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # InvalidSignature, ValueError, TypeError, unsupported key types
        return False
    return True


def chain_for(
    cert: x509.Certificate, intermediates: Sequence[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """Intermediates from ``cert``'s issuer upwards (no anchors, at most MAX_CHAIN)."""
    chain: list[x509.Certificate] = []
    node = cert
    for _ in range(MAX_CHAIN):
        parent = None
        for candidate in intermediates:
            if candidate.subject != node.issuer or candidate in chain or candidate == node:
                continue
            try:
                node.verify_directly_issued_by(candidate)
            except Exception:  # wrong key, unsupported algorithm ...
                continue
            parent = candidate
            break
        if parent is None:
            break
        chain.append(parent)
        node = parent
    return tuple(chain)


# -- partners' certificates --------------------------------------------------------------


def to_record(tx: Tx, row: Row, cert: x509.Certificate | None = None) -> CertificateRecord:
    addresses = tx.all(
        "SELECT address FROM certificate_addresses WHERE fingerprint = ? ORDER BY address",
        (row[0],),
    )
    try:
        capabilities = tuple(json.loads(row[5]))
    except (TypeError, ValueError):
        capabilities = ()
    return CertificateRecord(
        fingerprint=row[0],
        addresses=tuple(a[0] for a in addresses),
        certificate=cert if cert is not None else load_certificate(row[1]),
        source=CertificateSource(row[2]),
        first_seen=from_text(row[3]),
        last_seen=from_text(row[4]),
        capabilities=capabilities,
        encryption_key_preference=row[6],
        revoked=bool(row[7]),
    )


def upsert(
    tx: Tx,
    cert: x509.Certificate,
    source: CertificateSource,
    seen: datetime.datetime,
    capabilities: Sequence[str] | None,
    preference: str | None,
) -> CertificateRecord:
    """Insert a certificate, or refresh ``last_seen`` (and, when given, capabilities and
    preference, if this sighting is the newest) of one already stored. The source of a
    stored certificate never changes. Safe against a concurrent insert of the same
    certificate on another node (``ON CONFLICT``)."""
    addresses = certificate_addresses(cert)
    if not addresses:
        raise CertificateError("the certificate names no email address")
    fp = fingerprint(cert)
    caps = None if capabilities is None else json.dumps([str(c) for c in capabilities])
    seen_text = to_text(seen)
    tx.run(
        f"INSERT INTO certificates ({_COLS}, not_before, not_after)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)"
        " ON CONFLICT (fingerprint) DO UPDATE SET"
        " capabilities = CASE WHEN ? = 1 AND excluded.last_seen >= certificates.last_seen"
        "   THEN excluded.capabilities ELSE certificates.capabilities END,"
        " encryption_key_preference = CASE WHEN ? = 1"
        "   AND excluded.last_seen >= certificates.last_seen"
        "   THEN excluded.encryption_key_preference"
        "   ELSE certificates.encryption_key_preference END,"
        " last_seen = CASE WHEN excluded.last_seen > certificates.last_seen"
        "   THEN excluded.last_seen ELSE certificates.last_seen END",
        (
            fp,
            der(cert),
            str(source),
            seen_text,
            seen_text,
            caps if caps is not None else "[]",
            preference,
            to_text(cert.not_valid_before_utc),
            to_text(cert.not_valid_after_utc),
            1 if caps is not None else 0,
            1 if caps is not None else 0,
        ),
    )
    for address in addresses:
        tx.run(
            "INSERT INTO certificate_addresses (fingerprint, address) VALUES (?, ?)"
            " ON CONFLICT (fingerprint, address) DO NOTHING",
            (fp, address),
        )
    return get(tx, fp)


#: what of a stored certificate an encryption lookup depends on (None: not stored)
LookupFacts = tuple[str, str | None, str, int] | None


def lookup_facts(tx: Tx, fp: str) -> LookupFacts:
    """Capabilities, preference, last_seen and revoked of a stored certificate."""
    row = tx.one(
        "SELECT capabilities, encryption_key_preference, last_seen, revoked"
        " FROM certificates WHERE fingerprint = ?",
        (fp,),
    )
    return None if row is None else (str(row[0]), row[1], str(row[2]), int(row[3]))


def refresh_changes_lookups(tx: Tx, fp: str, before: LookupFacts, after: LookupFacts) -> bool:
    """Whether an upsert that turned ``before`` into ``after`` can change what
    :func:`best_for_encryption` chooses for any address, at any time.

    A new certificate, new capabilities or a new preference can. A later last_seen
    alone matters only through the order by last_seen: among certificates naming a
    preference (when this one names one and another sharing an address does too),
    and as the tie-break between certificates with the same notBefore. Errs towards
    True."""
    if before is None or after is None or before[:2] != after[:2] or before[3] != after[3]:
        return True
    if before[2] == after[2]:
        return False
    mine = "me.encryption_key_preference IS NOT NULL AND " if after[1] is not None else "1 = 0 AND "
    row = tx.one(
        "SELECT 1 FROM certificate_addresses a"
        " JOIN certificate_addresses b ON b.address = a.address AND b.fingerprint <> a.fingerprint"
        " JOIN certificates c ON c.fingerprint = b.fingerprint"
        " JOIN certificates me ON me.fingerprint = a.fingerprint"
        " WHERE a.fingerprint = ? AND (c.not_before = me.not_before OR"
        f" ({mine}c.encryption_key_preference IS NOT NULL)) LIMIT 1",
        (fp,),
    )
    return row is not None


def get(tx: Tx, fp: str) -> CertificateRecord:
    row = tx.one(f"SELECT {_COLS} FROM certificates WHERE fingerprint = ?", (fp.lower(),))
    if row is None:
        raise KeyNotFound(f"no certificate {fp}")
    return to_record(tx, row)


def listing(tx: Tx, address: str | None = None) -> list[CertificateRecord]:
    if address is None:
        rows = tx.all(f"SELECT {_COLS} FROM certificates ORDER BY not_before DESC, fingerprint")
    else:
        rows = tx.all(
            f"SELECT {QUALIFIED} FROM certificate_addresses a"
            " JOIN certificates c ON c.fingerprint = a.fingerprint"
            " WHERE a.address = ? ORDER BY c.not_before DESC, c.fingerprint",
            (normalise(address),),
        )
    return [to_record(tx, r) for r in rows]


def _choose(
    candidates: Sequence[tuple[x509.Certificate, Any, str | None, str]], now: datetime.datetime
) -> int | None:
    """The index of the certificate to encrypt to among ``candidates`` (certificate,
    last_seen as stored text or as datetime, all alike, preferred fingerprint, own
    fingerprint), given in the
    order notBefore descending, last_seen descending; None if none qualifies.

    Unrevoked is the caller's filter. Here: inside its validity at ``now`` and fit for
    encryption (:func:`usable_for_encryption`); the one the most recently seen signature
    preferred (SMIMEEncryptionKeyPreference) if it qualifies, else the first (issued
    last)."""
    valid = [
        i
        for i, (cert, *_rest) in enumerate(candidates)
        if cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    ]
    usable = [i for i in valid if usable_for_encryption(candidates[i][0], now)]
    if not usable:
        return None
    chosen = usable[0]
    by_fp = {candidates[i][3]: i for i in usable}
    # stored times are fixed-width text, so text order is time order
    for i in sorted(valid, key=lambda i: candidates[i][1], reverse=True):
        if candidates[i][2]:
            chosen = by_fp.get(candidates[i][2], chosen)
            break
    return chosen


def best_for_encryption(tx: Tx, address: str, now: datetime.datetime) -> CertificateRecord | None:
    """The certificate to encrypt to ``address`` among the stored ones: unrevoked,
    inside its validity and fit for encryption (:func:`usable_for_encryption`); the
    one the most recently seen signature preferred (SMIMEEncryptionKeyPreference) if
    it qualifies, else the one issued last. One query for the candidates, one for the
    chosen record's addresses."""
    rows = tx.all(
        f"SELECT {QUALIFIED} FROM certificate_addresses a"
        " JOIN certificates c ON c.fingerprint = a.fingerprint"
        " WHERE a.address = ? AND c.revoked = 0 AND c.not_before <= ? AND c.not_after > ?"
        " ORDER BY c.not_before DESC, c.last_seen DESC",
        (normalise(address), to_text(now), to_text(now)),
    )
    parsed = [(row, load_certificate(row[1])) for row in rows]
    chosen = _choose([(cert, str(row[4]), row[6], row[0]) for row, cert in parsed], now)
    return None if chosen is None else to_record(tx, parsed[chosen][0], parsed[chosen][1])


@dataclass(frozen=True)
class EncryptionCandidates:
    """Everything the store holds that could answer "which certificate to encrypt to
    ``address``", whatever the time: the local user's current certificate (if the
    address is a user's) and every unrevoked external certificate for the address, in
    the order :func:`best_for_encryption` ranks them.

    It depends only on the store's contents, so it may be kept as long as the store
    generation is unchanged; :meth:`best` then gives, at any ``now``, the answer
    :meth:`SyncStore.encryption_certificate` would give at that time.
    """

    address: str
    local: CertificateRecord | None
    external: tuple[CertificateRecord, ...]

    def best(self, now: datetime.datetime) -> CertificateRecord | None:
        if self.local is not None and usable_for_encryption(self.local.certificate, now):
            return self.local
        chosen = _choose(
            [
                (r.certificate, r.last_seen, r.encryption_key_preference, r.fingerprint)
                for r in self.external
            ],
            now,
        )
        return None if chosen is None else self.external[chosen]


def external_candidates(tx: Tx, address: str) -> tuple[CertificateRecord, ...]:
    """Every unrevoked stored certificate for ``address`` (any validity), ranked as
    :func:`best_for_encryption` ranks them; two queries whatever their number."""
    name = normalise(address)
    rows = tx.all(
        f"SELECT {QUALIFIED} FROM certificate_addresses a"
        " JOIN certificates c ON c.fingerprint = a.fingerprint"
        " WHERE a.address = ? AND c.revoked = 0"
        " ORDER BY c.not_before DESC, c.last_seen DESC",
        (name,),
    )
    if not rows:
        return ()
    names: dict[str, list[str]] = {}
    for fp, other in tx.all(
        "SELECT b.fingerprint, b.address FROM certificate_addresses a"
        " JOIN certificate_addresses b ON b.fingerprint = a.fingerprint"
        " WHERE a.address = ? ORDER BY b.address",
        (name,),
    ):
        names.setdefault(fp, []).append(other)
    out = []
    for row in rows:
        try:
            capabilities = tuple(json.loads(row[5]))
        except (TypeError, ValueError):
            capabilities = ()
        out.append(
            CertificateRecord(
                fingerprint=row[0],
                addresses=tuple(names.get(row[0], ())),
                certificate=load_certificate(row[1]),
                source=CertificateSource(row[2]),
                first_seen=from_text(row[3]),
                last_seen=from_text(row[4]),
                capabilities=capabilities,
                encryption_key_preference=row[6],
                revoked=bool(row[7]),
            )
        )
    return tuple(out)


# -- trust anchors and intermediates --------------------------------------------------------


def add_trust(
    tx: Tx, cert: x509.Certificate, kind: TrustKind | None, now: datetime.datetime
) -> TrustRecord:
    """Store an anchor or intermediate (self-signed means anchor unless ``kind``)."""
    if kind is None:
        kind = TrustKind.ANCHOR if self_signed(cert) else TrustKind.INTERMEDIATE
    fp = fingerprint(cert)
    tx.run(
        "INSERT INTO trust (fingerprint, kind, subject, certificate, added) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (fingerprint) DO UPDATE SET kind = excluded.kind",
        (fp, str(kind), cert.subject.rfc4514_string(), der(cert), to_text(now)),
    )
    row = tx.one(
        "SELECT fingerprint, kind, certificate, added FROM trust WHERE fingerprint = ?", (fp,)
    )
    assert row is not None
    return _trust_record(row)


def _trust_record(row: Row) -> TrustRecord:
    return TrustRecord(row[0], TrustKind(row[1]), load_certificate(row[2]), from_text(row[3]))


def trust_records(tx: Tx, kind: TrustKind | None = None) -> list[TrustRecord]:
    sql = "SELECT fingerprint, kind, certificate, added FROM trust"
    params: tuple[Any, ...] = ()
    if kind is not None:
        sql += " WHERE kind = ?"
        params = (str(kind),)
    return [_trust_record(r) for r in tx.all(sql + " ORDER BY subject, fingerprint", params)]


# -- CRLs -----------------------------------------------------------------------------------


def add_crl(tx: Tx, crl: x509.CertificateRevocationList, now: datetime.datetime) -> bool:
    """Keep ``crl`` if it is the newest (by thisUpdate) for its issuer; True if kept.
    Concurrent adds from several nodes converge on the newest (``ON CONFLICT``)."""
    issuer = crl.issuer.public_bytes().hex()
    this_update = to_text(crl.last_update_utc)
    next_update = crl.next_update_utc
    changed = tx.run(
        "INSERT INTO crls (issuer, crl, this_update, next_update, added) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (issuer) DO UPDATE SET crl = excluded.crl,"
        " this_update = excluded.this_update, next_update = excluded.next_update,"
        " added = excluded.added WHERE excluded.this_update > crls.this_update",
        (
            issuer,
            crl.public_bytes(serialization.Encoding.DER),
            this_update,
            None if next_update is None else to_text(next_update),
            to_text(now),
        ),
    )
    return changed > 0


def latest_crls(tx: Tx) -> list[CRLRecord]:
    out = []
    for row in tx.all("SELECT crl, this_update, next_update, added FROM crls ORDER BY issuer"):
        try:
            crl = x509.load_der_x509_crl(bytes(row[0]))
        except ValueError:
            raise KeystoreError("a stored CRL is unreadable") from None
        out.append(
            CRLRecord(
                crl.issuer.rfc4514_string(),
                crl,
                from_text(row[1]),
                None if row[2] is None else from_text(row[2]),
                from_text(row[3]),
            )
        )
    return out
