"""The internal certificate authority: roots, issuing CAs, S/MIME user certificates, CRLs.

Pure functions over ``cryptography`` objects; the key store persists what they return.
The user-certificate profile follows RFC 8550 section 4.4 and the CA/Browser Forum
S/MIME Baseline Requirements ("mailbox-validated, strict"): every address in the
subjectAltName, as an rfc822Name with an A-label domain or, for a non-ASCII local part,
as an SmtpUTF8Mailbox with a U-label domain (RFC 8398 section 3), extendedKeyUsage
emailProtection, a critical keyUsage that fits the key type (RFC 8550 section 4.4.2,
RFC 5480 section 3 for EC keys), basicConstraints cA=false, subject and authority key
identifiers, and a CRL distribution point when the CA publishes one.

Not supported yet: a CA key held in an HSM (the CA key must be a ``cryptography``
private key object; end-entity keys may live anywhere, only their public key is
needed), OCSP, certificate policies.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote

import idna
from asn1crypto.core import UTF8String
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from smimeproxy.errors import CertificateError, ConfigError, UnsupportedAlgorithm
from smimeproxy.pki.validation import ID_ON_SMTP_UTF8_MAILBOX, smtputf8_mailboxes, u_label_domain

__all__ = [
    "DEFAULT_PROFILE",
    "REASONS",
    "CAProfile",
    "Purpose",
    "RevokedEntry",
    "certificate_addresses",
    "certificate_from_csr",
    "check_issued_pair",
    "create_issuing_ca",
    "create_root",
    "generate_key",
    "generate_user_key",
    "issue_user_certificate",
    "key_kind_of",
    "load_csr",
    "mailbox_name",
    "make_crl",
    "make_csr",
    "normalize_address",
    "parse_reason",
    "reason_name",
    "renew_certificate",
]

Purpose = Literal["both", "sign", "encrypt"]
_PURPOSES = ("both", "sign", "encrypt")

# Key kinds by name. RSA below 2048 bits and curves other than P-256/P-384 are refused
# for new certificates (RFC 8551 section 2.2 / 2.4; CA/B Forum S/MIME BR 6.1.5).
_GENERATORS: dict[str, Callable[[], PrivateKeyTypes]] = {
    "rsa2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "rsa3072": lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
    "rsa4096": lambda: rsa.generate_private_key(public_exponent=65537, key_size=4096),
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "x25519": x25519.X25519PrivateKey.generate,
}
USER_KEY_KINDS = ("rsa2048", "rsa3072", "p256")
CA_KEY_KINDS = ("p256", "p384", "rsa3072", "rsa4096", "ed25519")

_SignHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512
# RFC 5754 section 3 (RSA) and RFC 5758 section 3.2 (ECDSA) SHA-2 signature hashes;
# Ed25519 signs the message itself (RFC 8410 section 6), so no hash is passed.
_SIGNING_HASHES: dict[str, Callable[[], _SignHash]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

# Clock skew allowance: certificates start a little in the past so that a peer whose
# clock runs slow does not see a "not yet valid" certificate right after issuance.
_BACKDATE = datetime.timedelta(minutes=10)
# RFC 5280 section 4.1.2.2: serial numbers are positive and at most 20 octets.
_MAX_SERIAL = 2**159


# --- addresses ----------------------------------------------------------------------

# RFC 5322 section 3.2.3 atext, with RFC 6531 section 3.3's UTF8-non-ascii; a dot-atom
# is atext runs joined by single dots.
_ATEXT = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
# RFC 1035 section 2.3.1 / RFC 5890 LDH label (A-labels included), at most 63 octets.
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def normalize_address(address: str) -> str:
    """``address`` checked as an addr-spec fit for a certificate, domain lower-cased
    (and IDNA-encoded to A-labels); :class:`ConfigError` when it is not one.

    Accepted: a dot-atom local part of at most 64 octets (RFC 5321 4.5.3.1.1), kept
    exactly as given (local parts may be case-sensitive), which may hold non-ASCII
    characters (RFC 6531: printable, no spaces, in NFC as RFC 6532 section 3.1 asks;
    such an address goes into an SmtpUTF8Mailbox, see :func:`mailbox_name`), and a
    domain of LDH labels with at least one dot. Refused: quoted local parts, comments,
    display names and address literals (``user@[192.0.2.1]``).
    """
    if not isinstance(address, str) or address.count("@") != 1:
        raise ConfigError(f"not an email address: {address!r}")
    local, domain = address.split("@")
    if not local or len(local.encode("utf-8")) > 64 or not _DOT_ATOM.fullmatch(local):
        raise ConfigError(f"not an email address (local part): {address!r}")
    if not local.isascii() and (
        not all(c.isprintable() and not c.isspace() for c in local)
        or not unicodedata.is_normalized("NFC", local)
    ):
        raise ConfigError(f"not an email address (local part, RFC 6531/6532): {address!r}")
    try:
        ascii_domain = idna.encode(domain.rstrip("."), uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        raise ConfigError(f"not an email address (domain): {address!r}") from None
    labels = ascii_domain.split(".")
    if (
        len(labels) < 2
        or len(ascii_domain) > 253
        or not all(_LDH_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ConfigError(f"not an email address (domain): {address!r}")
    return f"{local}@{ascii_domain}"


def mailbox_name(address: str) -> x509.GeneralName:
    """The subjectAltName entry for a :func:`normalize_address` result (RFC 8398 section
    3): an rfc822Name (A-label domain) for an ASCII local part, else an SmtpUTF8Mailbox
    otherName with the domain in U-labels and no rfc822Name (none can hold it)."""
    local, _at, domain = address.rpartition("@")
    if local.isascii():
        return x509.RFC822Name(address)
    value = f"{local}@{u_label_domain(domain)}"
    return x509.OtherName(ID_ON_SMTP_UTF8_MAILBOX, UTF8String(value).dump())


def _display(address: str) -> str:
    """How an address reads in a certificate's common name: U-labels for an
    SmtpUTF8Mailbox (as its SAN entry has it), A-labels otherwise (as before)."""
    name = mailbox_name(address)
    return smtputf8_mailboxes([name])[0] if isinstance(name, x509.OtherName) else address


# --- revocation reasons ---------------------------------------------------------------

# RFC 5280 section 5.3.1 CRLReason names, as written in the RFC's ASN.1. ``unspecified``
# is accepted on input but leaves the reason out, as RFC 5280 5.3.1 recommends;
# removeFromCRL belongs to delta CRLs only and is refused.
REASONS: dict[str, x509.ReasonFlags] = {
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
_REASON_KEYS = {re.sub(r"[^a-z]", "", name.lower()): flag for name, flag in REASONS.items()}


def parse_reason(text: str | None) -> x509.ReasonFlags | None:
    """A revocation reason from a command line: ``keyCompromise``, ``key-compromise``,
    ``key_compromise``, ``KEYCOMPROMISE`` ... (case, dashes and underscores ignored);
    ``None``, ``""`` and ``unspecified`` give ``None`` (no reason code)."""
    if text is None:
        return None
    key = re.sub(r"[^a-z]", "", text.lower())
    if key in ("", "unspecified"):
        return None
    try:
        return _REASON_KEYS[key]
    except KeyError:
        raise ConfigError(
            f"unknown revocation reason {text!r}; use one of {', '.join(REASONS)}"
        ) from None


def reason_name(reason: x509.ReasonFlags | None) -> str:
    """The RFC 5280 name of a reason (``"unspecified"`` for ``None``)."""
    if reason is None:
        return "unspecified"
    for name, flag in REASONS.items():
        if flag is reason:
            return name
    return reason.name


@dataclass(frozen=True)
class RevokedEntry:
    """One line of a CRL: which serial, since when, and why (``None``: no reason code)."""

    serial: int
    revoked_at: datetime.datetime
    reason: x509.ReasonFlags | None = None

    def __post_init__(self) -> None:
        if not 0 < self.serial < _MAX_SERIAL:
            raise ConfigError("serial must be positive and at most 20 octets")
        if self.revoked_at.tzinfo is None:
            raise ConfigError("revoked_at must be timezone-aware")
        if self.reason in (x509.ReasonFlags.remove_from_crl, x509.ReasonFlags.unspecified):
            raise ConfigError(f"reason {self.reason.name} is not used in a complete CRL")

    @classmethod
    def for_certificate(
        cls,
        cert: x509.Certificate,
        reason: x509.ReasonFlags | str | None = None,
        revoked_at: datetime.datetime | None = None,
    ) -> RevokedEntry:
        """The entry revoking ``cert`` now (or at ``revoked_at``)."""
        flag = parse_reason(reason) if isinstance(reason, str) or reason is None else reason
        return cls(cert.serial_number, revoked_at or _now(), flag)


@dataclass(frozen=True)
class CAProfile:
    """How this CA issues: validity, accepted user key kinds, CRL location, hash.

    ``crl_url_template`` is formatted with ``ca_name`` (the issuing CA's common name,
    URL-quoted) and ``ca_key_id`` (hex of its subject key identifier), e.g.
    ``"http://pki.acme.test/crl/{ca_key_id}.crl"``; ``None`` leaves the CRL
    distribution point out.
    """

    user_valid_days: int = 365
    allowed_key_kinds: tuple[str, ...] = ("rsa2048", "rsa3072", "rsa4096", "p256", "p384")
    crl_url_template: str | None = None
    crl_next_update: datetime.timedelta = field(default=datetime.timedelta(days=7))
    hash_name: str = "sha256"
    non_repudiation: bool = False

    def __post_init__(self) -> None:
        if self.user_valid_days < 1:
            raise ConfigError("validity must be at least one day", key="user_valid_days")
        unknown = [k for k in self.allowed_key_kinds if k not in _GENERATORS]
        if unknown:
            raise ConfigError(f"unknown key kinds {unknown}", key="allowed_key_kinds")
        if self.crl_next_update <= datetime.timedelta(0):
            raise ConfigError("must be positive", key="crl_next_update")
        if self.hash_name not in _SIGNING_HASHES:
            raise ConfigError(f"unsupported hash {self.hash_name!r}", key="hash_name")
        if self.crl_url_template is not None:
            try:
                self.crl_url_template.format(ca_name="x", ca_key_id="00")
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"bad template: {e}", key="crl_url_template") from None

    def crl_url_for(self, ca_cert: x509.Certificate) -> str | None:
        """The CRL URL this profile gives to certificates issued by ``ca_cert``."""
        if self.crl_url_template is None:
            return None
        return self.crl_url_template.format(
            ca_name=quote(_common_name(ca_cert.subject) or "ca", safe=""),
            ca_key_id=_key_id(ca_cert).hex(),
        )


DEFAULT_PROFILE = CAProfile()


def generate_key(kind: str) -> PrivateKeyTypes:
    """A fresh software key: ``rsa2048``, ``rsa3072``, ``rsa4096``, ``p256``, ``p384``,
    ``ed25519`` or ``x25519``."""
    try:
        return _GENERATORS[kind]()
    except KeyError:
        raise ConfigError(f"unknown key kind {kind!r}; use one of {sorted(_GENERATORS)}") from None


def generate_user_key(kind: str = "rsa2048") -> PrivateKeyTypes:
    """A fresh key for a user certificate: ``rsa2048``, ``rsa3072`` or ``p256``."""
    if kind not in USER_KEY_KINDS:
        raise ConfigError(f"user key kind must be one of {USER_KEY_KINDS}, not {kind!r}")
    return generate_key(kind)


def key_kind_of(public_key: object) -> str:
    """The kind name of a public key (``rsa2048``, ``p256`` ...); raises for others."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        names = {"secp256r1": "p256", "secp384r1": "p384", "secp521r1": "p521"}
        return names.get(public_key.curve.name, public_key.curve.name)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, x25519.X25519PublicKey):
        return "x25519"
    raise UnsupportedAlgorithm(f"unsupported public key type {type(public_key).__name__}")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def _key_id(cert: x509.Certificate) -> bytes:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _signing_hash(key: CertificateIssuerPrivateKeyTypes, hash_name: str) -> _SignHash | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    try:
        return _SIGNING_HASHES[hash_name]()
    except KeyError:
        raise ConfigError(f"unsupported signature hash {hash_name!r}") from None


