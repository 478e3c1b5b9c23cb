"""CMS SignedData (RFC 5652 section 5): build and verify, at the CMS level only.

:func:`sign_data` produces a DER ``ContentInfo(signedData)`` the way S/MIME agents
expect it (RFC 8551): one SignerInfo identified by issuerAndSerialNumber, signed
attributes contentType, messageDigest, signingTime, SMIMECapabilities and optionally
SMIMEEncryptionKeyPreference, the signer's certificate and chain included.

:func:`verify_data` checks the *cryptography* of every SignerInfo of a received object
and reports it as :class:`~smimeproxy.smime.status.Check` values. It does **not**
validate certificates (chain, validity, key usage, revocation: see
``smimeproxy.pki.validation``), does not look at MIME, and does not decide whether a
signer is trusted. A cryptographic failure is a ``FAIL`` check, never an exception;
only structurally unusable input raises :class:`~smimeproxy.errors.MalformedMessage`.

Weak digests: SHA-1 and MD5 still verify (old archives need them) but every such signer
gets a ``digest-strength`` check with outcome ``FAIL``, so that
``SignerStatus.cryptographically_valid`` is false by default, as in Thunderbird. A
caller whose policy accepts SHA-1 may drop that one check.

Plain DER input is cut into its parts by :mod:`smimeproxy.smime.signed_der` (no
asn1crypto objects, much faster); the per-signer checks here are shared by that fast
path and the asn1crypto path, which reads everything the fast path declines.
"""

from __future__ import annotations

import binascii
import datetime
import functools
import hashlib
import hmac
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as CryptographyUnsupported
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning

from smimeproxy.errors import MalformedMessage, UnsupportedAlgorithm
from smimeproxy.smime import der
from smimeproxy.smime.algorithms import (
    DEFAULT_CAPABILITIES,
    SIGNING_DIGESTS,
    VERIFY_DIGESTS,
    WEAK_DIGESTS,
    capability_attribute,
    digest_algorithm_id,
    parse_capabilities,
    signature_algorithm_id,
    signature_hash,
    verify_signature,
)
from smimeproxy.smime.keys import KeyPair
from smimeproxy.smime.signed_der import MAX_CERTIFICATES, MAX_SIGNERS
from smimeproxy.smime.signed_der import PARSE_ERRORS as _PARSE_ERRORS
from smimeproxy.smime.signed_der import SIGNED_DATA_OID as _SIGNED_DATA_OID
from smimeproxy.smime.signed_der import SIGNED_DATA_OID_DER as _SIGNED_DATA_OID_DER
from smimeproxy.smime.signed_der import PlainSignedData as _PlainSignedData
from smimeproxy.smime.signed_der import RawAttributes as _RawAttributes
from smimeproxy.smime.signed_der import plain_utc_time as _plain_utc_time
from smimeproxy.smime.status import Check, Outcome

__all__ = [
    "DEFAULT_CAPABILITIES",
    "SignedDataResult",
    "SignerInfoResult",
    "decode_pem",
    "sign_data",
    "sign_pieces",
    "verify_data",
]

#: Bounds for hostile input: far above anything a mail client produces (MAX_SIGNERS
#: and MAX_CERTIFICATES live in signed_der, whose reader enforces them too).
MAX_CRLS = 100
MAX_SIGNED_ATTRIBUTES = 64
MAX_SIGNED_ATTRIBUTES_BYTES = 64 * 1024

#: The mistyped id-signedData OID that web.de once sent (1.2.840.113546 instead of
#: 113549; gpgsm accepts it, see its samplemsgs); the right one is in signed_der.
_WEBDE_SIGNED_DATA_OID = "1.2.840.113546.1.7.2"
_DATA_OID_DER = der.oid("1.2.840.113549.1.7.1")  # id-data, RFC 5652 section 4

_PEM_RE = re.compile(
    rb"-----BEGIN (PKCS7|CMS|SIGNED MESSAGE|PKCS #7 SIGNED DATA)-----(.*?)-----END \1-----",
    re.DOTALL,
)


@dataclass(frozen=True)
class SignerInfoResult:
    """The cryptographic verdict on one SignerInfo (no certificate validation)."""

    certificate: x509.Certificate | None
    digest_algorithm: str
    signature_algorithm: str
    checks: tuple[Check, ...]
    signing_time: datetime.datetime | None = None
    capabilities: tuple[str, ...] = ()
    encryption_key_preference: x509.Certificate | None = None
    errors: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        """Every check passed (including ``digest-strength``)."""
        return bool(self.checks) and all(c.outcome is Outcome.PASS for c in self.checks)

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)


@dataclass(frozen=True)
class SignedDataResult:
    """A parsed and checked SignedData.

    ``content`` is the eContent when encapsulated, else the detached content passed in
    (when both exist, the *detached* content is what was checked: see ``verify_data``).
    """

    content: bytes
    content_type: str
    detached: bool
    signers: tuple[SignerInfoResult, ...]
    certificates: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]
    errors: tuple[str, ...] = ()  # certificates or CRLs that could not be read, etc.


# --------------------------------------------------------------------------- signing


