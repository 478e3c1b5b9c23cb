"""How the content-encryption key reaches each recipient: CMS RecipientInfos.

Builds and reads KeyTransRecipientInfo (RSA PKCS#1 v1.5 and RSAES-OAEP, RFC 5652
section 6.2.1, RFC 3560) and, through :mod:`smimeproxy.smime.kari`, KeyAgreeRecipientInfo;
names recipients by issuer and serial number or subject key identifier and matches those
names against the certificates of the keys we hold.

Not guaranteed: KEK, password and other RecipientInfo kinds are neither built nor read;
an OAEP label or different OAEP and MGF1 hashes are refused (the
:class:`~smimeproxy.smime.keys.PrivateKey` interface takes one hash for both).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from asn1crypto import algos, cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519

from smimeproxy.errors import DecryptionFailed, MalformedMessage, UnsupportedAlgorithm
from smimeproxy.smime import der, kari
from smimeproxy.smime.keys import KeyPair, hash_algorithm

#: Refuse messages naming more recipients than this (hostile input bound).
MAX_RECIPIENTS = 1000


@dataclass(frozen=True)
class Recipient:
    """A recipient certificate and how to encrypt the key for it.

    ``oaep`` selects RSAES-OAEP (RFC 3560) with ``oaep_hash`` for digest and MGF1;
    ``use_subject_key_identifier`` names the recipient by SKI instead of issuer and
    serial; ``hkdf`` uses RFC 8418's HKDF for an X25519 recipient (OpenSSL 3.0 cannot
    read that). EC and X25519 certificates always get key agreement.
    """

    certificate: x509.Certificate
    oaep: bool = False
    oaep_hash: str = "sha256"
    use_subject_key_identifier: bool = False
    hkdf: bool = False


@dataclass(frozen=True)
class RecipientIdentifier:
    """Who one RecipientInfo (or RecipientEncryptedKey) is for; no key material."""

    kind: str  # "key_transport" or "key_agreement"
    issuer: str | None = None  # human-readable issuer name
    issuer_der: bytes | None = None
    serial_number: int | None = None
    subject_key_identifier: bytes | None = None

    def matches(self, certificate: x509.Certificate) -> bool:
        """Whether ``certificate`` is the one this identifier names."""
        return CertificateId.of(certificate).matches(self)

    def __str__(self) -> str:
        if self.subject_key_identifier is not None:
            return f"ski={self.subject_key_identifier.hex()}"
        return f"issuer={self.issuer!r} serial={self.serial_number:x}"


@dataclass(frozen=True)
class CertificateId:
    """What a certificate can be named by in a RecipientIdentifier."""

    issuer: asn1_x509.Name
    serial_number: int
    ski: bytes | None
    #: the issuer Name's DER as the certificate has it: equal bytes are an equal name,
    #: which spares the costly RFC 4518 comparison in the common case
    issuer_der: bytes | None = field(default=None, compare=False)

    @classmethod
    def of(cls, certificate: x509.Certificate) -> CertificateId:
        """Cached per certificate (a key's certificate is asked for every message); the
        same certificate object is found by identity, without hashing its DER."""
        hit = _ids_by_object.get(id(certificate))
        if hit is not None and hit[0] is certificate:
            return hit[1]
        found = _certificate_id(certificate)
        if len(_ids_by_object) >= 256:
            _ids_by_object.clear()
        _ids_by_object[id(certificate)] = (certificate, found)
        return found

    @classmethod
    def _build(cls, certificate: x509.Certificate) -> CertificateId:
        tbs = asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))
        ski: bytes | None = None
        try:
            ski = certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value.digest
        except (x509.ExtensionNotFound, ValueError):  # absent, or unparsable extensions
            try:  # RFC 5280 section 4.2.1.2 method (1)
                ski = x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest
            except (TypeError, ValueError):
                ski = None
        issuer = tbs["tbs_certificate"]["issuer"]
        return cls(issuer, certificate.serial_number, ski, bytes(issuer.dump()))

    def matches(self, rid: RecipientIdentifier) -> bool:
        if rid.subject_key_identifier is not None:
            return self.ski is not None and hmac.compare_digest(
                self.ski, rid.subject_key_identifier
            )
        if rid.serial_number != self.serial_number or rid.issuer_der is None:
            return False
        if self.issuer_der is not None and rid.issuer_der == self.issuer_der:
            return True
        try:
            return bool(asn1_x509.Name.load(rid.issuer_der) == self.issuer)
        except (ValueError, TypeError, KeyError):
            return False


#: id(certificate) -> (that certificate, its CertificateId); the entry keeps the object
#: alive, so its id cannot be reused while the entry exists
_ids_by_object: dict[int, tuple[x509.Certificate, CertificateId]] = {}


@lru_cache(maxsize=256)
def _certificate_id(certificate: x509.Certificate) -> CertificateId:
    return CertificateId._build(certificate)


def _issuer_serial_id(kind: str, value: cms.IssuerAndSerialNumber) -> RecipientIdentifier:
    issuer_der = bytes(value["issuer"].dump())
    return RecipientIdentifier(
        kind,
        issuer=_human_name(issuer_der),
        issuer_der=issuer_der,
        serial_number=value["serial_number"].native,
    )


@lru_cache(maxsize=256)
def _human_name(issuer_der: bytes) -> str:
    """A Name for people; cached (asn1crypto's rendering costs more than an RSA
    decryption, and the same few issuers come back in every message)."""
    try:
        return str(asn1_x509.Name.load(issuer_der).human_friendly)
    except (ValueError, TypeError, KeyError):
        return "(unreadable name)"


def _ktri_id(ktri: cms.KeyTransRecipientInfo) -> RecipientIdentifier:
    rid = ktri["rid"]
    if rid.name == "subject_key_identifier":
        return RecipientIdentifier("key_transport", subject_key_identifier=rid.chosen.native)
    return _issuer_serial_id("key_transport", rid.chosen)


def _kari_id(rek: cms.RecipientEncryptedKey) -> RecipientIdentifier:
    rid = rek["rid"]
    if rid.name == "r_key_id":
        ski = rid.chosen["subject_key_identifier"].native
        return RecipientIdentifier("key_agreement", subject_key_identifier=ski)
    return _issuer_serial_id("key_agreement", rid.chosen)


@dataclass(frozen=True)
class RecipientEntry:
    """One recipient of a message: a KTRI, or one RecipientEncryptedKey of a KARI."""

    identifier: RecipientIdentifier
    info: cms.KeyTransRecipientInfo | cms.KeyAgreeRecipientInfo
    encrypted_key: cms.RecipientEncryptedKey | None = None  # KARI only

    @property
    def key_transport(self) -> bool:
        return self.encrypted_key is None


def identified_recipients(infos: cms.RecipientInfos) -> Iterator[RecipientEntry]:
    """Every KTRI and every KARI RecipientEncryptedKey, with its identifier."""
    count = 0
    for info in infos:
        if info.name == "ktri":
            count += 1
            yield RecipientEntry(_ktri_id(info.chosen), info.chosen)
        elif info.name == "kari":
            for rek in info.chosen["recipient_encrypted_keys"]:
                count += 1
                if count > MAX_RECIPIENTS:
                    raise MalformedMessage(f"more than {MAX_RECIPIENTS} recipients")
                yield RecipientEntry(_kari_id(rek), info.chosen, rek)


def _issuer_and_serial(certificate: x509.Certificate) -> cms.IssuerAndSerialNumber:
    tbs = asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))
    return cms.IssuerAndSerialNumber(
        {
            "issuer": tbs["tbs_certificate"]["issuer"],
            "serial_number": certificate.serial_number,
        }
    )


def _ski(certificate: x509.Certificate) -> bytes:
    ski = CertificateId.of(certificate).ski
    if ski is None:
        raise UnsupportedAlgorithm("cannot compute a subject key identifier for this key")
    return ski


def recipient_info(recipient: Recipient, cek: bytes, wrap: str) -> cms.RecipientInfo:
    cert = recipient.certificate
    public_key = cert.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        if recipient.oaep:
            h = hash_algorithm(recipient.oaep_hash)
            encrypted_key = public_key.encrypt(
                cek, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)
            )
            digest = {"algorithm": recipient.oaep_hash}
            algorithm = cms.KeyEncryptionAlgorithm(
                {
                    "algorithm": "rsaes_oaep",
                    "parameters": algos.RSAESOAEPParams(
                        {
                            "hash_algorithm": digest,
                            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": digest},
                        }
                    ),
                }
            )
        else:
            encrypted_key = public_key.encrypt(cek, padding.PKCS1v15())
            algorithm = cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15"})
        if recipient.use_subject_key_identifier:  # RFC 5652 section 6.2.1: version 2
            version, rid = (
                "v2",
                cms.RecipientIdentifier(name="subject_key_identifier", value=_ski(cert)),
            )
        else:
            version, rid = (
                "v0",
                cms.RecipientIdentifier(
                    name="issuer_and_serial_number", value=_issuer_and_serial(cert)
                ),
            )
        return cms.RecipientInfo(
            name="ktri",
            value=cms.KeyTransRecipientInfo(
                {
                    "version": version,
                    "rid": rid,
                    "key_encryption_algorithm": algorithm,
                    "encrypted_key": encrypted_key,
                }
            ),
        )
    if isinstance(public_key, ec.EllipticCurvePublicKey | x25519.X25519PublicKey):
        originator, algorithm, encrypted_key = kari.wrap_for(
            public_key, cek, wrap=wrap, hkdf=recipient.hkdf
        )
        if recipient.use_subject_key_identifier:
            key_rid = cms.KeyAgreementRecipientIdentifier(
                name="r_key_id", value={"subject_key_identifier": _ski(cert)}
            )
        else:
            key_rid = cms.KeyAgreementRecipientIdentifier(
                name="issuer_and_serial_number", value=_issuer_and_serial(cert)
            )
        return cms.RecipientInfo(
            name="kari",
            value=cms.KeyAgreeRecipientInfo(
                {
                    "version": "v3",  # RFC 5652 section 6.2.2: always 3
                    "originator": originator,
                    "key_encryption_algorithm": algorithm,
                    "recipient_encrypted_keys": [{"rid": key_rid, "encrypted_key": encrypted_key}],
                }
            ),
        )
    raise UnsupportedAlgorithm(f"cannot encrypt to a {type(public_key).__name__} certificate")


def recipient_info_der(recipient: Recipient, cek: bytes, wrap: str) -> tuple[bytes, bool]:
    """The DER RecipientInfo for ``recipient`` and whether it is a version 0 KTRI.

    Same structure as :func:`recipient_info`, but an RSA key transport recipient is
    written as DER directly (the fixed parts cached): building it from asn1crypto
    objects costs more than the RSA encryption. Key agreement goes through
    :func:`recipient_info`.
    """
    cert = recipient.certificate
    public_key = cert.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        info = recipient_info(recipient, cek, wrap)
        return bytes(info.dump()), False
    if recipient.oaep:
        h = hash_algorithm(recipient.oaep_hash)
        encrypted_key = public_key.encrypt(
            cek, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)
        )
    else:
        encrypted_key = public_key.encrypt(cek, padding.PKCS1v15())
    algorithm = _key_transport_algorithm_der(recipient.oaep, recipient.oaep_hash)
    if recipient.use_subject_key_identifier:  # RFC 5652 section 6.2.1: version 2
        version, rid = b"\x02\x01\x02", der.tlv(0x80, _ski(cert))  # [0] IMPLICIT
    else:
        cert_der = cert.public_bytes(serialization.Encoding.DER)
        version, rid = b"\x02\x01\x00", der.issuer_and_serial(cert_der)
    ktri = der.sequence(version, rid, algorithm, der.tlv(0x04, encrypted_key))
    return ktri, not recipient.use_subject_key_identifier


@lru_cache(maxsize=16)
def _key_transport_algorithm_der(oaep: bool, oaep_hash: str) -> bytes:
    if not oaep:
        return bytes(cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15"}).dump())
    digest = {"algorithm": oaep_hash}
    algorithm = cms.KeyEncryptionAlgorithm(
        {
            "algorithm": "rsaes_oaep",
            "parameters": algos.RSAESOAEPParams(
                {
                    "hash_algorithm": digest,
                    "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": digest},
                }
            ),
        }
    )
    return bytes(algorithm.dump())


def _oaep_hash(algorithm: cms.KeyEncryptionAlgorithm) -> str:
    params = algorithm["parameters"]
    digest = params["hash_algorithm"]["algorithm"].native
    mgf = params["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1":
        raise UnsupportedAlgorithm("RSAES-OAEP with a mask generation other than MGF1")
    if mgf["parameters"]["algorithm"].native != digest:
        raise UnsupportedAlgorithm("RSAES-OAEP with different OAEP and MGF1 hashes")
    if params["p_source_algorithm"]["parameters"].native not in (b"", None):
        raise UnsupportedAlgorithm("RSAES-OAEP with a label")
    hash_algorithm(digest)  # raises UnsupportedAlgorithm for an unknown hash
    return str(digest)


def unwrap_key_transport(ktri: cms.KeyTransRecipientInfo, pair: KeyPair, key_size: int) -> bytes:
    algorithm = ktri["key_encryption_algorithm"]
    name = algorithm["algorithm"].native
    encrypted_key = ktri["encrypted_key"].native
    if name == "rsaes_oaep":
        try:
            cek = pair.key.decrypt(encrypted_key, oaep_hash=_oaep_hash(algorithm))
        except UnsupportedAlgorithm:
            raise
        except Exception:  # any key back end: a failed unwrap is a failed decryption
            raise DecryptionFailed("decryption failed") from None
        if len(cek) != key_size:
            raise DecryptionFailed("decryption failed")
        return cek
    if name != "rsaes_pkcs1v15":
        raise UnsupportedAlgorithm(f"unsupported key transport algorithm {name}")
    return unwrap_pkcs1v15(encrypted_key, pair, key_size)


def unwrap_pkcs1v15(encrypted_key: bytes, pair: KeyPair, key_size: int) -> bytes:
    """The content key from an RSAES-PKCS1-v1_5 ``encryptedKey``; never fails."""
    # RFC 3218 section 2.3.2: on any PKCS#1 v1.5 failure continue with a random key,
    # so a padding failure looks exactly like a wrong key or damaged content.
    random_cek = os.urandom(key_size)
    try:
        cek = pair.key.decrypt(encrypted_key, oaep_hash=None)
    except Exception:
        cek = random_cek
    return cek if len(cek) == key_size else random_cek


#: rsaEncryption as a KeyEncryptionAlgorithm (RFC 3370 section 4.2.1), with NULL
#: parameters and without: the encodings a KTRI for PKCS#1 v1.5 carries.
_PKCS1V15_ALGORITHMS = (
    bytes.fromhex("300d06092a864886f70d0101010500"),
    bytes.fromhex("300b06092a864886f70d010101"),
)


def plain_key_transports(infos: bytes) -> list[tuple[RecipientIdentifier, bytes]] | None:
    """(identifier, encryptedKey) of every recipient of a DER RecipientInfos SET made
    only of RSA PKCS#1 v1.5 KeyTransRecipientInfos, read without asn1crypto (which costs
    a third of an RSA decryption here); None for anything else (key agreement, OAEP,
    BER, an empty or oversized set), which then takes the full asn1crypto path."""
    top = der.element_at(infos, 0, len(infos))
    if top is None or top[0] != 0x31 or top[2] != len(infos):
        return None
    out: list[tuple[RecipientIdentifier, bytes]] = []
    pos, end = top[1], top[2]
    while pos < end:
        ktri = der.element_at(infos, pos, end)
        if ktri is None or ktri[0] != 0x30:
            return None
        _, body, stop = ktri
        version = der.element_at(infos, body, stop)
        if version is None or version[0] != 0x02 or version[1] == version[2]:
            return None
        rid = der.element_at(infos, version[2], stop)
        if rid is None or rid[0] not in (0x30, 0x80):
            return None
        algorithm = der.element_at(infos, rid[2], stop)
        if algorithm is None or infos[rid[2] : algorithm[2]] not in _PKCS1V15_ALGORITHMS:
            return None
        key = der.element_at(infos, algorithm[2], stop)
        if key is None or key[0] != 0x04 or key[2] != stop:
            return None
        identifier = _plain_rid(infos[version[2] : rid[2]])
        if identifier is None or len(out) >= MAX_RECIPIENTS:
            return None
        out.append((identifier, infos[key[1] : key[2]]))
        pos = stop
    return out or None


@lru_cache(maxsize=256)
def _plain_rid(rid: bytes) -> RecipientIdentifier | None:
    """The identifier of a KTRI's DER ``rid``, as :func:`_ktri_id` reads it; cached (the
    same recipients come back in every message)."""
    if rid[0] == 0x80:  # [0] IMPLICIT SubjectKeyIdentifier
        head = der.element_at(rid, 0, len(rid))
        if head is None:
            return None
        return RecipientIdentifier("key_transport", subject_key_identifier=rid[head[1] :])
    top = der.element_at(rid, 0, len(rid))
    if top is None:
        return None
    issuer = der.element_at(rid, top[1], top[2])
    if issuer is None or issuer[0] != 0x30 or rid[issuer[1] - 1] == 0x80:
        return None  # a length ending in 0x80: asn1crypto re-encodes the Name on dump()
    serial = der.element_at(rid, issuer[2], top[2])
    if serial is None or serial[0] != 0x02 or serial[2] != top[2] or serial[1] == serial[2]:
        return None
    issuer_der = rid[top[1] : issuer[2]]
    return RecipientIdentifier(
        "key_transport",
        issuer=_human_name(issuer_der),
        issuer_der=issuer_der,
        serial_number=int.from_bytes(rid[serial[1] : serial[2]], "big", signed=True),
    )


def key_algorithm_name(entry: RecipientEntry) -> str:
    """``rsaes_pkcs1v15``, ``rsaes_oaep`` or the key agreement scheme's name."""
    algorithm = entry.info["key_encryption_algorithm"]["algorithm"]
    if entry.key_transport:
        return str(algorithm.native)
    oid = algorithm.dotted
    return kari.KEY_AGREEMENT_SCHEMES.get(oid, (oid,))[0]