def _issuer_key(key: object) -> CertificateIssuerPrivateKeyTypes:
    if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        return key
    raise ConfigError(
        "the CA key must be an RSA, EC or Ed25519 private key object from cryptography "
        f"(got {type(key).__name__}; HSM-held CA keys are not supported yet)"
    )


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_issued_pair(key: object, cert: x509.Certificate) -> None:
    """Raise :class:`CertificateError` unless ``key`` is the private key of ``cert``.

    ``key`` is a ``cryptography`` private key or anything with ``public_key()`` (a
    :class:`smimeproxy.smime.keys.PrivateKey`). Compares public keys only: it does not
    prove the key can still perform operations (an HSM may refuse).
    """
    try:
        ours = _spki(key.public_key())  # type: ignore[attr-defined]
        theirs = _spki(cert.public_key())
    except (AttributeError, ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"cannot compare key and certificate: {e}") from None
    if ours != theirs:
        raise CertificateError(
            f"the private key does not belong to the certificate {cert.subject.rfc4514_string()}"
        )


def _check_ca(ca_key: object, ca_cert: x509.Certificate) -> CertificateIssuerPrivateKeyTypes:
    key = _issuer_key(ca_key)
    check_issued_pair(key, ca_cert)
    try:
        bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CertificateError(f"{ca_cert.subject.rfc4514_string()} is not a CA certificate")
    try:
        ku = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CertificateError(f"{ca_cert.subject.rfc4514_string()} may not sign certificates")
    except x509.ExtensionNotFound:
        pass
    return key