def sign_data(
    content: bytes,
    signer: KeyPair,
    *,
    chain: Sequence[x509.Certificate] = (),
    detached: bool = True,
    digest: str = "sha256",
    pss: bool = False,
    capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
    encryption_certificate: x509.Certificate | None = None,
    signing_time: datetime.datetime | None = None,
) -> bytes:
    """Sign ``content`` and return a DER ``ContentInfo(signedData)``.

    RSA keys sign with PKCS#1 v1.5 (signature algorithm rsaEncryption, as OpenSSL
    writes it) or RSASSA-PSS when ``pss`` (RFC 4056: MGF1 with the same hash, salt as
    long as the hash); EC keys with ecdsa-with-SHA*; Ed25519 keys with id-Ed25519 and
    always SHA-512 as the message digest (RFC 8419 section 3), whatever ``digest`` says.
    The private key is only used through ``signer.key.sign``.

    ``detached=False`` puts the content inside (opaque signed-data). When
    ``encryption_certificate`` is given, an SMIMEEncryptionKeyPreference attribute names
    it (RFC 8551 section 2.5.3) and the certificate is included.

    Not guaranteed: that the certificate suits signing (key usage, validity) is not
    checked here; that is the PKI layer's job.
    """
    if not isinstance(content, bytes | bytearray | memoryview):
        raise TypeError("content must be bytes")
    return sign_pieces(
        [bytes(content)],
        signer,
        chain=chain,
        detached=detached,
        digest=digest,
        pss=pss,
        capabilities=capabilities,
        encryption_certificate=encryption_certificate,
        signing_time=signing_time,
    )


def sign_pieces(
    pieces: Sequence[bytes],
    signer: KeyPair,
    *,
    chain: Sequence[x509.Certificate] = (),
    detached: bool = True,
    digest: str = "sha256",
    pss: bool = False,
    capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
    encryption_certificate: x509.Certificate | None = None,
    signing_time: datetime.datetime | None = None,
) -> bytes:
    """:func:`sign_data` over the concatenation of ``pieces``, without joining them
    for a detached signature (the sealer signs a 10 MB body without copying it)."""
    public = signer.key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        digest = "sha512"
    if digest not in SIGNING_DIGESTS:
        raise UnsupportedAlgorithm(f"we do not sign with digest {digest!r}")
    signature_algorithm = _signature_algorithm_der(public, digest, pss)

    when = signing_time or datetime.datetime.now(datetime.UTC)
    if when.tzinfo is None:
        raise ValueError("signing_time must be timezone-aware")
    # Written as DER directly (see smimeproxy.smime.der): building the same structure
    # with asn1crypto objects costs several times the RSA signature itself.
    attributes = [
        _attribute(_OID_CONTENT_TYPE, _DATA_OID_DER),
        _attribute(_OID_SIGNING_TIME, _cms_time_der(when)),
        _attribute(_OID_MESSAGE_DIGEST, der.tlv(0x04, _digest_of(digest, pieces))),
    ]
    if capabilities:
        attributes.append(_capability_attribute_der(tuple(capabilities)))
    extra: list[x509.Certificate] = []
    if encryption_certificate is not None:
        extra.append(encryption_certificate)
        enc_ias = der.issuer_and_serial(_certificate_der(encryption_certificate))
        # SMIMEEncryptionKeyPreference: issuerAndSerialNumber [0] IMPLICIT (RFC 8551 2.5.3)
        attributes.append(_attribute(_OID_ENCRYPT_KEY_PREF, b"\xa0" + enc_ias[1:]))
    # DER: a SET OF is sorted by the encodings of its elements (X.690 11.6).
    to_sign = der.set_of(attributes)
    hash_name = None if isinstance(public, ed25519.Ed25519PublicKey) else digest
    signature = signer.key.sign(to_sign, hash_name, pss=pss)

    signer_der = _certificate_der(signer.certificate)
    digest_algorithm = _digest_algorithm_der(digest)
    signer_info = der.sequence(
        b"\x02\x01\x01",  # version v1: sid is issuerAndSerialNumber (RFC 5652 5.3)
        der.issuer_and_serial(signer_der),
        digest_algorithm,
        b"\xa0" + to_sign[1:],  # signedAttrs [0] IMPLICIT
        signature_algorithm,
        der.tlv(0x04, signature),
    )
    certificates = {signer_der}
    certificates.update(_certificate_der(c) for c in [*chain, *extra])
    encap = [_DATA_OID_DER]
    if not detached:
        octets = der.tlv(0x04, b"".join(pieces))
        encap.append(der.header(0xA0, len(octets)) + octets)
    signed_data = der.sequence(
        b"\x02\x01\x01",  # version 1 (RFC 5652 section 5.1)
        der.set_of([digest_algorithm]),
        der.sequence(*encap),
        der.set_of(certificates, 0xA0),  # certificates [0] IMPLICIT CertificateSet
        der.set_of([signer_info]),
    )
    return der.sequence(_SIGNED_DATA_OID_DER, der.header(0xA0, len(signed_data)), signed_data)


def _digest_of(name: str, pieces: Sequence[bytes]) -> bytes:
    h = hashlib.new(name)
    for piece in pieces:
        h.update(piece)
    return h.digest()


def _certificate_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _attribute(oid: str, value: bytes) -> bytes:
    """A CMS Attribute with one value (RFC 5652 section 5.3)."""
    return der.sequence(der.oid(oid), der.tlv(0x31, value))


