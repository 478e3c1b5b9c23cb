"""Seal a message: sign it, encrypt it, or both (RFC 8551 section 3).

The outer header fields (From, To, Subject ...) stay outside; the content (its
``Content-*`` fields and body) is put in canonical form (CRLF line ends, 7-bit safe
transfer encodings, RFC 8551 section 3.1), signed as a detached ``multipart/signed``
(default, readable without S/MIME) or an opaque ``signed-data`` entity, then wrapped in
``enveloped-data`` or ``authEnveloped-data``. Sign-then-encrypt is the order (RFC 8551
section 3.7): the signature is inside, so nobody can strip it without decrypting first.

Not guaranteed: the caller chooses recipients and checks their certificates before
sealing (see :mod:`smimeproxy.pki.validation`); this module encrypts to whatever it is
given.
"""

from __future__ import annotations

import quopri
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

from smimeproxy.errors import MalformedMessage
from smimeproxy.smime import mime
from smimeproxy.smime.enveloped import Recipient, choose_cipher, encrypt_pieces
from smimeproxy.smime.headerprotect import protect
from smimeproxy.smime.keys import KeyPair
from smimeproxy.smime.signed import sign_pieces

#: micalg parameter values (RFC 8551 section 3.5.3.1; RFC 8419 section 5 for EdDSA)
MICALG = {"sha256": "sha-256", "sha384": "sha-384", "sha512": "sha-512"}

#: ``smime-type`` for each CMS content (RFC 8551 section 3.2.2)
SMIME_TYPE = {
    "enveloped_data": "enveloped-data",
    "authenticated_enveloped_data": "authEnveloped-data",
    "signed_data": "signed-data",
}


@dataclass(frozen=True)
class SealOptions:
    """How to seal. The defaults follow RFC 8551 and ``DESIGN.md``'s sending defaults."""

    detached: bool = True
    digest: str = "sha256"
    pss: bool = False
    #: ``None`` chooses from the recipients' advertised capabilities (RFC 8551 2.7)
    cipher: str | None = None
    oaep: bool = False
    header_protection: bool = False
    legacy_display: bool = False


@dataclass(frozen=True)
class EncryptionTarget:
    """A certificate to encrypt to, with what its owner advertised (None: unknown)."""

    certificate: x509.Certificate
    capabilities: tuple[str, ...] | None = None


def _canonical_leaf(entity: mime.Entity) -> None:
    """Give a leaf a 7-bit transfer encoding and CRLF line ends, in place."""
    ctype = entity.mime_type
    if mime.needs_transport_encoding(entity):
        raw = entity.decoded_body()
        if ctype.startswith("text/"):
            text = raw.replace(b"\r\n", b"\n")
            encoded = quopri.encodestring(text)
            entity.body = mime.to_crlf(encoded)
            entity.set("Content-Transfer-Encoding", "quoted-printable")
        else:
            entity.body = mime.base64_body(raw)
            entity.set("Content-Transfer-Encoding", "base64")
    else:
        entity.body = mime.to_crlf(entity.body)


def _crlf_field(field: mime.HeaderField) -> mime.HeaderField:
    raw = mime.to_crlf(field.raw)
    return mime.HeaderField(field.name, raw if raw.endswith(b"\r\n") else raw + b"\r\n")


def canonical_content(entity: mime.Entity, depth: int = 0) -> bytes:
    """The entity's content (Content-* fields and body) in canonical form, as bytes.

    Multiparts are rebuilt part by part with the same boundary, so a part that was
    already canonical stays byte for byte what it was.
    """
    return b"".join(_canonical_pieces(entity, depth))


def _canonical_pieces(entity: mime.Entity, depth: int = 0) -> list[bytes]:
    """:func:`canonical_content` as pieces (header, blank line, body), not joined."""
    if depth > 32:
        raise MalformedMessage("MIME nesting too deep")
    entity.eol = mime.CRLF
    entity.headers = [_crlf_field(h) for h in entity.headers]
    if entity.get("Content-Type") is None:
        entity.add("Content-Type", "text/plain; charset=us-ascii")
    if entity.mime_type == "multipart/signed":
        # already signed by someone: canonical line ends only, every other byte kept
        entity.body = mime.to_crlf(entity.body)
    elif entity.is_multipart():
        boundary = entity.content_type()[1].get("boundary", "")
        preamble, parts, epilogue, _ = mime.split_multipart(entity.body, boundary)
        delim = b"--" + boundary.encode()
        out = [mime.to_crlf(preamble) + b"\r\n"] if preamble else []
        for raw in parts:
            out.append(delim + b"\r\n" + canonical_content(mime.parse_entity(raw), depth + 1))
            out.append(b"\r\n")
        out.append(delim + b"--\r\n")
        if epilogue:
            out.append(mime.to_crlf(epilogue))
        entity.body = b"".join(out)
    else:
        _canonical_leaf(entity)
    return [entity.header_bytes(), b"\r\n", entity.body]