def _ca_name(name: str | x509.Name) -> x509.Name:
    if isinstance(name, x509.Name):
        return name
    if not name.strip():
        raise ConfigError("a CA needs a name")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _crl_dp(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)]
    )


def create_root(
    name: str | x509.Name,
    *,
    key_kind: str = "p256",
    valid_days: int = 3650,
    hash_name: str = "sha256",
    not_before: datetime.datetime | None = None,
) -> tuple[PrivateKeyTypes, x509.Certificate]:
    """A new self-signed root CA: key and certificate (no path length limit).

    The key is a software key; protecting it (the key store seals it) is the caller's job.
    """
    if key_kind not in CA_KEY_KINDS:
        raise ConfigError(f"CA key kind must be one of {CA_KEY_KINDS}, not {key_kind!r}")
    if valid_days < 1:
        raise ConfigError("valid_days must be at least 1")
    key = generate_key(key_kind)
    issuer_key = _issuer_key(key)
    subject = _ca_name(name)
    start = not_before or _now() - _BACKDATE
    public = issuer_key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(issuer_key, _signing_hash(issuer_key, hash_name))
    )
    return key, cert


def create_issuing_ca(
    root_key: PrivateKeyTypes,
    root_cert: x509.Certificate,
    name: str | x509.Name,
    *,
    key_kind: str = "p256",
    valid_days: int = 1825,
    path_length: int | None = 0,
    crl_url: str | None = None,
    hash_name: str = "sha256",
    not_before: datetime.datetime | None = None,
) -> tuple[PrivateKeyTypes, x509.Certificate]:
    """A subordinate CA signed by the root; by default it may issue end-entity
    certificates only (pathLenConstraint 0). Validity is cut at the root's end."""
    signer = _check_ca(root_key, root_cert)
    if key_kind not in CA_KEY_KINDS:
        raise ConfigError(f"CA key kind must be one of {CA_KEY_KINDS}, not {key_kind!r}")
    if valid_days < 1:
        raise ConfigError("valid_days must be at least 1")
    key = generate_key(key_kind)
    public = _issuer_key(key).public_key()
    start = not_before or _now() - _BACKDATE
    end = min(start + datetime.timedelta(days=valid_days), root_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_ca_name(name))
        .issuer_name(root_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_aki(root_cert), critical=False)
    )
    if crl_url:
        builder = builder.add_extension(_crl_dp(crl_url), critical=False)
    return key, builder.sign(signer, _signing_hash(signer, hash_name))


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_cert.public_key()  # type: ignore[arg-type]
        )