@functools.lru_cache(maxsize=32)
def _capability_attribute_der(names: tuple[str, ...]) -> bytes:
    return bytes(capability_attribute(names).dump())


@functools.lru_cache(maxsize=8)
def _digest_algorithm_der(name: str) -> bytes:
    return bytes(digest_algorithm_id(name).dump())


#: signatureAlgorithm encodings per (key type, digest, PSS): they do not depend on the
#: key itself (see algorithms.signature_algorithm_id), so each is built once.
_SIGNATURE_ALGORITHMS: dict[tuple[type, str, bool], bytes] = {}
_KEY_KINDS = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)


def _signature_algorithm_der(public: object, digest: str, pss: bool) -> bytes:
    kind = next((k for k in _KEY_KINDS if isinstance(public, k)), None)
    if kind is None:  # not one we sign with: signature_algorithm_id raises
        return bytes(signature_algorithm_id(public, digest, pss).dump())
    found = _SIGNATURE_ALGORITHMS.get((kind, digest, pss))
    if found is None:
        found = bytes(signature_algorithm_id(public, digest, pss).dump())
        _SIGNATURE_ALGORITHMS[(kind, digest, pss)] = found
    return found


def _cms_time_der(when: datetime.datetime) -> bytes:
    # RFC 5652 section 11.3: UTCTime for 1950-2049, GeneralizedTime otherwise.
    when = when.astimezone(datetime.UTC)
    if 1950 <= when.year < 2050:
        return der.tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return der.tlv(0x18, f"{when.year:04d}{when:%m%d%H%M%S}Z".encode("ascii"))


def _to_asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def _der_header(tag: int, length: int) -> bytes:
    if length < 0x80:
        return bytes([tag, length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(body)]) + body


# ------------------------------------------------------------------------- verifying


def decode_pem(data: bytes) -> bytes:
    """DER bytes of a PEM-armoured CMS object (``PKCS7``, ``CMS``, ``SIGNED MESSAGE``).

    Text before the armour (comment lines) is ignored. Raises :class:`MalformedMessage`
    when there is no armour or its base64 is broken.
    """
    match = _PEM_RE.search(data)
    if match is None:
        raise MalformedMessage("no PEM-armoured CMS object found")
    lines = [
        line.strip()
        for line in match.group(2).splitlines()
        if line.strip() and b":" not in line  # skip RFC 1421-style headers
    ]
    try:
        return binascii.a2b_base64(b"".join(lines), strict_mode=True)
    except binascii.Error:
        raise MalformedMessage("PEM armour holds broken base64") from None


def verify_data(
    data: bytes,
    detached_content: bytes | None = None,
    *,
    extra_certificates: Sequence[x509.Certificate] = (),
) -> SignedDataResult:
    """Parse a ``ContentInfo(signedData)`` (DER, BER, or PEM) and check every signer.

    ``detached_content`` is the content of a detached signature (the signed MIME part,
    canonical). If the object *also* encapsulates content and it differs, the signers
    are checked against ``detached_content`` (what a reader sees) and each gets an
    ``encapsulated-content`` check with outcome ``FAIL``: that combination is the
    eContent-confusion attack (CVE-2018-18509).

    Checks per signer: ``message-digest`` and ``content-type`` (only when signed
    attributes exist), ``signature``, ``digest-strength``. The signer's certificate is
    looked up among the message's own certificates by issuerAndSerialNumber or
    subjectKeyIdentifier, then among ``extra_certificates`` (a signer that used
    ``-nocerts``, whose certificate we know from elsewhere); when it is missing,
    ``signature`` fails ("signer certificate not found"). ``certificates`` of the
    result lists only the message's own certificates.

    Not guaranteed: anything about trust. A ``PASS`` means "this key signed these
    bytes", not "this person sent this mail".
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("data must be bytes")
    data = bytes(data)
    if data.lstrip()[:1] == b"-" or b"-----BEGIN" in data[:4096]:
        data = decode_pem(data)
    try:
        return _verify(data, detached_content, extra_certificates)
    except RecursionError:
        raise MalformedMessage("CMS structure nested too deeply") from None
    except _PARSE_ERRORS as e:
        raise MalformedMessage(f"malformed SignedData ({type(e).__name__})") from None


def _verify(
    data: bytes, detached_content: bytes | None, extra: Sequence[x509.Certificate]
) -> SignedDataResult:
    plain = _PlainSignedData.read(data)
    if plain is not None:
        return _verify_plain(plain, detached_content, extra)
    signed_data = _parse_signed_data(data)
    errors: list[str] = []

    encap = _RawEncapsulatedContentInfo.load(signed_data["encap_content_info"].dump())
    content_type_oid = encap["content_type"]
    content_type = content_type_oid.native
    econtent = encap["content"]
    encapsulated: bytes | None = None
    if not isinstance(econtent, core.Void):
        encapsulated = _octets(econtent)

    if detached_content is not None:
        content = bytes(detached_content)
    else:
        content = encapsulated if encapsulated is not None else b""
    confusion = (
        detached_content is not None
        and encapsulated is not None
        and not hmac.compare_digest(encapsulated, content)
    )

    certs_asn1, certificates = _read_certificates(signed_data, errors)
    crls = _read_crls(signed_data, errors)

    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) > MAX_SIGNERS:
        raise MalformedMessage(f"more than {MAX_SIGNERS} signers")
    index = _CertificateIndex([*certs_asn1, *(_to_asn1(c) for c in extra)])
    signers = []
    for signer_info in signer_infos:
        signers.append(
            _verify_signer(
                signer_info,
                content=content,
                have_content=encapsulated is not None or detached_content is not None,
                content_type_oid=content_type_oid.dotted,
                index=index,
                confusion=confusion,
            )
        )
    return SignedDataResult(
        content=content,
        content_type=str(content_type),
        detached=encapsulated is None,
        signers=tuple(signers),
        certificates=tuple(certificates),
        crls=tuple(crls),
        errors=tuple(errors),
    )


@functools.lru_cache(maxsize=64)
def _content_type_names(encoded: bytes) -> tuple[str, str]:
    """(name as asn1crypto gives it, dotted form) of an eContentType OID's DER."""
    oid = cms.ContentType.load(encoded)
    return str(oid.native), str(oid.dotted)