def _pkcs7_entity(der: bytes | bytearray, smime_type: str, body: bool = True) -> mime.Entity:
    entity = mime.Entity([], mime.base64_body(der) if body else b"", mime.CRLF)
    entity.add("Content-Type", f'application/pkcs7-mime; smime-type={smime_type}; name="smime.p7m"')
    entity.add("Content-Transfer-Encoding", "base64")
    entity.add("Content-Disposition", 'attachment; filename="smime.p7m"')
    return entity


def _micalg(signer: KeyPair, digest: str) -> str:
    if isinstance(signer.key.public_key(), ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "sha-512"
    return MICALG.get(digest, digest)


def seal(
    message: bytes,
    *,
    signer: KeyPair | None = None,
    chain: Sequence[x509.Certificate] = (),
    recipients: Sequence[EncryptionTarget | x509.Certificate] = (),
    options: SealOptions | None = None,
    encryption_certificate: x509.Certificate | None = None,
) -> bytes:
    """Sign (if ``signer``) and encrypt (if ``recipients``) ``message``.

    The sender's own certificate must be among ``recipients`` for the sender's copy to
    stay readable; the gateway adds it, this function does not guess. The output uses
    the line ending of the input.
    """
    options = options or SealOptions()
    if signer is None and not recipients:
        raise ValueError("nothing to do: neither a signer nor recipients")
    top = mime.parse_entity(message)
    eol = top.eol
    encrypting = bool(recipients)
    if options.header_protection:
        outer_headers, content = protect(
            top, encrypting=encrypting, legacy_display=options.legacy_display
        )
    else:
        outer_headers = top.other_headers()
        content = mime.Entity(top.content_headers(), top.body, top.eol)
    pieces = _canonical_pieces(content)
    # the pieces hold the canonical body; drop the parsed copy if canonicalising made one
    top.body = content.body = b""

    if signer is not None:
        der = sign_pieces(
            pieces,
            signer,
            chain=chain,
            detached=options.detached,
            digest=options.digest,
            pss=options.pss,
            encryption_certificate=encryption_certificate,
        )
        if options.detached:
            sig = mime.Entity([], mime.base64_body(der), mime.CRLF)
            sig.add("Content-Type", 'application/pkcs7-signature; name="smime.p7s"')
            sig.add("Content-Transfer-Encoding", "base64")
            sig.add("Content-Disposition", 'attachment; filename="smime.p7s"')
            sig.add("Content-Description", "S/MIME Cryptographic Signature")
            # build_multipart's bytes, left as pieces: the signed body is not copied
            boundary = mime.new_boundary()
            head = mime.Entity([], b"", mime.CRLF)
            params = (
                'protocol="application/pkcs7-signature"; '
                f"micalg={_micalg(signer, options.digest)}; "
            )
            head.set("Content-Type", f'multipart/signed; {params}boundary="{boundary}"')
            delim = b"--" + boundary.encode()
            crlf = mime.CRLF
            pieces = [
                *(head.header_bytes(), crlf, delim, crlf),
                *pieces,
                *(crlf, delim, crlf, sig.to_bytes(), crlf, delim, b"--", crlf),
            ]
        else:
            pieces = [_pkcs7_entity(der, SMIME_TYPE["signed_data"]).to_bytes()]

    out = mime.Entity(list(outer_headers), b"", mime.CRLF)
    out.headers = [_crlf_field(h) for h in out.headers if h.key != "mime-version"]
    out.add("MIME-Version", "1.0")
    if encrypting:
        targets = [
            r if isinstance(r, EncryptionTarget) else EncryptionTarget(r) for r in recipients
        ]
        cipher = options.cipher or choose_cipher([t.capabilities for t in targets])
        envelope = encrypt_pieces(
            pieces,
            [Recipient(t.certificate, oaep=options.oaep) for t in targets],
            cipher=cipher,
        )
        pieces = []  # the plaintext is no longer needed
        smime_type = "authEnveloped-data" if cipher.endswith("_gcm") else "enveloped-data"
        out.headers.extend(_pkcs7_entity(envelope, smime_type, body=False).headers)
        chunks = mime.base64_chunks(envelope)
        del envelope
        # one join of the header and the base64 blocks: the 10 MB output is built once
        return mime.to_eol(b"".join([out.header_bytes(), mime.CRLF, *chunks]), eol)

    payload = b"".join(pieces)
    del pieces
    result = mime.parse_entity(payload)
    out.headers.extend(result.headers)
    out.body = result.body
    return mime.to_eol(out.to_bytes(), eol)
