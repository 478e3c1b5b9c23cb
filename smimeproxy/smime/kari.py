"""CMS KeyAgreeRecipientInfo: ephemeral-static ECDH (RFC 5753) and X25519 (RFC 8418).

The content-encryption key (CEK) is wrapped with AES key wrap (RFC 3394) under a key
derived from the (EC)DH shared secret with the ANSI X9.63 KDF (SEC 1 section 3.6.1) or
HKDF (RFC 5869), whose input is the DER ``ECC-CMS-SharedInfo`` of RFC 5753 section 7.2.

Only the recipient side touches a private key, and it does so through
:meth:`smimeproxy.smime.keys.PrivateKey.exchange`; the sender's ephemeral key lives for
one message and is never stored.

Not guaranteed: the static-static (``originatorIdentifierOrKey`` naming a certificate)
and MQV variants are refused with :class:`UnsupportedAlgorithm`, and so are X448 and
key-wrap algorithms other than AES (for example the 3DES wrap of RFC 3217).
"""

from __future__ import annotations

from dataclasses import dataclass

from asn1crypto import algos, cms, core
from asn1crypto import keys as asn1_keys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from smimeproxy.errors import DecryptionFailed, MalformedMessage, UnsupportedAlgorithm
from smimeproxy.smime.keys import PrivateKey, hash_algorithm

#: Key agreement schemes: OID -> (name, KDF, hash). RFC 5753 section 7.1.4 (X9.63 KDF;
#: the cofactor variants equal the standard ones on the prime curves, whose cofactor is
#: 1), RFC 3278 section 8.2 (SHA-1), RFC 8418 section 2.2 (HKDF).
KEY_AGREEMENT_SCHEMES: dict[str, tuple[str, str, str]] = {
    "1.3.133.16.840.63.0.2": ("dh_single_pass_std_dh_sha1kdf_scheme", "x963", "sha1"),
    "1.3.132.1.11.0": ("dh_single_pass_std_dh_sha224kdf_scheme", "x963", "sha224"),
    "1.3.132.1.11.1": ("dh_single_pass_std_dh_sha256kdf_scheme", "x963", "sha256"),
    "1.3.132.1.11.2": ("dh_single_pass_std_dh_sha384kdf_scheme", "x963", "sha384"),
    "1.3.132.1.11.3": ("dh_single_pass_std_dh_sha512kdf_scheme", "x963", "sha512"),
    "1.3.133.16.840.63.0.3": ("dh_single_pass_cofactor_dh_sha1kdf_scheme", "x963", "sha1"),
    "1.3.132.1.14.0": ("dh_single_pass_cofactor_dh_sha224kdf_scheme", "x963", "sha224"),
    "1.3.132.1.14.1": ("dh_single_pass_cofactor_dh_sha256kdf_scheme", "x963", "sha256"),
    "1.3.132.1.14.2": ("dh_single_pass_cofactor_dh_sha384kdf_scheme", "x963", "sha384"),
    "1.3.132.1.14.3": ("dh_single_pass_cofactor_dh_sha512kdf_scheme", "x963", "sha512"),
    "1.2.840.113549.1.9.16.3.19": ("dh_single_pass_std_dh_hkdf_sha256_scheme", "hkdf", "sha256"),
    "1.2.840.113549.1.9.16.3.20": ("dh_single_pass_std_dh_hkdf_sha384_scheme", "hkdf", "sha384"),
    "1.2.840.113549.1.9.16.3.21": ("dh_single_pass_std_dh_hkdf_sha512_scheme", "hkdf", "sha512"),
}
_SCHEME_OIDS = {
    (kdf, h): oid for oid, (name, kdf, h) in KEY_AGREEMENT_SCHEMES.items() if "_std_" in name
}

#: AES key wrap, RFC 3394 / RFC 3565 section 2.3.2: name -> (OID, KEK length in bytes).
KEY_WRAPS: dict[str, tuple[str, int]] = {
    "aes128_wrap": ("2.16.840.1.101.3.4.1.5", 16),
    "aes192_wrap": ("2.16.840.1.101.3.4.1.25", 24),
    "aes256_wrap": ("2.16.840.1.101.3.4.1.45", 32),
}
_WRAP_NAMES = {oid: name for name, (oid, _) in KEY_WRAPS.items()}

