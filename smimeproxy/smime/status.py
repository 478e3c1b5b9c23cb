"""What the engine found out about a message: typed status objects, never a bool.

These objects are shared by every layer: the PKI validator fills in
:class:`CertificateStatus`, the engine builds :class:`MessageStatus`, and the faces turn
it into an ``Authentication-Results`` header (RFC 7601 / RFC 7281), a footer, a log line
or JSON. They hold no key material and no message body.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes


class Outcome(enum.StrEnum):
    """The outcome of one check."""

    PASS = "pass"
    FAIL = "fail"
    #: could not be decided (revocation status unknown, for example): never a silent pass
    UNKNOWN = "unknown"
    #: not applicable or not asked for (no sender address given, say)
    SKIPPED = "skipped"


class SMIMEResult(enum.StrEnum):
    """The ``smime=`` result of RFC 7281 section 3.2."""

    NONE = "none"
    PASS = "pass"
    FAIL = "fail"
    POLICY = "policy"
    NEUTRAL = "neutral"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True)
class Check:
    """One named check (``signature``, ``chain``, ``validity``, ``eku``, ``key-usage``,
    ``address``, ``revocation`` ...) with its outcome and a human detail."""

    name: str
    outcome: Outcome
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "outcome": str(self.outcome), "detail": self.detail}


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, hex, as shown to people and logged."""
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class CertificateStatus:
    """The result of validating one certificate for one purpose.

    ``trusted`` is the validator's verdict under its policy: every check passed, and an
    ``UNKNOWN`` revocation check only counts as acceptable when the policy says so.
    """

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # leaf first, trust anchor last (empty if no path)
    checks: tuple[Check, ...]
    trusted: bool
    addresses: tuple[str, ...] = ()  # rfc822Name SANs and subject emailAddress, lower-cased

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.outcome is Outcome.FAIL)

    def as_dict(self) -> dict[str, Any]:
        return {
            "subject": self.certificate.subject.rfc4514_string(),
            "fingerprint": fingerprint(self.certificate),
            "addresses": list(self.addresses),
            "chain": [c.subject.rfc4514_string() for c in self.chain],
            "checks": [c.as_dict() for c in self.checks],
            "trusted": self.trusted,
        }


class CertificateValidator(Protocol):
    """Validates certificates; implemented by :class:`smimeproxy.pki.validation.PathValidator`.

    The engine depends on this protocol only, so the pure layer never imports the PKI
    layer (imports point down).
    """

    def validate(
        self,
        certificate: x509.Certificate,
        *,
        purpose: str,  # "sign" or "encrypt"
        extra_certificates: Sequence[x509.Certificate] = (),
        sender: str | None = None,
        at: datetime.datetime | None = None,
    ) -> CertificateStatus: ...


@dataclass(frozen=True)
class SignerStatus:
    """Everything found out about one SignerInfo."""

    certificate: x509.Certificate | None
    digest_algorithm: str
    signature_algorithm: str
    checks: tuple[Check, ...]  # "message-digest", "signature", "content-type" ...
    certificate_status: CertificateStatus | None
    signing_time: datetime.datetime | None = None
    capabilities: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def cryptographically_valid(self) -> bool:
        return bool(self.checks) and all(c.outcome is Outcome.PASS for c in self.checks)

    @property
    def verified(self) -> bool:
        """Signature good and certificate trusted for this sender."""
        return (
            self.cryptographically_valid
            and self.certificate_status is not None
            and self.certificate_status.trusted
        )

    @property
    def identity(self) -> str:
        """The signer as a reader knows it: the first address, else the subject."""
        if self.certificate_status and self.certificate_status.addresses:
            return self.certificate_status.addresses[0]
        if self.certificate is not None:
            return self.certificate.subject.rfc4514_string()
        return "unknown signer"

    def as_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "certificate": fingerprint(self.certificate) if self.certificate else None,
            "digest_algorithm": self.digest_algorithm,
            "signature_algorithm": self.signature_algorithm,
            "signing_time": self.signing_time.isoformat() if self.signing_time else None,
            "checks": [c.as_dict() for c in self.checks],
            "certificate_status": (
                self.certificate_status.as_dict() if self.certificate_status else None
            ),
            "capabilities": list(self.capabilities),
            "verified": self.verified,
            "errors": list(self.errors),
        }


