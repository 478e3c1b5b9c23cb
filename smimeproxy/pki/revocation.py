"""Revocation by CRL (RFC 5280 section 6.3), one certificate and its issuer at a time.

The path validator (:mod:`smimeproxy.pki.validation`) asks, for every non-anchor
certificate of a path, whether the CRLs it was given say anything about it. The answer
is one of three: revoked (with reason and date), good (a current CRL from the issuer
covers it and does not list it), or unknown (no usable CRL). Policy, i.e. what
"unknown" means for trust, is the validator's business, not this module's.

What is deliberately NOT done (and therefore can only lead to "unknown", never to a
false "good"):

* OCSP (RFC 6960) is out of scope; nothing is fetched from the network, CRLs come
  only from the caller (the key store).
* Indirect CRLs (issuingDistributionPoint indirectCRL, certificateIssuer entries) and
  delta CRLs (RFC 5280 5.2.4) are ignored.
* A CRL whose issuingDistributionPoint restricts it to some reasons
  (onlySomeReasons) never makes a certificate "good", but its entries still revoke.
* The revocation date is not compared with the validation time: a listed certificate
  is revoked whatever time is asked about (conservative for back-dated signatures).

A listed certificate is revoked even when the CRL is stale: revocation is final
(RFC 5280 5.3.1), except for ``certificateHold``, which a stale CRL cannot prove.
"""

from __future__ import annotations

import datetime
import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import ExtensionOID

#: Exceptions ``cryptography`` raises while lazily decoding a hostile certificate or CRL.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    UnsupportedAlgorithm,
    InvalidSignature,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.InvalidVersion,
)


class RevocationState(enum.StrEnum):
    """What the CRLs say about one certificate."""

    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RevocationFinding:
    """The state of one certificate with a human detail (names, dates, reason)."""

    state: RevocationState
    detail: str


def describe(cert: x509.Certificate) -> str:
    """A short, safe name for a certificate in a detail text (never raises)."""
    try:
        return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"
    except DECODE_ERRORS:
        return "an unreadable certificate"


#: :func:`describe` per certificate (they hash and compare by their DER): the same
#: chains are checked for every message
_described = functools.lru_cache(maxsize=1024)(describe)


def _utc(value: datetime.datetime) -> datetime.datetime:
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def _issuer_may_sign_crls(issuer: x509.Certificate) -> bool:
    """RFC 5280 4.2.1.3: a keyUsage without cRLSign forbids CRL signing."""
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.crl_sign


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        if crl.issuer != issuer.subject:
            return False
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except DECODE_ERRORS:
        return False


def _scope(
    crl: x509.CertificateRevocationList, cert: x509.Certificate, is_ca: bool
) -> tuple[bool, bool]:
    """(usable at all, complete for this certificate) from the CRL's extensions."""
    try:
        extensions = crl.extensions
    except DECODE_ERRORS:
        return False, False
    complete = True
    for ext in extensions:
        if ext.oid == ExtensionOID.DELTA_CRL_INDICATOR:
            return False, False
        if ext.oid == ExtensionOID.ISSUING_DISTRIBUTION_POINT:
            idp = ext.value
            assert isinstance(idp, x509.IssuingDistributionPoint)
            if idp.indirect_crl or idp.only_contains_attribute_certs:
                return False, False
            if (idp.only_contains_ca_certs and not is_ca) or (
                idp.only_contains_user_certs and is_ca
            ):
                return False, False
            if idp.full_name and not _distribution_point_matches(idp.full_name, cert):
                return False, False
            complete = idp.only_some_reasons is None
        elif ext.critical and ext.oid not in (
            ExtensionOID.CRL_NUMBER,
            ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ):
            return False, False  # an unknown critical CRL extension (RFC 5280 5.2)
    return True, complete


def _distribution_point_matches(names: Sequence[x509.GeneralName], cert: x509.Certificate) -> bool:
    """RFC 5280 6.3.3 (b)(2)(i): a partitioned CRL covers only its distribution point."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return False
    wanted = set(names)
    return any(dp.full_name and wanted.intersection(dp.full_name) for dp in points)


def _entry_text(entry: x509.RevokedCertificate) -> tuple[str, bool]:
    """Human text for a CRL entry, and whether it is only a hold."""
    reason = "unspecified"
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
    except x509.ExtensionNotFound:
        pass
    except DECODE_ERRORS:
        reason = "unreadable reason"
    try:
        when = entry.revocation_date_utc.isoformat()
    except DECODE_ERRORS:
        when = "an unreadable date"
    return f"reason {reason}, revoked on {when}", reason == x509.ReasonFlags.certificate_hold.name


def crl_status(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    crls: Sequence[x509.CertificateRevocationList],
    at: datetime.datetime,
) -> RevocationFinding:
    """What ``crls`` say about ``cert`` (issued by ``issuer``) at time ``at``.

    Only CRLs whose issuer name equals the certificate issuer's subject *and* whose
    signature verifies with the issuer's key count; any other CRL is ignored (a CRL
    from a stranger can neither revoke nor clear a certificate). Never raises for
    malformed input: unreadable CRLs are skipped, an unreadable certificate is unknown.
    """
    at = _utc(at)
    name = _described(cert)
    try:
        serial = cert.serial_number
        is_ca = _is_ca(cert)
        may_sign = _issuer_may_sign_crls(issuer)
    except DECODE_ERRORS:
        return RevocationFinding(RevocationState.UNKNOWN, f"{name}: unreadable certificate")
    if not may_sign:
        return RevocationFinding(
            RevocationState.UNKNOWN, f"{name}: its issuer's keyUsage does not allow cRLSign"
        )
    stale: list[str] = []
    revoked_in_stale: list[str] = []
    partial = False
    for crl in crls:
        if not _signed_by(crl, issuer):
            continue
        usable, complete = _scope(crl, cert, is_ca)
        if not usable:
            continue
        try:
            entry = crl.get_revoked_certificate_by_serial_number(serial)
            this_update = crl.last_update_utc
            next_update = crl.next_update_utc
        except DECODE_ERRORS:
            continue
        current = this_update <= at and (next_update is None or at <= next_update)
        if entry is not None:
            text, hold = _entry_text(entry)
            if current or not hold:
                return RevocationFinding(RevocationState.REVOKED, f"{name} is revoked: {text}")
            revoked_in_stale.append(text)
            continue
        if not current:
            until = next_update.isoformat() if next_update else "?"
            stale.append(f"CRL valid {this_update.isoformat()} .. {until}")
            continue
        if not complete:
            partial = True
            continue
        return RevocationFinding(
            RevocationState.GOOD,
            f"{name} not listed in the CRL of {this_update.isoformat()}",
        )
    if revoked_in_stale:
        detail = f"{name} on hold in a stale CRL ({revoked_in_stale[0]})"
    elif stale:
        detail = f"{name}: only a stale CRL from its issuer ({stale[0]}, time {at.isoformat()})"
    elif partial:
        detail = f"{name}: only CRLs limited to some reasons"
    else:
        detail = f"{name}: no CRL from its issuer"
    return RevocationFinding(RevocationState.UNKNOWN, detail)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