#: id-ecPublicKey (RFC 5480) and id-X25519 (RFC 8410) for the originator key.
_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_X25519 = "1.3.101.110"

#: The KDF hash that matches each curve's strength (RFC 5753 section 8, NIST SP 800-57).
_CURVE_HASH = {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}


class _SharedInfo(core.Sequence):  # type: ignore[misc]
    """``ECC-CMS-SharedInfo``, RFC 5753 section 7.2."""

    _fields = [
        ("key_info", algos.AlgorithmIdentifier),
        ("entity_u_info", core.OctetString, {"explicit": 0, "optional": True}),
        ("supp_pub_info", core.OctetString, {"explicit": 2}),
    ]


def _derive_kek(
    shared_secret: bytes, kdf: str, hash_name: str, wrap_der: bytes, ukm: bytes | None, size: int
) -> bytes:
    info = _SharedInfo(
        {
            "key_info": algos.AlgorithmIdentifier.load(wrap_der),
            "entity_u_info": ukm,
            "supp_pub_info": (size * 8).to_bytes(4, "big"),
        }
    ).dump()
    algorithm = hash_algorithm(hash_name)
    if kdf == "hkdf":  # RFC 8418 section 2.2: no salt, the SharedInfo as info
        return HKDF(algorithm=algorithm, length=size, salt=None, info=info).derive(shared_secret)
    return X963KDF(algorithm=algorithm, length=size, sharedinfo=info).derive(shared_secret)


@dataclass(frozen=True)
class AgreementParameters:
    """What a KeyAgreeRecipientInfo says about how its CEKs were wrapped."""

    scheme: str  # e.g. "dh_single_pass_std_dh_sha256kdf_scheme"
    kdf: str  # "x963" or "hkdf"
    hash_name: str
    wrap: str  # "aes128_wrap" ...
    wrap_der: bytes  # the KeyWrapAlgorithm exactly as sent (it feeds the KDF)
    originator_algorithm: str  # dotted OID of the ephemeral key's algorithm
    originator_point: bytes  # the ephemeral public key (EC point or X25519 bytes)
    ukm: bytes | None


def agreement_parameters(kari: cms.KeyAgreeRecipientInfo) -> AgreementParameters:
    """Parse the algorithm and originator of a KARI; raise for what we do not support."""
    algorithm = kari["key_encryption_algorithm"]
    oid = algorithm["algorithm"].dotted
    if oid not in KEY_AGREEMENT_SCHEMES:
        raise UnsupportedAlgorithm(f"unsupported key agreement algorithm {oid}")
    scheme, kdf, hash_name = KEY_AGREEMENT_SCHEMES[oid]
    params = algorithm["parameters"]
    if isinstance(params, core.Void):
        raise MalformedMessage("key agreement algorithm without its key wrap algorithm")
    wrap_der = params.dump()
    wrap_id = algos.AlgorithmIdentifier.load(wrap_der)
    wrap_oid = wrap_id["algorithm"].dotted
    if wrap_oid not in _WRAP_NAMES:
        raise UnsupportedAlgorithm(f"unsupported key wrap algorithm {wrap_oid}")
    wrap = _WRAP_NAMES[wrap_oid]
    originator = kari["originator"]
    if originator.name != "originator_key":
        raise UnsupportedAlgorithm("static-static key agreement (originator certificate)")
    info = originator.chosen
    bits = info["public_key"].contents or b""
    if not bits or bits[0] != 0:
        raise MalformedMessage("originator public key is not a whole number of bytes")
    return AgreementParameters(
        scheme=scheme,
        kdf=kdf,
        hash_name=hash_name,
        wrap=wrap,
        wrap_der=wrap_der,
        originator_algorithm=info["algorithm"]["algorithm"].dotted,
        originator_point=bytes(bits[1:]),
        ukm=kari["ukm"].native,
    )


def _peer_key(params: AgreementParameters, own: PublicKeyTypes) -> PublicKeyTypes:
    """The sender's ephemeral public key, on the curve of our own key."""
    oid, point = params.originator_algorithm, params.originator_point
    try:
        if oid == _EC_PUBLIC_KEY and isinstance(own, ec.EllipticCurvePublicKey):
            return ec.EllipticCurvePublicKey.from_encoded_point(own.curve, point)
        if oid == _X25519 and isinstance(own, x25519.X25519PublicKey):
            return x25519.X25519PublicKey.from_public_bytes(point)
    except ValueError:
        raise MalformedMessage("originator public key is not a valid point") from None
    raise UnsupportedAlgorithm(f"originator key {oid} does not fit the recipient's key")


