"""CMS EnvelopedData (RFC 5652 section 6) and AuthEnvelopedData (RFC 5083/5084).

Build and open the encrypted CMS layer of S/MIME, below MIME: bytes in, DER out, and on
the way back the content plus how it was protected. Key transport is RSA PKCS#1 v1.5
or RSAES-OAEP (RFC 3560; :mod:`smimeproxy.smime.keywrap` builds and reads the
RecipientInfos); key agreement is ephemeral-static ECDH or X25519 (see
:mod:`smimeproxy.smime.kari`). Private-key operations go through
:class:`smimeproxy.smime.keys.PrivateKey`, so a key in an HSM serves as well.

The outer layers are walked by a small BER reader over a ``memoryview`` of the input,
so a 10 MB message is not copied once per nesting level; only the small parts
(RecipientInfos, algorithm identifiers) are handed to ``asn1crypto``.

Not guaranteed:

* AES-CBC content (EnvelopedData) is **not integrity protected**: a flipped ciphertext
  bit gives either :class:`DecryptionFailed` or silently altered plaintext.
  :attr:`DecryptedData.integrity_protected` says so, and only a signature inside can
  make up for it.
* PKCS#1 v1.5 key transport uses implicit rejection (RFC 3218 section 2.3.2): a bad
  unwrap continues with a random key, so with CBC there is a 1 in ~256 chance that a
  message for a *wrong* key "decrypts" to garbage rather than failing.
* KEKRecipientInfo, PasswordRecipientInfo and OtherRecipientInfo are skipped, and
  detached encrypted content (no ``encryptedContent``) is refused.
* Work is bounded (at most 1000 recipients, 16 content decryptions per message, 32
  levels of BER nesting, 10^6 BER elements), but the input size is the caller's to
  limit. Decryption holds about twice the content size besides the input.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice

from asn1crypto import algos, cms, core
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import (
    AEADEncryptionContext,
    Cipher,
    CipherContext,
    algorithms,
    modes,
)

try:  # 3DES (RFC 3370 section 5.1), for old mail only; "decrepit" since cryptography 43
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - cryptography 42
    from cryptography.hazmat.primitives.ciphers.algorithms import (  # type: ignore[assignment,unused-ignore]
        TripleDES,
    )

from smimeproxy.errors import (
    DecryptionFailed,
    KeyNotFound,
    MalformedMessage,
    SMIMEProxyError,
    UnsupportedAlgorithm,
)
from smimeproxy.smime import der, kari
from smimeproxy.smime.keys import KeyPair
from smimeproxy.smime.keywrap import (
    MAX_RECIPIENTS,
    CertificateId,
    Recipient,
    RecipientEntry,
    RecipientIdentifier,
    identified_recipients,
    key_algorithm_name,
    plain_key_transports,
    recipient_info_der,
    unwrap_key_transport,
    unwrap_pkcs1v15,
)
from smimeproxy.smime.status import DecryptionStatus

#: Ciphers we encrypt with (asn1crypto names). CBC goes into EnvelopedData (RFC 3565),
#: GCM into AuthEnvelopedData (RFC 5084).
CIPHERS = ("aes256_cbc", "aes128_cbc", "aes256_gcm", "aes128_gcm")

#: Ciphers we decrypt: name -> (key length, mode). des-ede3-cbc (RFC 3370 section 5.1)
#: only for old mail; AES-192 for completeness (RFC 3565, RFC 5084).
_DECRYPT_CIPHERS: dict[str, tuple[int, str]] = {
    "aes128_cbc": (16, "cbc"),
    "aes192_cbc": (24, "cbc"),
    "aes256_cbc": (32, "cbc"),
    "tripledes_3key": (24, "cbc"),
    "aes128_gcm": (16, "gcm"),
    "aes192_gcm": (24, "gcm"),
    "aes256_gcm": (32, "gcm"),
}

#: Content types, RFC 5652 section 6.1 and RFC 5083 section 1.
_ENVELOPED = "1.2.840.113549.1.7.3"
_AUTH_ENVELOPED = "1.2.840.113549.1.9.16.1.23"
_CONTENT_TYPES = {_ENVELOPED: "enveloped_data", _AUTH_ENVELOPED: "authenticated_enveloped_data"}

#: RFC 5084 section 3.2: 12-octet nonce recommended, ICV lengths 12..16.
_GCM_NONCE_SIZE = 12
_GCM_ICV_SIZE = 16

#: Bounds for hostile input.
_MAX_ATTEMPTS = 16  # content decryptions tried for one message (each costs a full pass)
_MAX_DEPTH = 32
_MAX_NODES = 1_000_000

# RFC 8551 section 2.7: receivers MUST support AES-128-GCM, so any GCM capability
# implies it.
_GCM_CAPABILITIES = ("aes256_gcm", "aes128_gcm", "aes192_gcm")


class _GCMParameters(core.Sequence):  # type: ignore[misc]
    """``GCMParameters``, RFC 5084 section 3.2."""

    _fields = [
        ("nonce", core.OctetString),
        ("icv_len", core.Integer, {"default": 12}),
    ]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DecryptedData:
    """The opened content and how it was protected."""

    content: bytes
    content_type: str  # "enveloped_data" or "authenticated_enveloped_data"
    inner_content_type: str  # "data" for S/MIME
    cipher: str
    key_algorithm: str
    recipient: KeyPair
    integrity_protected: bool  # True only for AEAD content

    def status(self) -> DecryptionStatus:
        """The shared status object for this decryption."""
        return DecryptionStatus(
            decrypted=True,
            content_type=self.content_type,
            cipher=self.cipher,
            key_algorithm=self.key_algorithm,
            recipient=self.recipient.certificate,
            integrity_protected=self.integrity_protected,
        )


# --------------------------------------------------------------------------- BER walk


@dataclass(frozen=True, slots=True)
class _Node:
    cls: int  # 0 universal, 1 application, 2 context, 3 private
    constructed: bool
    number: int
    start: int
    body: int
    body_end: int
    end: int


class _BER:
    """Reads BER/DER tag-length-value headers from a memoryview, without copying."""

    def __init__(self, data: bytes | bytearray | memoryview):
        self.mv = memoryview(data).cast("B")
        self._budget = _MAX_NODES
        self._ends: dict[int, int] = {}

    def node(self, pos: int, limit: int, depth: int = 0) -> _Node:
        self._budget -= 1
        if self._budget < 0:
            raise MalformedMessage("CMS structure has too many elements")
        if depth > _MAX_DEPTH:
            raise MalformedMessage("CMS structure is nested too deeply")
        mv = self.mv
        if pos + 2 > limit:
            raise MalformedMessage("truncated CMS structure")
        first = mv[pos]
        p = pos + 1
        number = first & 0x1F
        if number == 0x1F:
            number = 0
            for _ in range(4):
                if p >= limit:
                    raise MalformedMessage("truncated CMS structure")
                octet = mv[p]
                p += 1
                number = (number << 7) | (octet & 0x7F)
                if not octet & 0x80:
                    break
            else:
                raise MalformedMessage("ASN.1 tag number too large")
        if p >= limit:
            raise MalformedMessage("truncated CMS structure")
        constructed = bool(first & 0x20)
        length_octet = mv[p]
        p += 1
        if length_octet == 0x80:  # indefinite length: walk to the end-of-contents
            if not constructed:
                raise MalformedMessage("indefinite length on a primitive ASN.1 value")
            q = self._ends.get(p)
            if q is None:
                q = p
                while True:
                    if q + 2 > limit:
                        raise MalformedMessage("truncated CMS structure (no end-of-contents)")
                    if mv[q] == 0 and mv[q + 1] == 0:
                        break
                    q = self.node(q, limit, depth + 1).end
                self._ends[p] = q
            return _Node(first >> 6, constructed, number, pos, p, q, q + 2)
        if length_octet < 0x80:
            length = length_octet
        else:
            n = length_octet & 0x7F
            if n > 4 or p + n > limit:
                raise MalformedMessage("bad or truncated ASN.1 length")
            length = int.from_bytes(mv[p : p + n], "big")
            p += n
        if p + length > limit:
            raise MalformedMessage("truncated CMS structure")
        return _Node(first >> 6, constructed, number, pos, p, p + length, p + length)

    def children(self, node: _Node, depth: int = 1) -> Iterator[_Node]:
        pos = node.body
        while pos < node.body_end:
            child = self.node(pos, node.body_end, depth)
            yield child
            pos = child.end

    def raw(self, node: _Node) -> bytes:
        return bytes(self.mv[node.start : node.end])

    def octets(self, node: _Node, depth: int = 1) -> list[memoryview]:
        """The pieces of an OCTET STRING (primitive, or BER constructed of pieces)."""
        if not node.constructed:
            return [self.mv[node.body : node.body_end]]
        pieces: list[memoryview] = []
        for child in self.children(node, depth):
            if child.cls != 0 or child.number != 4:
                raise MalformedMessage("constructed OCTET STRING holds a non-OCTET STRING")
            pieces.extend(self.octets(child, depth + 1))
        return pieces


def _expect(node: _Node | None, cls: int, number: int, what: str) -> _Node:
    if node is None or node.cls != cls or node.number != number:
        raise MalformedMessage(f"malformed CMS: expected {what}")
    return node


def _oid(reader: _BER, node: _Node) -> str:
    _expect(node, 0, 6, "an OBJECT IDENTIFIER")
    return _dotted(reader.raw(node))


@lru_cache(maxsize=256)
def _dotted(encoded: bytes) -> str:
    return str(core.ObjectIdentifier.load(encoded).dotted)


@dataclass
class _Envelope:
    content_type: str
    recipient_infos: bytes
    inner_type: str
    algorithm: bytes
    chunks: list[memoryview]
    aad: bytes | None
    mac: bytes | None


def _parse_envelope(data: bytes | bytearray | memoryview) -> _Envelope:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage("CMS input must be bytes")
    if isinstance(data, bytes):
        plain = _plain_envelope(data)
        if plain is not None:
            return plain
    reader = _BER(data)
    top = _expect(reader.node(0, len(reader.mv)), 0, 16, "a ContentInfo SEQUENCE")
    parts = list(islice(reader.children(top), 2))
    if len(parts) != 2:
        raise MalformedMessage("malformed CMS: ContentInfo needs a type and content")
    oid = _oid(reader, parts[0])
    if oid not in _CONTENT_TYPES:
        name = cms.ContentType._map.get(oid, oid)
        raise MalformedMessage(f"not EnvelopedData or AuthEnvelopedData but {name}")
    content_type = _CONTENT_TYPES[oid]
    explicit = _expect(parts[1], 2, 0, "[0] content")
    env = _expect(next(reader.children(explicit), None), 0, 16, "an EnvelopedData SEQUENCE")
    fields = list(islice(reader.children(env, 2), 8))
    i = 1  # fields[0] is the version: we accept any (RFC 5652 section 6.1 says be liberal)
    _expect(fields[0] if fields else None, 0, 2, "the version INTEGER")
    if i < len(fields) and fields[i].cls == 2 and fields[i].number == 0:
        i += 1  # originatorInfo: certificates and CRLs, not needed to decrypt
    ris = _expect(fields[i] if i < len(fields) else None, 0, 17, "RecipientInfos SET")
    eci = _expect(fields[i + 1] if i + 1 < len(fields) else None, 0, 16, "EncryptedContentInfo")
    rest = fields[i + 2 :]
    aad = mac = None
    if content_type == "authenticated_enveloped_data":
        if rest and rest[0].cls == 2 and rest[0].number == 1:  # authAttrs, RFC 5083 2.1
            # the AAD is their DER with an EXPLICIT SET OF tag (RFC 5083 section 2.2)
            aad = b"\x31" + reader.raw(rest[0])[1:]
            rest = rest[1:]
        mac_node = _expect(rest[0] if rest else None, 0, 4, "the mac OCTET STRING")
        mac = b"".join(bytes(p) for p in reader.octets(mac_node))
    eci_fields = list(islice(reader.children(eci, 3), 3))
    if len(eci_fields) < 2:
        raise MalformedMessage("malformed CMS: EncryptedContentInfo is incomplete")
    inner_oid = _oid(reader, eci_fields[0])
    algorithm = _expect(eci_fields[1], 0, 16, "a content encryption AlgorithmIdentifier")
    if len(eci_fields) < 3:
        raise MalformedMessage("detached encrypted content is not supported")
    encrypted = _expect(eci_fields[2], 2, 0, "[0] encryptedContent")
    return _Envelope(
        content_type=content_type,
        recipient_infos=reader.raw(ris),
        inner_type=cms.ContentType._map.get(inner_oid, inner_oid),
        algorithm=reader.raw(algorithm),
        chunks=reader.octets(encrypted),
        aad=aad,
        mac=mac,
    )


def _plain_envelope(data: bytes) -> _Envelope | None:
    """:func:`_parse_envelope` of a plain DER EnvelopedData (primitive encryptedContent),
    read with :func:`der.element_at` instead of the BER walker; None for anything else
    (BER, AuthEnvelopedData, constructed content, odd tags), which the walker reads."""
    at = der.element_at
    top = at(data, 0, len(data))
    if top is None or top[0] != 0x30:
        return None
    oid = at(data, top[1], top[2])
    if oid is None or oid[0] != 0x06:
        return None
    if _dotted(data[top[1] : oid[2]]) != _ENVELOPED:
        return None
    explicit = at(data, oid[2], top[2])
    if explicit is None or explicit[0] != 0xA0:
        return None
    env = at(data, explicit[1], explicit[2])
    if env is None or env[0] != 0x30:
        return None
    fields: list[tuple[int, int, int]] = []
    starts: list[int] = []
    pos = env[1]
    while pos < env[2] and len(fields) < 8:
        element = at(data, pos, env[2])
        if element is None:
            return None
        fields.append(element)
        starts.append(pos)
        pos = element[2]
    if not fields or fields[0][0] != 0x02:
        return None
    i = 2 if len(fields) > 1 and fields[1][0] == 0xA0 else 1  # originatorInfo
    if i + 1 >= len(fields) or fields[i][0] != 0x31 or fields[i + 1][0] != 0x30:
        return None
    eci = fields[i + 1]
    inner = at(data, eci[1], eci[2])
    if inner is None or inner[0] != 0x06:
        return None
    algorithm = at(data, inner[2], eci[2])
    if algorithm is None or algorithm[0] != 0x30:
        return None
    encrypted = at(data, algorithm[2], eci[2])
    if encrypted is None or encrypted[0] != 0x80:
        return None
    inner_oid = _dotted(data[eci[1] : inner[2]])
    return _Envelope(
        content_type="enveloped_data",
        recipient_infos=data[starts[i] : fields[i][2]],
        inner_type=cms.ContentType._map.get(inner_oid, inner_oid),
        algorithm=data[inner[2] : algorithm[2]],
        chunks=[memoryview(data)[encrypted[1] : encrypted[2]]],
        aad=None,
        mac=None,
    )


# --------------------------------------------------------------------------- identifiers


def _recipient_infos(envelope: _Envelope) -> cms.RecipientInfos:
    reader = _BER(envelope.recipient_infos)
    top = reader.node(0, len(reader.mv))
    if sum(1 for _ in islice(reader.children(top), MAX_RECIPIENTS + 1)) > MAX_RECIPIENTS:
        raise MalformedMessage(f"more than {MAX_RECIPIENTS} recipients")
    infos = cms.RecipientInfos.load(envelope.recipient_infos)
    if len(infos) == 0:
        raise MalformedMessage("malformed CMS: no RecipientInfo")
    return infos


_ASN1_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError)


def recipient_identifiers(data: bytes) -> list[RecipientIdentifier]:
    """The recipients an EnvelopedData / AuthEnvelopedData names, for a key-store lookup.

    Only key transport and key agreement recipients are listed (KEK, password and other
    recipient infos cannot name a certificate).
    """
    try:
        infos = _recipient_infos(_parse_envelope(data))
        return [entry.identifier for entry in identified_recipients(infos)]
    except SMIMEProxyError:
        raise
    except _ASN1_ERRORS as e:
        raise MalformedMessage(
            f"malformed CMS recipient information ({type(e).__name__})"
        ) from None


# --------------------------------------------------------------------------- content


def _block_cipher(name: str, key: bytes) -> algorithms.AES | TripleDES:
    return TripleDES(key) if name == "tripledes_3key" else algorithms.AES(key)


def _content_spec(algorithm_der: bytes, content_type: str) -> tuple[str, int, str, bytes, int]:
    """(cipher name, key length, mode, IV or nonce, ICV length) of the content."""
    if content_type == "enveloped_data":
        quick = _plain_cbc_spec(algorithm_der)
        if quick is not None:
            return quick
    algorithm = algos.EncryptionAlgorithm.load(algorithm_der)
    oid = algorithm["algorithm"].dotted
    name = algos.EncryptionAlgorithmId._map.get(oid, oid)
    if name not in _DECRYPT_CIPHERS:
        raise UnsupportedAlgorithm(f"unsupported content encryption algorithm {name}")
    key_size, mode = _DECRYPT_CIPHERS[name]
    if (mode == "gcm") != (content_type == "authenticated_enveloped_data"):
        raise UnsupportedAlgorithm(f"{name} does not belong in {content_type}")
    if mode == "cbc":
        iv = algorithm["parameters"].native
        block = 8 if name == "tripledes_3key" else 16
        if not isinstance(iv, bytes) or len(iv) != block:
            raise MalformedMessage("content encryption IV missing or of the wrong length")
        return name, key_size, mode, iv, 0
    params = algorithm["parameters"]
    if isinstance(params, core.Void):
        raise MalformedMessage("GCM parameters missing")
    gcm = params.parse(_GCMParameters)
    nonce, icv_len = gcm["nonce"].native, gcm["icv_len"].native
    if not 8 <= len(nonce) <= 64 or not 12 <= icv_len <= 16:  # RFC 5084 section 3.2
        raise MalformedMessage("GCM nonce or ICV length out of range")
    return name, key_size, mode, nonce, icv_len


def _plain_cbc_spec(algorithm: bytes) -> tuple[str, int, str, bytes, int] | None:
    """:func:`_content_spec` of a DER CBC AlgorithmIdentifier whose parameters are the
    IV, read without asn1crypto; None for anything else (the full path decides)."""
    top = der.element_at(algorithm, 0, len(algorithm))
    if top is None or top[0] != 0x30 or top[2] != len(algorithm):
        return None
    oid = der.element_at(algorithm, top[1], top[2])
    if oid is None or oid[0] != 0x06:
        return None
    params = der.element_at(algorithm, oid[2], top[2])
    if params is None or params[0] != 0x04 or params[2] != top[2]:
        return None
    name = _cipher_name(algorithm[top[1] : oid[2]])
    entry = _DECRYPT_CIPHERS.get(name)
    iv = algorithm[params[1] : params[2]]
    if entry is None or entry[1] != "cbc" or len(iv) != (8 if name == "tripledes_3key" else 16):
        return None
    return name, entry[0], "cbc", iv, 0


@lru_cache(maxsize=64)
def _cipher_name(encoded_oid: bytes) -> str:
    oid = _dotted(encoded_oid)
    return str(algos.EncryptionAlgorithmId._map.get(oid, oid))


def _decrypt_content(
    spec: tuple[str, int, str, bytes, int], cek: bytes, envelope: _Envelope
) -> bytes:
    """Decrypt and check; every failure is the same generic :class:`DecryptionFailed`."""
    name, _, mode, iv, icv_len = spec
    total = sum(len(c) for c in envelope.chunks)
    buf = bytearray(total + 16)
    view = memoryview(buf)
    n = 0
    if mode == "gcm":
        mac = envelope.mac or b""
        if len(mac) != icv_len:
            raise DecryptionFailed("decryption failed")
        aead = Cipher(algorithms.AES(cek), modes.GCM(iv, mac, min_tag_length=icv_len)).decryptor()
        if envelope.aad is not None:
            aead.authenticate_additional_data(envelope.aad)
        for chunk in envelope.chunks:
            n += aead.update_into(chunk, view[n:])
        try:
            n += len(aead.finalize())
        except InvalidTag:
            raise DecryptionFailed("decryption failed") from None
        view.release()
        del buf[n:]
        return bytes(buf)
    block = 8 if name == "tripledes_3key" else 16
    if total == 0 or total % block:
        raise DecryptionFailed("decryption failed")
    decryptor = Cipher(_block_cipher(name, cek), modes.CBC(iv)).decryptor()
    for chunk in envelope.chunks:
        n += decryptor.update_into(chunk, view[n:])
    decryptor.finalize()
    # PKCS#7 padding (RFC 5652 section 6.3); any failure gives the same generic error.
    pad = buf[n - 1]
    good = 1 <= pad <= block and hmac.compare_digest(bytes(view[n - pad : n]), bytes([pad]) * pad)
    view.release()
    if not good:
        raise DecryptionFailed("decryption failed")
    return bytes(memoryview(buf)[: n - pad])


# --------------------------------------------------------------------------- decrypt


def decrypt_data(data: bytes, keys: Sequence[KeyPair]) -> DecryptedData:
    """Open an EnvelopedData or AuthEnvelopedData ContentInfo (DER or BER).

    Only keys whose certificate a RecipientIdentifier names are tried (issuer and
    serial, or subject key identifier). Raises :class:`DecryptionFailed` when no key
    matches (listing the recipients, never key material) or when the matching keys do
    not open it (one generic message, whatever the cause); :class:`MalformedMessage`
    and :class:`UnsupportedAlgorithm` for input we cannot read.
    """
    try:
        return _decrypt(data, keys)
    except SMIMEProxyError:
        raise
    except _ASN1_ERRORS as e:
        raise MalformedMessage(f"malformed CMS enveloped data ({type(e).__name__})") from None


def _decrypt(data: bytes, keys: Sequence[KeyPair]) -> DecryptedData:
    envelope = _parse_envelope(data)
    spec = _content_spec(envelope.algorithm, envelope.content_type)
    plain = plain_key_transports(envelope.recipient_infos)
    if plain is not None:
        return _decrypt_plain(envelope, spec, plain, keys)
    infos = _recipient_infos(envelope)
    ids = [(pair, CertificateId.of(pair.certificate)) for pair in keys]
    named: list[RecipientIdentifier] = []
    candidates: list[tuple[RecipientEntry, KeyPair]] = []
    for entry in identified_recipients(infos):
        named.append(entry.identifier)
        candidates.extend((entry, pair) for pair, cid in ids if cid.matches(entry.identifier))
    if not candidates:
        listed = "; ".join(str(r) for r in named[:10]) or "none we can use"
        more = f" and {len(named) - 10} more" if len(named) > 10 else ""
        raise DecryptionFailed(f"no key for any recipient: {listed}{more}")
    # Implicit rejection (PKCS#1 v1.5) cannot fail early: try those candidates last, so
    # that a garbage "success" with a random CBC key cannot hide the right recipient.
    candidates.sort(key=lambda c: key_algorithm_name(c[0]) == "rsaes_pkcs1v15")
    unsupported: UnsupportedAlgorithm | None = None
    _, key_size, *_ = spec
    for entry, pair in candidates[:_MAX_ATTEMPTS]:
        try:
            if entry.encrypted_key is None:
                cek = unwrap_key_transport(entry.info, pair, key_size)
            else:
                params = kari.agreement_parameters(entry.info)
                cek = kari.unwrap_key(
                    params,
                    entry.encrypted_key["encrypted_key"].native,
                    pair.key,
                    cek_size=key_size,
                    recipient_public_key=pair.certificate.public_key(),
                )
            content = _decrypt_content(spec, cek, envelope)
        except UnsupportedAlgorithm as e:
            unsupported = e
            continue
        except DecryptionFailed:
            continue
        return DecryptedData(
            content=content,
            content_type=envelope.content_type,
            inner_content_type=envelope.inner_type,
            cipher=spec[0],
            key_algorithm=key_algorithm_name(entry),
            recipient=pair,
            integrity_protected=spec[2] == "gcm",
        )
    if unsupported is not None and len(candidates) == 1:
        raise unsupported
    raise DecryptionFailed("decryption failed with every matching key")


def _decrypt_plain(
    envelope: _Envelope,
    spec: tuple[str, int, str, bytes, int],
    recipients: list[tuple[RecipientIdentifier, bytes]],
    keys: Sequence[KeyPair],
) -> DecryptedData:
    """:func:`_decrypt` for RecipientInfos that are all RSA PKCS#1 v1.5 key transport
    (see :func:`plain_key_transports`): the same matching, order and errors."""
    ids = [(pair, CertificateId.of(pair.certificate)) for pair in keys]
    named = [identifier for identifier, _ in recipients]
    candidates = [
        (encrypted_key, pair)
        for identifier, encrypted_key in recipients
        for pair, cid in ids
        if cid.matches(identifier)
    ]
    if not candidates:
        listed = "; ".join(str(r) for r in named[:10]) or "none we can use"
        more = f" and {len(named) - 10} more" if len(named) > 10 else ""
        raise DecryptionFailed(f"no key for any recipient: {listed}{more}")
    for encrypted_key, pair in candidates[:_MAX_ATTEMPTS]:
        cek = unwrap_pkcs1v15(encrypted_key, pair, spec[1])
        try:
            content = _decrypt_content(spec, cek, envelope)
        except DecryptionFailed:
            continue
        return DecryptedData(
            content=content,
            content_type=envelope.content_type,
            inner_content_type=envelope.inner_type,
            cipher=spec[0],
            key_algorithm="rsaes_pkcs1v15",
            recipient=pair,
            integrity_protected=spec[2] == "gcm",
        )
    raise DecryptionFailed("decryption failed with every matching key")


# --------------------------------------------------------------------------- encrypt


def choose_cipher(capabilities: Sequence[Sequence[str] | None]) -> str:
    """The content cipher for these recipients (RFC 8551 section 2.7).

    One capability list per recipient, ``None`` when unknown. AES-GCM only if every
    recipient advertised GCM: AES-256-GCM when all named it, else AES-128-GCM (which
    RFC 8551 makes mandatory for every receiver that does GCM at all). Otherwise
    AES-256-CBC, which every S/MIME 3.2+ receiver supports. Not guaranteed: that a
    recipient's advertised capabilities are still current.
    """
    lists = [
        {c.lower().replace("-", "_") for c in caps} if caps is not None else None
        for caps in capabilities
    ]
    if not lists or any(caps is None for caps in lists):
        return "aes256_cbc"
    known = [caps for caps in lists if caps is not None]
    if all("aes256_gcm" in caps for caps in known):
        return "aes256_gcm"
    if all(any(c in caps for c in _GCM_CAPABILITIES) for caps in known):
        return "aes128_gcm"
    return "aes256_cbc"


def _header(tag: int, length: int) -> bytes:
    if length < 0x80:
        return bytes((tag, length))
    size = (length.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + length.to_bytes(size, "big")


def _tlv(tag: int, body: bytes) -> bytes:
    return _header(tag, len(body)) + body


#: Content-encryption algorithm OIDs (RFC 3565 section 4.1, RFC 5084 section 3.2).
_CIPHER_OIDS = {
    "aes128_cbc": "2.16.840.1.101.3.4.1.2",
    "aes256_cbc": "2.16.840.1.101.3.4.1.42",
    "aes128_gcm": "2.16.840.1.101.3.4.1.6",
    "aes256_gcm": "2.16.840.1.101.3.4.1.46",
}


@lru_cache(maxsize=16)
def _content_type_der(name: str) -> bytes:
    return bytes(cms.ContentType(name).dump())


def encrypt_data(
    content: bytes,
    recipients: Sequence[x509.Certificate | Recipient],
    *,
    cipher: str = "aes256_cbc",
    content_type: str = "data",
) -> bytes:
    """Encrypt ``content`` for every recipient; return a DER ContentInfo.

    ``*_cbc`` gives EnvelopedData, ``*_gcm`` AuthEnvelopedData (12-byte random nonce,
    16-byte ICV, no authAttrs). RSA certificates get key transport (PKCS#1 v1.5 unless
    :attr:`Recipient.oaep`), EC and X25519 certificates ephemeral-static key agreement
    with an AES key wrap as strong as the content key. Not checked here: whether the
    certificates are valid, trusted or allowed to encrypt (that is the PKI layer's job).
    """
    return bytes(encrypt_pieces([content], recipients, cipher=cipher, content_type=content_type))


def encrypt_pieces(
    pieces: Sequence[bytes | bytearray | memoryview],
    recipients: Sequence[x509.Certificate | Recipient],
    *,
    cipher: str = "aes256_cbc",
    content_type: str = "data",
) -> bytearray:
    """:func:`encrypt_data` of the concatenation of ``pieces``, as a ``bytearray``.

    The DER is written into one buffer of its final size: the pieces are encrypted
    straight into it, so a 10 MB content costs one 10 MB buffer, not the pieces of
    ciphertext and then their concatenation.
    """
    if cipher not in CIPHERS:
        raise UnsupportedAlgorithm(f"unsupported content cipher {cipher!r}; use one of {CIPHERS}")
    if not recipients:
        raise KeyNotFound("no recipients to encrypt to")
    key_size, mode = _DECRYPT_CIPHERS[cipher]
    wrap = "aes256_wrap" if key_size == 32 else "aes128_wrap"
    cek = os.urandom(key_size)
    infos = [
        recipient_info_der(r if isinstance(r, Recipient) else Recipient(r), cek, wrap)
        for r in recipients
    ]
    total = sum(memoryview(p).nbytes for p in pieces)
    padding = b""
    aead: AEADEncryptionContext | None = None
    context: CipherContext
    if mode == "gcm":
        nonce = os.urandom(_GCM_NONCE_SIZE)
        context = aead = Cipher(algorithms.AES(cek), modes.GCM(nonce)).encryptor()
        mac_len = 2 + _GCM_ICV_SIZE  # the mac OCTET STRING after the content
        # GCMParameters (RFC 5084 section 3.2): nonce, ICV length (16, not the default)
        parameters = der.sequence(der.tlv(0x04, nonce), der.integer(_GCM_ICV_SIZE))
        outer_oid, version = _AUTH_ENVELOPED, 0  # RFC 5083 section 2.1: always 0
    else:
        iv = os.urandom(16)
        context = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
        pad = 16 - total % 16  # PKCS#7 padding, RFC 5652 section 6.3
        padding = bytes([pad]) * pad
        mac_len = 0
        parameters = der.tlv(0x04, iv)
        # RFC 5652 section 6.1: version 0 only if every RecipientInfo is version 0.
        all_v0 = all(v0 for _, v0 in infos)
        outer_oid, version = _ENVELOPED, (0 if all_v0 else 2)
    algorithm = der.sequence(der.oid(_CIPHER_OIDS[cipher]), parameters)
    inner_oid = _content_type_der(content_type)
    ris = der.set_of(info for info, _ in infos)
    ciphertext_len = total + len(padding)
    ect_header = _header(0x80, ciphertext_len)  # [0] IMPLICIT OCTET STRING
    eci_len = len(inner_oid) + len(algorithm) + len(ect_header) + ciphertext_len
    eci_header = _header(0x30, eci_len)
    version_der = der.integer(version)
    env_len = len(version_der) + len(ris) + len(eci_header) + eci_len + mac_len
    env_header = _header(0x30, env_len)
    explicit_header = _header(0xA0, len(env_header) + env_len)
    outer_oid_der = der.oid(outer_oid)
    ci_len = len(outer_oid_der) + len(explicit_header) + len(env_header) + env_len
    prefix = b"".join(
        [
            _header(0x30, ci_len),
            outer_oid_der,
            explicit_header,
            env_header,
            version_der,
            ris,
            eci_header,
            inner_oid,
            algorithm,
            ect_header,
        ]
    )
    end = len(prefix) + ciphertext_len + mac_len
    # one spare block: update_into wants room for a block more than it is given
    out = bytearray(end + 16)
    out[: len(prefix)] = prefix
    view = memoryview(out)
    n = len(prefix)
    for piece in pieces:
        n += context.update_into(piece, view[n:])
    if padding:
        n += context.update_into(padding, view[n:])
    final = context.finalize()
    view[n : n + len(final)] = final
    n += len(final)
    if aead is not None:
        mac = _tlv(0x04, aead.tag)  # 16 bytes = _GCM_ICV_SIZE
        view[n : n + len(mac)] = mac
        n += len(mac)
    view.release()
    if n != end:  # pragma: no cover - a cipher that did not produce what it must
        raise SMIMEProxyError("encryption produced an unexpected length")
    del out[end:]
    return out


__all__ = [
    "CIPHERS",
    "MAX_RECIPIENTS",
    "DecryptedData",
    "Recipient",
    "RecipientIdentifier",
    "choose_cipher",
    "decrypt_data",
    "encrypt_data",
    "encrypt_pieces",
    "recipient_identifiers",
]