@dataclass(frozen=True)
class DecryptionStatus:
    """How a message was (or was not) decrypted."""

    decrypted: bool
    content_type: str  # "enveloped_data" or "authenticated_enveloped_data"
    cipher: str | None = None  # e.g. "aes256_cbc", "aes128_gcm"
    key_algorithm: str | None = None  # e.g. "rsaes_pkcs1v15", "rsaes_oaep", "dh_single_pass..."
    recipient: x509.Certificate | None = None  # whose key opened it
    integrity_protected: bool = False  # AEAD content, or a valid signature inside
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "decrypted": self.decrypted,
            "content_type": self.content_type,
            "cipher": self.cipher,
            "key_algorithm": self.key_algorithm,
            "recipient": fingerprint(self.recipient) if self.recipient else None,
            "integrity_protected": self.integrity_protected,
            "error": self.error,
        }


@dataclass(frozen=True)
class HeaderProtectionStatus:
    """RFC 9788: headers restored from inside the cryptographic envelope."""

    restored: tuple[str, ...] = ()  # header names taken from the protected part
    mismatches: tuple[str, ...] = ()  # "Subject: outer '...' differs from protected"

    def as_dict(self) -> dict[str, Any]:
        return {"restored": list(self.restored), "mismatches": list(self.mismatches)}


@dataclass(frozen=True)
class MessageStatus:
    """The security status of a whole message as opened by the engine.

    ``layers`` lists the S/MIME layers from the outside in (``"enveloped"``,
    ``"signed"``, ``"opaque-signed"``, ``"auth-enveloped"``).
    ``signature_covers_whole`` is false when text outside the signed part would be shown
    to the reader; such a message is never ``pass``.
    """

    layers: tuple[str, ...] = ()
    decryption: DecryptionStatus | None = None
    signers: tuple[SignerStatus, ...] = ()
    signature_covers_whole: bool = True
    partially_signed: bool = False
    header_protection: HeaderProtectionStatus | None = None
    errors: tuple[str, ...] = ()  # malformed structure, refused (EFAIL) parts ...
    warnings: tuple[str, ...] = ()  # not integrity protected, weak algorithm ...
    malformed: bool = False
    from_address: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def encrypted(self) -> bool:
        return self.decryption is not None

    @property
    def signed(self) -> bool:
        return bool(self.signers) or self.partially_signed

    @property
    def verified(self) -> bool:
        return (
            bool(self.signers)
            and all(s.verified for s in self.signers)
            and self.signature_covers_whole
            and not self.partially_signed
        )

    @property
    def integrity_protected(self) -> bool:
        if self.decryption is None:
            return self.verified
        return self.decryption.integrity_protected or any(
            s.cryptographically_valid for s in self.signers
        )

    @property
    def smime_result(self) -> SMIMEResult:
        """The RFC 7281 result for ``Authentication-Results``."""
        if self.malformed and not self.signers:
            return SMIMEResult.PERMERROR if self.signed else SMIMEResult.NONE
        if not self.signed:
            return SMIMEResult.NONE
        if self.partially_signed or not self.signature_covers_whole:
            return SMIMEResult.NEUTRAL
        if any(not s.cryptographically_valid for s in self.signers):
            return SMIMEResult.FAIL
        for signer in self.signers:
            cs = signer.certificate_status
            if cs is None:
                return SMIMEResult.PERMERROR
            revocation = cs.check("revocation")
            if revocation is not None and revocation.outcome is Outcome.FAIL:
                return SMIMEResult.FAIL
            if not cs.trusted:
                if (
                    revocation is not None
                    and revocation.outcome is Outcome.UNKNOWN
                    and not [c for c in cs.failures if c.name != "revocation"]
                ):
                    return SMIMEResult.TEMPERROR
                return SMIMEResult.POLICY
        return SMIMEResult.PASS

    @property
    def identifier(self) -> str | None:
        """The signer's address for ``body.smime-identifier``."""
        return self.signers[0].identity if self.signers else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "smime": str(self.smime_result),
            "identifier": self.identifier,
            "layers": list(self.layers),
            "encrypted": self.encrypted,
            "signed": self.signed,
            "verified": self.verified,
            "integrity_protected": self.integrity_protected,
            "signature_covers_whole": self.signature_covers_whole,
            "partially_signed": self.partially_signed,
            "from": self.from_address,
            "decryption": self.decryption.as_dict() if self.decryption else None,
            "signers": [s.as_dict() for s in self.signers],
            "header_protection": (
                self.header_protection.as_dict() if self.header_protection else None
            ),
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "malformed": self.malformed,
            **self.extra,
        }
