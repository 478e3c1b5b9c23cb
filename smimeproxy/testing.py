"""Test helpers shipped with the package: a throwaway certificate factory.

Each test builds the PKI it needs (root, intermediate, users with exactly the
extensions the case calls for) instead of sharing fixture files, like Twisted's
``test_sslverify``. Never use these certificates for anything real.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smimeproxy.config import SMIMEConfig
from smimeproxy.smime.keys import KeyPair, SoftwareKey

_NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def new_key(kind: str = "rsa2048") -> PrivateKeyTypes:
    """``rsa2048``, ``rsa3072``, ``rsa4096``, ``p256``, ``p384``, ``ed25519``, ``x25519``."""
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "x25519":
        return x25519.X25519PrivateKey.generate()
    raise ValueError(kind)


def _sign_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


@dataclass
class Issued:
    """A certificate with its private key (and PEM helpers for CLI tests)."""

    certificate: x509.Certificate
    private_key: PrivateKeyTypes
    issuer: Issued | None = None

    @property
    def key(self) -> SoftwareKey:
        return SoftwareKey(self.private_key)

    @property
    def pair(self) -> KeyPair:
        return KeyPair(self.certificate, self.key)

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain(self) -> list[x509.Certificate]:
        """This certificate's issuers up to (excluding) the root."""
        out = []
        node = self.issuer
        while node is not None and node.issuer is not None:
            out.append(node.certificate)
            node = node.issuer
        return out


@dataclass
class CertificateFactory:
    """Builds a root CA, optional intermediates and S/MIME end-entity certificates."""

    now: datetime.datetime = field(default_factory=lambda: _NOW)
    root_key_kind: str = "p256"

    def __post_init__(self) -> None:
        self.root = self.ca("smimeproxy Test Root", issuer=None, key_kind=self.root_key_kind)

    def ca(
        self,
        name: str,
        issuer: Issued | None = None,
        *,
        key_kind: str = "p256",
        path_length: int | None = None,
    ) -> Issued:
        key = new_key(key_kind)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.certificate.subject if issuer else subject)
            .public_key(key.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(days=30))
            .not_valid_after(self.now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
        signer_key = issuer.private_key if issuer else key
        if issuer:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    issuer.certificate.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
        cert = builder.sign(signer_key, _sign_hash(signer_key))  # type: ignore[arg-type]
        return Issued(cert, key, issuer)

    def user(
        self,
        email: str | None,
        issuer: Issued | None = None,
        *,
        key_kind: str = "rsa2048",
        key_usage: str | None = None,
        eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.EMAIL_PROTECTION,),
        email_in_subject: bool = False,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        common_name: str | None = None,
        crl_url: str | None = None,
    ) -> Issued:
        """An S/MIME certificate for ``email``.

        ``key_usage`` is ``"sign"``, ``"encrypt"`` or ``None`` (both, as fits the key).
        ``eku=None`` leaves the extension out; ``email_in_subject`` puts the address in
        the subject's emailAddress instead of the SAN.
        """
        issuer = issuer or self.root
        key = new_key(key_kind)
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name or email or "nobody")]
        if email and email_in_subject:
            attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
        agreement = key_kind in ("p256", "p384", "x25519")
        signing = key_kind != "x25519"
        sign_bits = key_usage in (None, "sign") and signing
        enc_bits = key_usage in (None, "encrypt")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(issuer.certificate.subject)
            .public_key(key.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or self.now - datetime.timedelta(days=1))
            .not_valid_after(not_after or self.now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=sign_bits,
                    content_commitment=sign_bits,
                    key_encipherment=enc_bits and key_kind.startswith("rsa"),
                    data_encipherment=False,
                    key_agreement=enc_bits and agreement,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    issuer.certificate.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
        )
        if email and not email_in_subject:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False
            )
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if crl_url:
            builder = builder.add_extension(
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            [x509.UniformResourceIdentifier(crl_url)], None, None, None
                        )
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(issuer.private_key, _sign_hash(issuer.private_key))  # type: ignore[arg-type]
        return Issued(cert, key, issuer)

    def crl(
        self,
        issuer: Issued,
        revoked: Sequence[Issued] = (),
        *,
        next_update: datetime.datetime | None = None,
        reason: x509.ReasonFlags | None = x509.ReasonFlags.key_compromise,
    ) -> x509.CertificateRevocationList:
        """A CRL from ``issuer`` listing ``revoked``."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.certificate.subject)
            .last_update(self.now - datetime.timedelta(hours=1))
            .next_update(next_update or self.now + datetime.timedelta(days=7))
        )
        for item in revoked:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(item.certificate.serial_number)
                .revocation_date(self.now - datetime.timedelta(minutes=30))
            )
            if reason is not None:
                entry = entry.add_extension(x509.CRLReason(reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(issuer.private_key, _sign_hash(issuer.private_key))  # type: ignore[arg-type]


def public_key_of(issued: Issued) -> CertificatePublicKeyTypes:
    return issued.certificate.public_key()


def smime_settings(authserv_id: str = "mx.acme.test", **changes: Any) -> SMIMEConfig:
    """``[smime]`` settings for processors built in tests and benchmarks: no footer, no
    header protection, cipher chosen from capabilities, no trust files; ``changes``
    replaces any field."""
    settings = SMIMEConfig(
        authserv_id=authserv_id,
        revocation="soft-fail",
        footer=False,
        header_protection=False,
        cipher="auto",
        signing_digest="sha256",
        trust_anchors=(),
        intermediates=(),
        crls=(),
    )
    return dataclasses.replace(settings, **changes)