@functools.lru_cache(maxsize=64)
def _plain_algorithm(encoded: bytes, signature: bool) -> tuple[str, str] | None:
    """(name as :func:`_algorithm_name` gives it, dotted OID) of an AlgorithmIdentifier's
    DER: a signature or a digest algorithm; None when asn1crypto cannot read it."""
    try:
        kind = algos.SignedDigestAlgorithm if signature else algos.DigestAlgorithm
        oid = kind.load(encoded)["algorithm"]
        return _algorithm_name(oid), str(oid.dotted)
    except _PARSE_ERRORS:
        return None


_RSASSA_PSS_OID = "1.2.840.113549.1.1.10"


@functools.lru_cache(maxsize=64)
def _signature_algorithm(encoded: bytes) -> algos.SignedDigestAlgorithm:
    """A signature AlgorithmIdentifier (not RSASSA-PSS: those carry parameters and are
    not read here), parsed once per encoding; the parts verify_signature reads are
    parsed before it is shared, so that callers only read it."""
    algorithm = algos.SignedDigestAlgorithm.load(encoded)
    algorithm["algorithm"].native  # noqa: B018
    algorithm["algorithm"].dotted  # noqa: B018
    return algorithm


def _verify_plain(
    plain: _PlainSignedData, detached_content: bytes | None, extra: Sequence[x509.Certificate]
) -> SignedDataResult:
    """:func:`_verify` of a :class:`_PlainSignedData`: the same checks and results."""
    content_type, content_type_oid = _content_type_names(plain.content_type)
    encapsulated = plain.encapsulated
    if detached_content is not None:
        content = bytes(detached_content)
    else:
        content = encapsulated if encapsulated is not None else b""
    confusion = (
        detached_content is not None
        and encapsulated is not None
        and not hmac.compare_digest(encapsulated, content)
    )
    errors: list[str] = []
    certs_asn1: list[asn1_x509.Certificate] = []
    certificates: list[x509.Certificate] = []
    for encoded in plain.certificates:
        cert = _load_certificate(encoded)
        if cert is None:
            errors.append("a certificate in the message could not be read")
            continue
        certs_asn1.append(asn1_x509.Certificate.load(encoded))
        certificates.append(cert)
    index = _CertificateIndex([*certs_asn1, *(_to_asn1(c) for c in extra)])
    signers = []
    for raw in plain.signers:
        context = {
            "content": content,
            "have_content": encapsulated is not None or detached_content is not None,
            "content_type_oid": content_type_oid,
            "index": index,
            "confusion": confusion,
        }
        signer = _plain_signer(raw, **context)  # type: ignore[arg-type]
        if signer is None:
            signer = _verify_signer(cms.SignerInfo.load(raw), **context)  # type: ignore[arg-type]
        signers.append(signer)
    return SignedDataResult(
        content=content,
        content_type=content_type,
        detached=encapsulated is None,
        signers=tuple(signers),
        certificates=tuple(certificates),
        crls=(),
        errors=tuple(errors),
    )


