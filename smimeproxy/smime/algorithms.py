"""Algorithm names and identifiers shared by signing and encryption.

The digest and signature algorithms the engine produces and accepts (identifiers to
write, and the dispatch that verifies a signature under a received identifier), and
the SMIMECapabilities attribute (RFC 8551 section 2.5.2) that tells correspondents which
content-encryption and key-transport algorithms we can decrypt. Names follow asn1crypto
(``"sha256"``, ``"aes256_gcm"``, ``"rsaes_oaep"``) so that the values read from a parsed
structure and the values written into a new one are the same strings.

Not guaranteed: the capability list of a *received* message is reported as parsed, in
the sender's order; unknown capability OIDs are reported as dotted strings, never
interpreted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from asn1crypto import algos, cms, core
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa

from smimeproxy.errors import MalformedMessage, UnsupportedAlgorithm
from smimeproxy.smime.keys import hash_algorithm

#: Digest algorithms we sign with (RFC 5754 section 2: SHA-256/384/512 in CMS).
SIGNING_DIGESTS: tuple[str, ...] = ("sha256", "sha384", "sha512")

#: Digests accepted when verifying but reported as weak: SHA-1 and MD5 are not
#: collision resistant (RFC 8551 section 2.1 says SHA-1 SHOULD NOT be used for new
#: signatures; Thunderbird treats SHA-1 signatures as bad).
WEAK_DIGESTS: frozenset[str] = frozenset({"md5", "sha1"})

#: Digest algorithms we can compute when verifying.
VERIFY_DIGESTS: frozenset[str] = frozenset({"sha1", "sha224", "sha256", "sha384", "sha512"})

#: Capabilities we can decrypt, most preferred first (RFC 8551 section 2.5.2 asks for the
#: order of preference). AES-GCM comes from AuthEnvelopedData (RFC 5083/5084),
#: AES-CBC from EnvelopedData (RFC 3565), RSAES-OAEP key transport from RFC 3560.
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "aes256_gcm",
    "aes128_gcm",
    "aes256_cbc",
    "aes128_cbc",
    "rsaes_oaep",
)

# Capabilities whose SMIMECapability carries parameters. RFC 3560 section 5 gives the
# RSAES-OAEP capability with default parameters as the exact encoding
# 30 0D 06 09 2A 86 48 86 F7 0D 01 01 07 30 00 (an empty RSAES-OAEP-params SEQUENCE).
# AES-CBC (RFC 3565 section 5) and AES-GCM (as NSS/Thunderbird and OpenSSL write it)
# carry no parameters at all.
_CAPABILITY_PARAMETERS: dict[str, bytes] = {
    "rsaes_oaep": b"\x30\x00",
}

_KNOWN_CAPABILITIES: frozenset[str] = frozenset(
    {
        "aes128_cbc",
        "aes192_cbc",
        "aes256_cbc",
        "aes128_gcm",
        "aes192_gcm",
        "aes256_gcm",
        "tripledes_3key",
        "rsaes_pkcs1v15",
        "rsaes_oaep",
    }
)

#: Bound on how many capabilities we read from a received attribute (hostile input).
MAX_CAPABILITIES = 64


def encode_capabilities(names: Iterable[str]) -> cms.SMIMECapabilites:
    """The SMIMECapabilities value for ``names``, in the given order.

    Raises :class:`UnsupportedAlgorithm` for a name we do not know how to announce:
    announcing a capability we cannot honour would make correspondents encrypt mail we
    cannot read.
    """
    items = []
    for name in names:
        if name not in _KNOWN_CAPABILITIES:
            raise UnsupportedAlgorithm(f"unknown S/MIME capability {name!r}")
        value: dict[str, object] = {"capability_id": name}
        params = _CAPABILITY_PARAMETERS.get(name)
        if params is not None:
            value["parameters"] = core.Any.load(params)
        items.append(cms.SMIMECapabilityIdentifier(value))
    return cms.SMIMECapabilites(items)


def capability_attribute(names: Sequence[str]) -> cms.CMSAttribute:
    """The signed attribute ``smimeCapabilities`` (RFC 8551 section 2.5.2)."""
    return cms.CMSAttribute({"type": "smime_capabilities", "values": [encode_capabilities(names)]})


def parse_capabilities(value: cms.SMIMECapabilites | bytes) -> tuple[str, ...]:
    """Capability names of a received SMIMECapabilities value (parsed or DER), in order.

    Unknown OIDs come back dotted (``"1.2.3.4"``) so that nothing is silently lost.
    Raises :class:`MalformedMessage` when the value does not parse or is too long.
    """
    try:
        caps = cms.SMIMECapabilites.load(value) if isinstance(value, bytes) else value
        if len(caps) > MAX_CAPABILITIES:
            raise MalformedMessage(f"more than {MAX_CAPABILITIES} S/MIME capabilities")
        out = []
        for cap in caps:
            ident = cap["capability_id"]
            out.append(ident.native if ident.native is not None else ident.dotted)
        return tuple(out)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise MalformedMessage(f"unreadable SMIMECapabilities: {type(e).__name__}") from None


def digest_algorithm_id(name: str) -> algos.DigestAlgorithm:
    """The DigestAlgorithmIdentifier for a signing digest; parameters absent (RFC 5754
    section 2 says implementations SHOULD omit them for SHA-2)."""
    if name not in SIGNING_DIGESTS:
        raise UnsupportedAlgorithm(f"we do not sign with digest {name!r}")
    return algos.DigestAlgorithm({"algorithm": name})


# ecPublicKey (RFC 5480) used as a signature algorithm by some producers: ECDSA with the
# SignerInfo's digest algorithm.
_EC_PUBLIC_KEY_OID = "1.2.840.10045.2.1"


def signature_algorithm_id(public: object, digest: str, pss: bool) -> algos.SignedDigestAlgorithm:
    """The SignerInfo signatureAlgorithm for a public key (what our signer writes).

    Raises :class:`UnsupportedAlgorithm` for a key type we do not sign with.
    """
    if isinstance(public, rsa.RSAPublicKey):
        if pss:
            # RFC 4056 section 2: hash, MGF1 over the same hash, salt = hash length.
            params = algos.RSASSAPSSParams(
                {
                    "hash_algorithm": {"algorithm": digest},
                    "mask_gen_algorithm": {
                        "algorithm": "mgf1",
                        "parameters": {"algorithm": digest},
                    },
                    "salt_length": hashlib.new(digest).digest_size,
                }
            )
            return algos.SignedDigestAlgorithm({"algorithm": "rsassa_pss", "parameters": params})
        # rsaEncryption with NULL parameters (RFC 3370 section 3.2), as OpenSSL writes it.
        return algos.SignedDigestAlgorithm(
            {"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()}
        )
    if pss:
        raise UnsupportedAlgorithm("RSASSA-PSS needs an RSA key")
    if isinstance(public, ec.EllipticCurvePublicKey):
        # ecdsa-with-SHA*, parameters absent (RFC 5758 section 3.2).
        return algos.SignedDigestAlgorithm({"algorithm": f"{digest}_ecdsa"})
    if isinstance(public, ed25519.Ed25519PublicKey):
        # id-Ed25519, parameters absent (RFC 8419 section 2.3).
        return algos.SignedDigestAlgorithm({"algorithm": "ed25519"})
    raise UnsupportedAlgorithm(f"cannot sign with a {type(public).__name__}")


def signature_hash(signature_name: str) -> str | None:
    """The hash named by a combined signature OID (``sha256_rsa`` -> ``sha256``)."""
    head, _, tail = signature_name.partition("_")
    if tail in ("rsa", "ecdsa", "dsa") and head in VERIFY_DIGESTS | WEAK_DIGESTS:
        return head
    return None


def verify_signature(
    public: object,
    algorithm: algos.SignedDigestAlgorithm,
    digest_name: str,
    signature: bytes,
    data: bytes,
) -> None:
    """Return when ``signature`` over ``data`` holds for ``public`` under ``algorithm``.

    Raises ``cryptography``'s InvalidSignature when it does not, and
    :class:`UnsupportedAlgorithm` for an algorithm we do not verify or one that does
    not fit the key. ``digest_name`` (the SignerInfo digest) is the hash for
    algorithms that do not name their own (rsaEncryption, plain ECDSA/DSA).
    Malformed parameters raise ValueError/TypeError/KeyError from asn1crypto.
    """
    signature_name = algorithm["algorithm"].native
    if not isinstance(signature_name, str):
        signature_name = algorithm["algorithm"].dotted
    if signature_name == "ed25519":
        if not isinstance(public, ed25519.Ed25519PublicKey):
            raise UnsupportedAlgorithm("Ed25519 signature but the certificate has another key")
        public.verify(signature, data)
        return
    if signature_name == "rsassa_pss":
        if not isinstance(public, rsa.RSAPublicKey):
            raise UnsupportedAlgorithm("RSASSA-PSS signature but the certificate is not RSA")
        params = algorithm["parameters"]
        pss_hash = params["hash_algorithm"]["algorithm"].native
        mgf = params["mask_gen_algorithm"]
        if mgf["algorithm"].native != "mgf1":
            raise UnsupportedAlgorithm("RSASSA-PSS with a mask generation other than MGF1")
        mgf_hash = mgf["parameters"]["algorithm"].native
        if params["trailer_field"].native not in (1, "trailer_field_bc"):
            raise UnsupportedAlgorithm("RSASSA-PSS trailer field other than 1")
        salt = params["salt_length"].native
        pad = padding.PSS(mgf=padding.MGF1(hash_algorithm(mgf_hash)), salt_length=salt)
        public.verify(signature, data, pad, hash_algorithm(pss_hash))
        return
    hash_name = signature_hash(signature_name) or digest_name
    if hash_name not in VERIFY_DIGESTS:
        raise UnsupportedAlgorithm(f"unsupported digest algorithm {hash_name}")
    digest = hash_algorithm(hash_name)
    if signature_name in ("rsassa_pkcs1v15",) or signature_name.endswith("_rsa"):
        if not isinstance(public, rsa.RSAPublicKey):
            raise UnsupportedAlgorithm("RSA signature but the certificate is not RSA")
        public.verify(signature, data, padding.PKCS1v15(), digest)
        return
    if signature_name in ("ecdsa", _EC_PUBLIC_KEY_OID) or signature_name.endswith("_ecdsa"):
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise UnsupportedAlgorithm("ECDSA signature but the certificate is not EC")
        public.verify(signature, data, ec.ECDSA(digest))
        return
    if signature_name == "dsa" or signature_name.endswith("_dsa"):
        if not isinstance(public, dsa.DSAPublicKey):
            raise UnsupportedAlgorithm("DSA signature but the certificate is not DSA")
        public.verify(signature, data, digest)
        return
    raise UnsupportedAlgorithm(f"unsupported signature algorithm {signature_name}")
