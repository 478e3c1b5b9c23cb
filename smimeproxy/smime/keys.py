"""Private keys behind a small interface, and loaders for keys and certificates.

The engine never touches private key material directly: it asks a :class:`PrivateKey`
to sign, to unwrap a transported key, or to agree on a secret. A software key
(:class:`SoftwareKey`) does that with ``cryptography``; a PKCS#11 token can implement
the same three methods while the key never leaves the hardware.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12

from smimeproxy.errors import CertificateError, UnsupportedAlgorithm

HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def hash_algorithm(name: str) -> hashes.HashAlgorithm:
    """The ``cryptography`` hash object for an asn1crypto-style name (``"sha256"``)."""
    try:
        return HASHES[name]()
    except KeyError:
        raise UnsupportedAlgorithm(f"unsupported hash algorithm {name!r}") from None


@runtime_checkable
class PrivateKey(Protocol):
    """What the engine may ask of a private key; the material itself stays hidden.

    Implementations raise :class:`smimeproxy.errors.UnsupportedAlgorithm` for an
    operation their key type cannot do, and may raise
    :class:`smimeproxy.errors.DecryptionFailed` when an unwrap fails.
    """

    def public_key(self) -> PublicKeyTypes:
        """The matching public key (used to pick the signature algorithm)."""
        ...

    def sign(self, data: bytes, hash_name: str | None, *, pss: bool = False) -> bytes:
        """Sign ``data`` (hashing it with ``hash_name``; ``None`` for Ed25519/Ed448).

        RSA keys use PKCS#1 v1.5, or RSASSA-PSS with MGF1 of the same hash and a salt
        as long as the hash (RFC 4056) when ``pss`` is true; EC keys give a DER ECDSA
        signature.
        """
        ...

    def decrypt(self, ciphertext: bytes, *, oaep_hash: str | None = None) -> bytes:
        """RSA key transport: PKCS#1 v1.5 when ``oaep_hash`` is None, else RSAES-OAEP
        with that hash for both the digest and MGF1 (RFC 8017, RFC 3560)."""
        ...

    def exchange(self, peer_public_key: PublicKeyTypes) -> bytes:
        """Raw (EC)DH shared secret with ``peer_public_key`` (ECDH or X25519/X448)."""
        ...


class SoftwareKey:
    """A :class:`PrivateKey` held in process memory by ``cryptography``."""

    def __init__(self, key: PrivateKeyTypes):
        self._key = key

    def __repr__(self) -> str:  # never the material
        return f"<SoftwareKey {type(self._key).__name__}>"

    @property
    def private_key(self) -> PrivateKeyTypes:
        """The ``cryptography`` key, for the key store to seal and export; nothing else
        should need it."""
        return self._key

    def public_key(self) -> PublicKeyTypes:
        return self._key.public_key()

    def sign(self, data: bytes, hash_name: str | None, *, pss: bool = False) -> bytes:
        key = self._key
        if isinstance(key, rsa.RSAPrivateKey):
            h = hash_algorithm(hash_name or "sha256")
            pad: padding.AsymmetricPadding
            if pss:
                pad = padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
            else:
                pad = padding.PKCS1v15()
            return key.sign(data, pad, h)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(hash_algorithm(hash_name or "sha256")))
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
            return key.sign(data)
        raise UnsupportedAlgorithm(f"cannot sign with a {type(key).__name__}")

    def decrypt(self, ciphertext: bytes, *, oaep_hash: str | None = None) -> bytes:
        key = self._key
        if not isinstance(key, rsa.RSAPrivateKey):
            raise UnsupportedAlgorithm(f"key transport needs RSA, not {type(key).__name__}")
        if oaep_hash is None:
            return key.decrypt(ciphertext, padding.PKCS1v15())
        h = hash_algorithm(oaep_hash)
        return key.decrypt(ciphertext, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None))

    def exchange(self, peer_public_key: PublicKeyTypes) -> bytes:
        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(
            peer_public_key, ec.EllipticCurvePublicKey
        ):
            return key.exchange(ec.ECDH(), peer_public_key)
        if isinstance(key, x25519.X25519PrivateKey) and isinstance(
            peer_public_key, x25519.X25519PublicKey
        ):
            return key.exchange(peer_public_key)
        if isinstance(key, x448.X448PrivateKey) and isinstance(peer_public_key, x448.X448PublicKey):
            return key.exchange(peer_public_key)
        raise UnsupportedAlgorithm(f"cannot agree a key with a {type(key).__name__}")


@dataclass(frozen=True)
class KeyPair:
    """A certificate and the private key that belongs to it.

    Decryption is given many of these (a user's current and historical keys) and picks
    the one whose certificate the RecipientIdentifier names.
    """

    certificate: x509.Certificate
    key: PrivateKey


def load_private_key(data: bytes, password: bytes | None = None) -> SoftwareKey:
    """A PEM or DER private key (PKCS#8, traditional RSA/EC), optionally encrypted."""
    errors = []
    for loader in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            return SoftwareKey(loader(data, password))
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            errors.append(str(e))
    raise CertificateError("not a private key we can read: " + "; ".join(errors))


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in PEM (several allowed), DER, or a PKCS#7 bundle (PEM or DER)."""
    stripped = data.lstrip()
    try:
        if stripped.startswith(b"-----BEGIN PKCS7") or b"-----BEGIN PKCS7" in data:
            return list(pkcs7.load_pem_pkcs7_certificates(data))
        if b"-----BEGIN CERTIFICATE" in data:
            return list(x509.load_pem_x509_certificates(data))
    except (ValueError, x509.InvalidVersion) as e:
        raise CertificateError(f"unreadable PEM certificate data: {e}") from None
    # cryptography raises InvalidVersion (not a ValueError) for a bad version field
    try:
        return [x509.load_der_x509_certificate(data)]
    except (ValueError, x509.InvalidVersion):
        pass
    try:
        return list(pkcs7.load_der_pkcs7_certificates(data))
    except (ValueError, x509.InvalidVersion):
        raise CertificateError("not a certificate in PEM, DER or PKCS#7 form") from None


def load_pkcs12(
    data: bytes, password: bytes | None
) -> tuple[SoftwareKey | None, x509.Certificate | None, list[x509.Certificate]]:
    """Key, its certificate and the other certificates of a PKCS#12 file."""
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password)
    except ValueError as e:
        raise CertificateError(f"cannot open PKCS#12 (wrong password?): {e}") from None
    return (SoftwareKey(key) if key is not None else None), cert, list(extra)


def pair_keys(
    keys: Iterable[PrivateKey], certificates: Sequence[x509.Certificate]
) -> list[KeyPair]:
    """Match each key with the certificates that carry its public key."""
    pairs = []
    for key in keys:
        pub = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for cert in certificates:
            spki = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if spki == pub:
                pairs.append(KeyPair(cert, key))
    return pairs