def _plain_signer(
    raw: bytes,
    *,
    content: bytes,
    have_content: bool,
    content_type_oid: str,
    index: _CertificateIndex,
    confusion: bool,
) -> SignerInfoResult | None:
    """:func:`_verify_signer` of a plain DER SignerInfo; None when it is not one this
    reads (RSASSA-PSS, signed attributes that are not plain DER, a signer identifier
    that is not a byte-exact copy of a certificate's), which asn1crypto then reads."""
    at = der.element_at
    top = at(raw, 0, len(raw))
    if top is None or top[0] != 0x30 or top[2] != len(raw):
        return None
    _, pos, end = top
    version = at(raw, pos, end)
    if version is None or version[0] != 0x02 or version[1] == version[2]:
        return None
    sid = at(raw, version[2], end)
    digest = at(raw, sid[2], end) if sid is not None else None
    if sid is None or digest is None or digest[0] != 0x30:
        return None
    element = at(raw, digest[2], end)
    signed_attrs = None
    if element is not None and element[0] == 0xA0:
        signed_attrs = element
        element = at(raw, element[2], end)
    if element is None or element[0] != 0x30:
        return None
    algorithm = element
    signature = at(raw, algorithm[2], end)
    if signature is None or signature[0] != 0x04:
        return None
    if signature[2] != end:
        unsigned = at(raw, signature[2], end)
        if unsigned is None or unsigned[0] != 0xA1 or unsigned[2] != end:
            return None
    algorithm_der = raw[(digest if signed_attrs is None else signed_attrs)[2] : algorithm[2]]
    digest_names = _plain_algorithm(raw[sid[2] : digest[2]], False)
    signature_names = _plain_algorithm(algorithm_der, True)
    if digest_names is None or signature_names is None or signature_names[1] == _RSASSA_PSS_OID:
        return None
    if sid[0] == 0x30:
        if raw[sid[1] - 1] == 0x80:
            return None  # asn1crypto would re-encode it (see _PlainSignedData._elements)
        cert_asn1 = index.by_raw(raw[version[2] : sid[2]])
        if cert_asn1 is None:
            return None  # names compared the RFC 5280 way: asn1crypto
    elif sid[0] == 0x80:
        cert_asn1 = index.by_ski(raw[sid[1] : sid[2]])
    else:
        return None
    attrs: _RawAttributes | None = None
    attrs_contents = b""
    if signed_attrs is not None:
        attrs_contents = raw[signed_attrs[1] : signed_attrs[2]]
        if len(attrs_contents) > MAX_SIGNED_ATTRIBUTES_BYTES:
            return None
        attrs = _RawAttributes.read(attrs_contents)
        if attrs is None:
            return None
        if attrs.count > MAX_SIGNED_ATTRIBUTES:
            raise MalformedMessage("signed attributes too large")
    value = raw[signature[1] : signature[2]]
    return _check_signer(
        digest_names[0],
        signature_names[0],
        cert_asn1,
        attrs,
        attrs_contents,
        _signature_algorithm(algorithm_der),
        lambda: value,
        "",
        content=content,
        have_content=have_content,
        content_type_oid=content_type_oid,
        index=index,
        confusion=confusion,
    )


class _RawEncapsulatedContentInfo(core.Sequence):
    """EncapsulatedContentInfo whose eContent stays an OCTET STRING (RFC 5652 section
    5.2) whatever eContentType says; asn1crypto's own class would parse it as the
    named structure, which is wrong for CMS and lets a sender steer our parser."""

    _fields = [
        ("content_type", cms.ContentType),
        ("content", core.ParsableOctetString, {"explicit": 0, "optional": True}),
    ]


def _parse_signed_data(data: bytes) -> cms.SignedData:
    if not data:
        raise MalformedMessage("empty input")
    info = cms.ContentInfo.load(data, strict=True)
    oid = info["content_type"].dotted
    if oid == _SIGNED_DATA_OID:
        signed_data = info["content"]
    elif oid == _WEBDE_SIGNED_DATA_OID:
        # Same length as the right OID: swap the bytes in the outer header and re-parse.
        wrong = core.ObjectIdentifier(_WEBDE_SIGNED_DATA_OID).dump()
        at = data.find(wrong, 0, 16)
        if at < 0:
            raise MalformedMessage("unexpected layout of a web.de SignedData")
        right = core.ObjectIdentifier(_SIGNED_DATA_OID).dump()
        fixed = data[:at] + right + data[at + len(wrong) :]
        signed_data = cms.ContentInfo.load(fixed, strict=True)["content"]
    else:
        raise MalformedMessage(f"not a SignedData (content type {oid})")
    if not isinstance(signed_data, cms.SignedData):
        raise MalformedMessage("SignedData missing")
    # Touch the required fields now, so a broken encoding is reported as malformed.
    signed_data["version"].native  # noqa: B018
    signed_data["encap_content_info"].contents  # noqa: B018
    return signed_data


def _octets(econtent: core.Asn1Value) -> bytes:
    """eContent bytes, never parsed as the structure its content type names (a
    hostile eContentType must not make us parse its payload). BER constructed OCTET
    STRINGs are joined by asn1crypto."""
    if isinstance(econtent, core.ParsableOctetString):
        return bytes(econtent)
    if isinstance(econtent, core.OctetString):
        return econtent.native
    raise MalformedMessage("eContent is not an OCTET STRING")


def _read_certificates(
    signed_data: cms.SignedData, errors: list[str]
) -> tuple[list[asn1_x509.Certificate], list[x509.Certificate]]:
    choices = signed_data["certificates"]
    if isinstance(choices, core.Void):
        return [], []
    if len(choices) > MAX_CERTIFICATES:
        raise MalformedMessage(f"more than {MAX_CERTIFICATES} certificates")
    asn1_certs = []
    certs = []
    for choice in choices:
        if choice.name != "certificate":
            continue  # attribute certificates and others: not used for S/MIME
        cert = _load_certificate(choice.chosen.dump())
        if cert is None:
            errors.append("a certificate in the message could not be read")
            continue
        asn1_certs.append(choice.chosen)
        certs.append(cert)
    return asn1_certs, certs