def _user_key_usage(kind: str, purpose: Purpose, non_repudiation: bool) -> x509.KeyUsage:
    """RFC 8550 section 4.4.2 with RFC 5480 section 3 (EC) and RFC 8410 (X25519/Ed25519):
    RSA encrypts by keyEncipherment, EC and X25519 by keyAgreement."""
    can_sign = kind != "x25519"
    can_encrypt = kind != "ed25519"
    if purpose in ("sign", "both") and not can_sign:
        raise ConfigError(f"a {kind} key cannot sign; use purpose 'encrypt'")
    if purpose in ("encrypt", "both") and not can_encrypt:
        raise ConfigError(f"a {kind} key cannot encrypt; use purpose 'sign'")
    sign = purpose in ("sign", "both")
    encrypt = purpose in ("encrypt", "both")
    rsa_key = kind.startswith("rsa")
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=sign and non_repudiation,
        key_encipherment=encrypt and rsa_key,
        data_encipherment=False,
        key_agreement=encrypt and not rsa_key,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def issue_user_certificate(
    ca_key: PrivateKeyTypes,
    ca_cert: x509.Certificate,
    public_key: CertificatePublicKeyTypes,
    addresses: Sequence[str],
    *,
    common_name: str | None = None,
    purpose: Purpose = "both",
    valid_days: int | None = None,
    crl_url: str | None = None,
    serial: int | None = None,
    not_before: datetime.datetime | None = None,
    profile: CAProfile = DEFAULT_PROFILE,
) -> x509.Certificate:
    """An S/MIME end-entity certificate for ``addresses`` (the first one names it).

    ``crl_url`` overrides the profile's template. The end of validity is cut at the
    CA certificate's end (a longer one could never validate). Addresses are checked to
    be addr-specs (dot-atom local part, LDH or IDN domain, :func:`normalize_address`)
    and stored with the domain lower-cased, as rfc822Names or, for a non-ASCII local
    part, SmtpUTF8Mailboxes (:func:`mailbox_name`); :class:`ConfigError` otherwise.
    Does not check that the addresses belong to the organisation: that policy is the
    caller's.
    """
    signer = _check_ca(ca_key, ca_cert)
    if purpose not in _PURPOSES:
        raise ConfigError(f"purpose must be one of {_PURPOSES}, not {purpose!r}")
    if not addresses:
        raise ConfigError("a user certificate needs at least one address")
    normalized: list[str] = []
    for address in addresses:
        norm = normalize_address(address)
        if norm not in normalized:
            normalized.append(norm)
    kind = key_kind_of(public_key)
    if kind not in profile.allowed_key_kinds:
        raise CertificateError(
            f"{kind} keys are not accepted by this CA (allowed: {profile.allowed_key_kinds})"
        )
    days = profile.user_valid_days if valid_days is None else valid_days
    if days < 1:
        raise ConfigError("valid_days must be at least 1")
    if serial is not None and not 0 < serial < _MAX_SERIAL:
        raise ConfigError("serial must be positive and at most 20 octets (RFC 5280 4.1.2.2)")
    start = not_before or _now() - _BACKDATE
    end = min(start + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    if end <= start:
        raise CertificateError("the CA certificate expires before the new certificate starts")
    cn = common_name if common_name is not None else _display(normalized[0])
    if not cn.strip():
        raise ConfigError("common_name must not be empty")
    url = crl_url if crl_url is not None else profile.crl_url_for(ca_cert)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_user_key_usage(kind, purpose, profile.non_repudiation), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([mailbox_name(a) for a in normalized]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    if url:
        builder = builder.add_extension(_crl_dp(url), critical=False)
    return builder.sign(signer, _signing_hash(signer, profile.hash_name))


def certificate_addresses(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """The mailboxes of a certificate's SAN (or a CSR's requested SAN), in SAN order:
    rfc822Name and SmtpUTF8Mailbox (RFC 8398) entries, as written."""
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return []
    except ValueError as e:
        raise CertificateError(f"unreadable extensions: {e}") from None
    out: list[str] = []
    for name in ext.value:  # type: ignore[attr-defined]
        if isinstance(name, x509.RFC822Name):
            out.append(name.value)
        else:
            out.extend(smtputf8_mailboxes([name]))
    return out


def _purpose_of(cert: x509.Certificate) -> Purpose:
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return "both"
    sign = ku.digital_signature or ku.content_commitment
    encrypt = ku.key_encipherment or ku.key_agreement
    if sign and not encrypt:
        return "sign"
    if encrypt and not sign:
        return "encrypt"
    return "both"


def _crl_url_of(cert: x509.Certificate) -> str | None:
    try:
        dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return None
    for dp in dps:
        for name in dp.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                return name.value
    return None


def renew_certificate(
    ca_key: PrivateKeyTypes,
    ca_cert: x509.Certificate,
    old_cert: x509.Certificate,
    new_public_key: CertificatePublicKeyTypes | None = None,
    *,
    valid_days: int | None = None,
    crl_url: str | None = None,
    not_before: datetime.datetime | None = None,
    profile: CAProfile = DEFAULT_PROFILE,
) -> x509.Certificate:
    """A new certificate for the holder of ``old_cert``: same addresses, common name,
    purpose and CRL location, a new serial; the same key unless ``new_public_key`` is
    given (re-key). Does not revoke the old certificate: the caller decides (RFC 5280
    reason ``superseded``) when the old one should stop being used.
    """
    addresses = certificate_addresses(old_cert)
    if not addresses:
        raise CertificateError(
            "the old certificate names no address (rfc822Name, SmtpUTF8Mailbox) to renew"
        )
    return issue_user_certificate(
        ca_key,
        ca_cert,
        new_public_key if new_public_key is not None else old_cert.public_key(),
        addresses,
        common_name=_common_name(old_cert.subject),
        purpose=_purpose_of(old_cert),
        valid_days=valid_days,
        crl_url=crl_url if crl_url is not None else _crl_url_of(old_cert),
        not_before=not_before,
        profile=profile,
    )


def make_csr(
    key: PrivateKeyTypes,
    addresses: Sequence[str],
    common_name: str | None = None,
    *,
    hash_name: str = "sha256",
) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for an external CA: CN, SAN mailboxes (:func:`mailbox_name`) and the
    emailProtection EKU as requested extensions.

    Needs a ``cryptography`` key object: a key in an HSM cannot sign a CSR here yet.
    The external CA decides what it really puts into the certificate; check what comes
    back with :func:`check_issued_pair` and :func:`certificate_addresses`.
    """
    signer = _issuer_key(key)
    if not addresses:
        raise ConfigError("a CSR needs at least one address")
    normalized = [normalize_address(a) for a in addresses]
    cn = common_name if common_name is not None else _display(normalized[0])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .add_extension(
            x509.SubjectAlternativeName([mailbox_name(a) for a in normalized]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .sign(signer, _signing_hash(signer, hash_name))
    )


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A CSR in PEM or DER form; :class:`CertificateError` for anything else."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as e:
        raise CertificateError(f"not a certificate signing request: {e}") from None


def certificate_from_csr(
    ca_key: PrivateKeyTypes,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    *,
    purpose: Purpose = "both",
    valid_days: int | None = None,
    crl_url: str | None = None,
    profile: CAProfile = DEFAULT_PROFILE,
) -> x509.Certificate:
    """Issue for a CSR: its signature must verify, its addresses come from its SAN
    request and its common name from its subject (else the first address).

    Only the public key, addresses and common name are taken from the request; every
    other requested extension is ignored and the profile's are used instead. Proof that
    the requester controls the addresses is not checked here.
    """
    try:
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
        raise CertificateError(f"unusable CSR: {e}") from None
    if not valid:
        raise CertificateError("the CSR's signature does not verify")
    addresses = certificate_addresses(csr)
    if not addresses:
        raise CertificateError("the CSR requests no rfc822Name or SmtpUTF8Mailbox subjectAltName")
    try:
        return issue_user_certificate(
            ca_key,
            ca_cert,
            public_key,
            addresses,
            common_name=_common_name(csr.subject),
            purpose=purpose,
            valid_days=valid_days,
            crl_url=crl_url,
            profile=profile,
        )
    except ConfigError as e:
        raise CertificateError(f"CSR rejected: {e}") from None


def make_crl(
    ca_key: PrivateKeyTypes,
    ca_cert: x509.Certificate,
    revoked: Sequence[RevokedEntry],
    *,
    crl_number: int,
    this_update: datetime.datetime | None = None,
    next_update: datetime.datetime | None = None,
    profile: CAProfile = DEFAULT_PROFILE,
) -> x509.CertificateRevocationList:
    """A complete (not delta) CRL with the cRLNumber and authorityKeyIdentifier
    extensions RFC 5280 section 5.2 requires of conforming CAs.

    ``crl_number`` must grow with every CRL the CA issues (RFC 5280 5.2.3); the caller
    keeps the counter. ``next_update`` defaults to ``this_update`` plus the profile's
    interval. Expired certificates are not dropped from the list automatically.
    """
    signer = _check_ca(ca_key, ca_cert)
    try:
        ku = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.crl_sign:
            raise CertificateError(f"{ca_cert.subject.rfc4514_string()} may not sign CRLs")
    except x509.ExtensionNotFound:
        pass
    if not 0 <= crl_number < _MAX_SERIAL:
        raise ConfigError("crl_number must be non-negative and at most 20 octets (RFC 5280 5.2.3)")
    start = this_update or _now()
    end = next_update or start + profile.crl_next_update
    if end <= start:
        raise ConfigError("next_update must be after this_update")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(start)
        .next_update(end)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    seen: set[int] = set()
    for entry in sorted(revoked, key=lambda e: e.serial):
        if entry.serial in seen:
            raise ConfigError(f"serial {entry.serial:x} listed twice")
        seen.add(entry.serial)
        item = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
        )
        if entry.reason is not None:
            item = item.add_extension(x509.CRLReason(entry.reason), critical=False)
        builder = builder.add_revoked_certificate(item.build())
    return builder.sign(signer, _signing_hash(signer, profile.hash_name))