def unwrap_key(
    params: AgreementParameters,
    encrypted_key: bytes,
    key: PrivateKey,
    *,
    cek_size: int,
    recipient_public_key: PublicKeyTypes | None = None,
) -> bytes:
    """Agree, derive the KEK and unwrap the CEK; :class:`DecryptionFailed` if it fails.

    ``recipient_public_key`` (the certificate's key) fixes the curve of the sender's
    ephemeral key; by default the private key's own public key is used.
    """
    peer = _peer_key(params, recipient_public_key or key.public_key())
    try:
        shared = key.exchange(peer)
    except UnsupportedAlgorithm:
        raise
    except Exception:  # any key back end (wrong curve, HSM error): fail quietly
        raise DecryptionFailed("decryption failed") from None
    kek = _derive_kek(
        shared, params.kdf, params.hash_name, params.wrap_der, params.ukm, KEY_WRAPS[params.wrap][1]
    )
    try:
        cek = aes_key_unwrap(kek, encrypted_key)
    except (InvalidUnwrap, ValueError):
        raise DecryptionFailed("decryption failed") from None
    if len(cek) != cek_size:
        raise DecryptionFailed("decryption failed")
    return cek


def wrap_for(
    public_key: PublicKeyTypes, cek: bytes, *, wrap: str, hkdf: bool = False
) -> tuple[cms.OriginatorIdentifierOrKey, cms.KeyEncryptionAlgorithm, bytes]:
    """Sender side: a fresh ephemeral key, and the CEK wrapped for ``public_key``.

    Returns the originator field, the keyEncryptionAlgorithm and the encrypted key of
    one RecipientEncryptedKey. The KDF hash follows the curve (SHA-256 for P-256 and
    X25519, SHA-384 for P-384, SHA-512 for P-521); ``hkdf`` selects RFC 8418's HKDF for
    X25519 instead of the X9.63 KDF.
    """
    ephemeral_public: bytes
    shared: bytes
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        hash_name = _CURVE_HASH.get(public_key.curve.name)
        if hash_name is None:
            raise UnsupportedAlgorithm(f"unsupported curve {public_key.curve.name}")
        eph = ec.generate_private_key(public_key.curve)
        shared = eph.exchange(ec.ECDH(), public_key)
        ephemeral_public = eph.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        algorithm_oid, kdf = _EC_PUBLIC_KEY, "x963"
    elif isinstance(public_key, x25519.X25519PublicKey):
        hash_name = "sha256"
        eph_x = x25519.X25519PrivateKey.generate()
        shared = eph_x.exchange(public_key)
        ephemeral_public = eph_x.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        algorithm_oid, kdf = _X25519, ("hkdf" if hkdf else "x963")
    else:
        raise UnsupportedAlgorithm(f"no key agreement for a {type(public_key).__name__}")
    wrap_oid, kek_size = KEY_WRAPS[wrap]
    wrap_id = algos.AlgorithmIdentifier({"algorithm": wrap_oid})
    wrap_der = wrap_id.dump()
    kek = _derive_kek(shared, kdf, hash_name, wrap_der, None, kek_size)
    encrypted_key = aes_key_wrap(kek, cek)
    originator = cms.OriginatorIdentifierOrKey(
        name="originator_key",
        value=asn1_keys.PublicKeyInfo(
            {
                "algorithm": asn1_keys.PublicKeyAlgorithm({"algorithm": algorithm_oid}),
                "public_key": ephemeral_public,
            }
        ),
    )
    key_encryption = cms.KeyEncryptionAlgorithm(
        {"algorithm": _SCHEME_OIDS[(kdf, hash_name)], "parameters": core.Any(wrap_id)}
    )
    return originator, key_encryption, encrypted_key


def default_hash(public_key: PublicKeyTypes) -> str:
    """The KDF hash :func:`wrap_for` uses for this key (for tests and status)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _CURVE_HASH.get(public_key.curve.name, "sha256")
    return "sha256"


__all__ = [
    "KEY_AGREEMENT_SCHEMES",
    "KEY_WRAPS",
    "AgreementParameters",
    "agreement_parameters",
    "default_hash",
    "unwrap_key",
    "wrap_for",
]