@functools.lru_cache(maxsize=256)
def _load_certificate(der: bytes) -> x509.Certificate | None:
    """A certificate, or None when ``cryptography`` cannot read it; silences the
    deprecation warning for negative serial numbers (old gpgsm test certificates).
    Cached: correspondents send the same certificates with every message."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            return x509.load_der_x509_certificate(der)
        except (ValueError, x509.InvalidVersion):
            return None


def _read_crls(
    signed_data: cms.SignedData, errors: list[str]
) -> list[x509.CertificateRevocationList]:
    choices = signed_data["crls"]
    if isinstance(choices, core.Void):
        return []
    if len(choices) > MAX_CRLS:
        raise MalformedMessage(f"more than {MAX_CRLS} CRLs")
    out = []
    for choice in choices:
        if choice.name != "crl":
            continue
        try:
            out.append(x509.load_der_x509_crl(choice.chosen.dump()))
        except (ValueError, x509.InvalidVersion):
            errors.append("a CRL in the message could not be read")
    return out


class _CertificateIndex:
    """Certificates of the message by (issuer, serial) and by subjectKeyIdentifier.

    Lookups first compare the issuer Name's DER bytes (what nearly every signer writes:
    a copy of its certificate's issuer); only on a miss are names compared the RFC 5280
    way (asn1crypto's ``hashable``, costly), and the SKI index is built on first use.
    """

    def __init__(self, certificates: Sequence[asn1_x509.Certificate]):
        self._certificates = certificates
        #: by the DER of (issuer, serial) exactly as the certificate has them
        self._by_raw: dict[bytes, asn1_x509.Certificate] = {}
        self._by_issuer_serial: dict[tuple[str, int], asn1_x509.Certificate] | None = None
        self._by_ski: dict[bytes, asn1_x509.Certificate] | None = None
        for cert in certificates:
            try:
                self._by_raw.setdefault(der.issuer_and_serial(bytes(cert.dump())), cert)
            except (MalformedMessage, *_PARSE_ERRORS):
                continue

    def by_raw(self, issuer_and_serial: bytes) -> asn1_x509.Certificate | None:
        """The certificate whose own issuer and serial are exactly these DER bytes."""
        return self._by_raw.get(issuer_and_serial)

    def by_issuer_serial(self, ias: cms.IssuerAndSerialNumber) -> asn1_x509.Certificate | None:
        found = self._by_raw.get(bytes(ias.dump()))
        if found is not None:
            return found
        serial = ias["serial_number"].native
        if self._by_issuer_serial is None:
            self._by_issuer_serial = {}
            for cert in self._certificates:
                try:
                    tbs = cert["tbs_certificate"]
                    key = (tbs["issuer"].hashable, tbs["serial_number"].native)
                    self._by_issuer_serial.setdefault(key, cert)
                except _PARSE_ERRORS:
                    continue
        return self._by_issuer_serial.get((ias["issuer"].hashable, serial))

    def by_ski(self, ski: bytes) -> asn1_x509.Certificate | None:
        if self._by_ski is None:
            self._by_ski = {}
            for cert in self._certificates:
                try:
                    key_id = cert.key_identifier
                    if key_id:
                        self._by_ski.setdefault(key_id, cert)
                    self._by_ski.setdefault(cert.public_key.sha1, cert)  # RFC 5280 4.2.1.2 (1)
                except _PARSE_ERRORS:
                    continue
        return self._by_ski.get(ski)

    def find(self, sid: cms.SignerIdentifier) -> asn1_x509.Certificate | None:
        if sid.name == "issuer_and_serial_number":
            return self.by_issuer_serial(sid.chosen)
        return self.by_ski(sid.chosen.native)


def _verify_signer(
    signer_info: cms.SignerInfo,
    *,
    content: bytes,
    have_content: bool,
    content_type_oid: str,
    index: _CertificateIndex,
    confusion: bool,
) -> SignerInfoResult:
    digest_name = _algorithm_name(signer_info["digest_algorithm"]["algorithm"])
    signature_name = _algorithm_name(signer_info["signature_algorithm"]["algorithm"])
    cert_asn1 = index.find(signer_info["sid"])
    signed_attrs = signer_info["signed_attrs"]
    attrs: _Attrs | None = None
    attrs_contents = b""
    if not isinstance(signed_attrs, core.Void):
        raw = None
        attrs_contents = signed_attrs.contents
        if len(attrs_contents) <= MAX_SIGNED_ATTRIBUTES_BYTES:
            raw = _RawAttributes.read(attrs_contents)
        if raw is not None:
            if raw.count > MAX_SIGNED_ATTRIBUTES:
                raise MalformedMessage("signed attributes too large")
            attrs = raw
        else:  # not plain DER: asn1crypto reads it (and reports what is wrong)
            if len(signed_attrs) > MAX_SIGNED_ATTRIBUTES or (
                len(attrs_contents) > MAX_SIGNED_ATTRIBUTES_BYTES
            ):
                raise MalformedMessage("signed attributes too large")
            attrs = _attributes_by_type(signed_attrs)
    return _check_signer(
        digest_name,
        signature_name,
        cert_asn1,
        attrs,
        attrs_contents,
        signer_info["signature_algorithm"],
        lambda: signer_info["signature"].native,
        _pss_hash(signer_info["signature_algorithm"]),
        content=content,
        have_content=have_content,
        content_type_oid=content_type_oid,
        index=index,
        confusion=confusion,
    )


def _check_signer(
    digest_name: str,
    signature_name: str,
    cert_asn1: asn1_x509.Certificate | None,
    attrs: _Attrs | None,
    attrs_contents: bytes,
    signature_algorithm: algos.SignedDigestAlgorithm,
    signature: Callable[[], bytes],
    pss_hash: str,
    *,
    content: bytes,
    have_content: bool,
    content_type_oid: str,
    index: _CertificateIndex,
    confusion: bool,
) -> SignerInfoResult:
    """The checks of one signer, from its parts (read by asn1crypto or from plain DER)."""
    errors: list[str] = []
    checks: list[Check] = []
    certificate = None
    if cert_asn1 is not None:
        certificate = _load_certificate(cert_asn1.dump())
        if certificate is None:
            errors.append("signer certificate could not be read")

    signing_time = None
    capabilities: tuple[str, ...] = ()
    key_preference = None
    if attrs is not None:
        checks.append(_message_digest_check(attrs, digest_name, content, have_content))
        checks.append(_content_type_check(attrs, content_type_oid))
        signing_time = _signing_time(attrs, errors)
        capabilities = _capabilities(attrs, errors)
        key_preference = _key_preference(attrs, index, errors)
        # The signature covers DER(SET OF attributes): the original bytes under the
        # explicit SET tag, not a re-sorted re-encoding (RFC 5652 section 5.4).
        signed_bytes = _der_header(0x31, len(attrs_contents)) + attrs_contents
    else:
        signed_bytes = content
        if not have_content:
            checks.append(Check("message-digest", Outcome.FAIL, "no content to check"))

    checks.append(
        _signature_check(
            signature_algorithm,
            signature,
            certificate,
            signature_name,
            digest_name,
            signed_bytes,
            errors,
        )
    )
    if confusion:
        checks.append(
            Check(
                "encapsulated-content",
                Outcome.FAIL,
                "the signature carries a different encapsulated content than the signed part",
            )
        )
    hashes_used = {digest_name, signature_hash(signature_name) or "", pss_hash}
    weak = sorted(hashes_used & WEAK_DIGESTS)
    if weak:
        checks.append(Check("digest-strength", Outcome.FAIL, f"weak digest {weak[0]}"))
        errors.append(f"weak digest algorithm {weak[0]}")
    else:
        checks.append(Check("digest-strength", Outcome.PASS, digest_name))
    return SignerInfoResult(
        certificate=certificate,
        digest_algorithm=digest_name,
        signature_algorithm=signature_name,
        checks=tuple(checks),
        signing_time=signing_time,
        capabilities=capabilities,
        encryption_key_preference=key_preference,
        errors=tuple(errors),
    )


def _pss_hash(algorithm: algos.SignedDigestAlgorithm) -> str:
    """The hash inside RSASSA-PSS parameters (SHA-1 when absent, RFC 4055), else ""."""
    if algorithm["algorithm"].dotted != "1.2.840.113549.1.1.10":
        return ""
    try:
        name = algorithm["parameters"]["hash_algorithm"]["algorithm"].native
    except _PARSE_ERRORS:
        return ""
    return name if isinstance(name, str) else ""


def _algorithm_name(oid: core.ObjectIdentifier) -> str:
    native = oid.native
    return native if isinstance(native, str) else oid.dotted


def _attributes_by_type(signed_attrs: cms.CMSAttributes) -> dict[str, list[cms.CMSAttribute]]:
    out: dict[str, list[cms.CMSAttribute]] = {}
    for attr in signed_attrs:
        out.setdefault(attr["type"].dotted, []).append(attr)
    return out


_OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
_OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
_OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
_OID_SMIME_CAPABILITIES = "1.2.840.113549.1.9.15"
_OID_ENCRYPT_KEY_PREF = "1.2.840.113549.1.9.16.2.11"


_Attrs = dict[str, list[cms.CMSAttribute]] | _RawAttributes


def _single_value(
    attrs: _Attrs, oid: str, spec: type[core.Asn1Value] | None = None
) -> core.Asn1Value | None:
    """The one value of a single-valued attribute (RFC 5652 section 11: exactly one
    attribute instance with exactly one value); None if absent, error if repeated.

    From raw attributes the value is parsed as ``spec`` (raw DER without one)."""
    if isinstance(attrs, _RawAttributes):
        instances = attrs.by_oid.get(oid)
        if not instances:
            return None
        if len(instances) != 1 or len(instances[0]) != 1:
            raise _SingleValueRule(f"attribute {oid} must occur once with one value")
        raw = instances[0][0]
        return spec.load(raw) if spec is not None else raw
    found = attrs.get(oid)
    if not found:
        return None
    if len(found) != 1 or len(found[0]["values"]) != 1:
        raise _SingleValueRule(f"attribute {oid} must occur once with one value")
    return found[0]["values"][0]


class _SingleValueRule(Exception):
    """Internal: a signed attribute breaks the single-value rule."""


def _message_digest_check(
    attrs: _Attrs, digest_name: str, content: bytes, have_content: bool
) -> Check:
    name = "message-digest"
    raw_attrs = isinstance(attrs, _RawAttributes)
    try:
        value = _single_value(attrs, _OID_MESSAGE_DIGEST, None if raw_attrs else core.OctetString)
    except _SingleValueRule as e:
        return Check(name, Outcome.FAIL, str(e))
    if value is None:
        return Check(name, Outcome.FAIL, "messageDigest attribute missing")
    expected: object = None
    if raw_attrs:
        # a short primitive OCTET STRING (every digest) read directly, as asn1crypto would
        raw = bytes(value)  # type: ignore[arg-type]
        if len(raw) >= 2 and raw[0] == 0x04 and raw[1] == len(raw) - 2:
            expected = raw[2:]
        else:
            value = core.OctetString.load(raw)
    if not have_content:
        return Check(name, Outcome.FAIL, "no content to check (detached signature)")
    if digest_name not in VERIFY_DIGESTS:
        return Check(name, Outcome.FAIL, f"unsupported digest algorithm {digest_name}")
    if expected is None:
        expected = value.native  # type: ignore[union-attr]
    if not isinstance(expected, bytes):
        return Check(name, Outcome.FAIL, "messageDigest is not an OCTET STRING")
    actual = hashlib.new(digest_name, content).digest()
    if hmac.compare_digest(actual, expected):
        return Check(name, Outcome.PASS, digest_name)
    return Check(name, Outcome.FAIL, "content does not match the signed digest")


def _content_type_check(attrs: _Attrs, econtent_type: str) -> Check:
    name = "content-type"
    raw_attrs = isinstance(attrs, _RawAttributes)
    try:
        value = _single_value(attrs, _OID_CONTENT_TYPE, None if raw_attrs else cms.ContentType)
    except _SingleValueRule as e:
        return Check(name, Outcome.FAIL, str(e))
    if value is None:
        # RFC 5652 section 11.1: MUST be present when there are signed attributes.
        return Check(name, Outcome.FAIL, "contentType attribute missing")
    if raw_attrs:
        if value == der.oid(econtent_type):  # the very encoding of eContentType
            return Check(name, Outcome.PASS, econtent_type)
        value = cms.ContentType.load(value)
    if not isinstance(value, core.ObjectIdentifier):
        return Check(name, Outcome.FAIL, "contentType is not an OID")
    if value.dotted != econtent_type:
        return Check(name, Outcome.FAIL, f"contentType {value.dotted} != eContentType")
    return Check(name, Outcome.PASS, econtent_type)


def _signing_time(attrs: _Attrs, errors: list[str]) -> datetime.datetime | None:
    try:
        if isinstance(attrs, _RawAttributes):
            quick = _plain_utc_time(attrs.by_oid.get(_OID_SIGNING_TIME))
            if quick is not None:
                return quick
        value = _single_value(attrs, _OID_SIGNING_TIME, cms.Time)
        if value is None:
            return None
        native = value.native
    except (_SingleValueRule, *_PARSE_ERRORS):
        errors.append("signingTime attribute unreadable")
        return None
    return native if isinstance(native, datetime.datetime) else None


def _capabilities(attrs: _Attrs, errors: list[str]) -> tuple[str, ...]:
    try:
        value = _single_value(attrs, _OID_SMIME_CAPABILITIES)
        if value is None:
            return ()
        encoded = bytes(value if isinstance(value, bytes) else value.dump())
        if len(encoded) > _CACHED_CAPABILITIES_LIMIT:
            return parse_capabilities(encoded)
        return _parse_capabilities_cached(encoded)
    except (_SingleValueRule, MalformedMessage, *_PARSE_ERRORS):
        errors.append("SMIMECapabilities attribute unreadable")
        return ()


#: A correspondent sends the same capabilities every time: parse each encoding once.
_CACHED_CAPABILITIES_LIMIT = 2048


@functools.lru_cache(maxsize=256)
def _parse_capabilities_cached(encoded: bytes) -> tuple[str, ...]:
    return parse_capabilities(encoded)


def _key_preference(
    attrs: _Attrs, index: _CertificateIndex, errors: list[str]
) -> x509.Certificate | None:
    try:
        value = _single_value(attrs, _OID_ENCRYPT_KEY_PREF)
        if value is None:
            return None
        pref = cms.SMIMEEncryptionKeyPreference.load(
            value if isinstance(value, bytes) else value.dump()
        )
        if pref.name == "issuer_and_serial_number":
            found = index.by_issuer_serial(pref.chosen)
        elif pref.name == "recipientKeyId":
            found = index.by_ski(pref.chosen["subject_key_identifier"].native)
        else:
            found = None
        if found is None:
            errors.append("SMIMEEncryptionKeyPreference names a certificate not in the message")
            return None
        return _load_certificate(found.dump())
    except (_SingleValueRule, *_PARSE_ERRORS):
        errors.append("SMIMEEncryptionKeyPreference attribute unreadable")
        return None


def _signature_check(
    signature_algorithm: algos.SignedDigestAlgorithm,
    signature_value: Callable[[], bytes],
    certificate: x509.Certificate | None,
    signature_name: str,
    digest_name: str,
    signed_bytes: bytes,
    errors: list[str],
) -> Check:
    name = "signature"
    if certificate is None:
        return Check(name, Outcome.FAIL, "signer certificate not found")
    try:
        public = certificate.public_key()
    except (ValueError, TypeError, CryptographyUnsupported):
        return Check(name, Outcome.FAIL, "signer public key unusable")
    signature = signature_value()
    try:
        verify_signature(public, signature_algorithm, digest_name, signature, signed_bytes)
    except InvalidSignature:
        return Check(name, Outcome.FAIL, "signature does not match")
    except UnsupportedAlgorithm as e:
        errors.append(str(e))
        return Check(name, Outcome.FAIL, str(e))
    except _PARSE_ERRORS:
        return Check(name, Outcome.FAIL, "signature or its parameters are malformed")
    return Check(name, Outcome.PASS, signature_name)
