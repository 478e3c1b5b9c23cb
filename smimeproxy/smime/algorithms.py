"""Algorithm names and identifiers shared by signing and encryption.

One table of the digest and signature algorithms the engine produces and accepts, and
the SMIMECapabilities attribute (RFC 8551 section 2.5.2) that tells correspondents which
content-encryption and key-transport algorithms we can decrypt. Names follow asn1crypto
(``"sha256"``, ``"aes256_gcm"``, ``"rsaes_oaep"``) so that the values read from a parsed
structure and the values written into a new one are the same strings.

Not guaranteed: the capability list of a *received* message is reported as parsed, in
the sender's order; unknown capability OIDs are reported as dotted strings, never
interpreted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from asn1crypto import algos, cms, core

from smimeproxy.errors import MalformedMessage, UnsupportedAlgorithm

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
