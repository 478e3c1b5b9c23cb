"""Open a message: decrypt, verify, and say exactly what was found (RFC 8551 section 3).

The S/MIME layers are peeled from the root of the message inwards, to a bounded depth:
``enveloped-data`` / ``authEnveloped-data`` is decrypted, opaque ``signed-data`` is
verified and unwrapped, ``multipart/signed`` is verified and *kept byte for byte* so a
client that verifies signatures itself still can. The result carries
``Authentication-Results`` (RFC 8601, method ``smime`` of RFC 7281), a decryption
header and a footer, after look-alikes of those from outside were removed.

Safety rules (DESIGN.md, "EFAIL and signature spoofing"):

* only the root is decrypted: an encrypted part that sits in a multipart beside other
  parts is never decrypted (EFAIL direct exfiltration, Poddebniak et al. 2018);
* a signature is "verified" only when it covers the whole message: a multipart/signed
  nested next to unsigned parts makes the message "partially signed";
* AES-CBC content without a valid signature inside is "not integrity protected".

Not guaranteed: certificate trust is the injected validator's verdict; without a
validator every signer stays unverified (``smime=policy``), never "pass".
"""

from __future__ import annotations

import email.utils
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from asn1crypto import cms as asn1_cms

from smimeproxy.errors import DecryptionFailed, MalformedMessage, SMIMEProxyError
from smimeproxy.smime import mime
from smimeproxy.smime.authresults import (
    DECRYPTION_HEADER,
    STATUS_HEADER,
    authentication_results,
    decryption_header,
    strip_lookalikes,
)
from smimeproxy.smime.der import element_at
from smimeproxy.smime.enveloped import decrypt_data
from smimeproxy.smime.footer import strip_footers, wrap_pieces
from smimeproxy.smime.headerprotect import unprotect
from smimeproxy.smime.keys import KeyPair
from smimeproxy.smime.signed import SignedDataResult, verify_data
from smimeproxy.smime.status import (
    CertificateValidator,
    Check,
    DecryptionStatus,
    HeaderProtectionStatus,
    MessageStatus,
    Outcome,
    SignerStatus,
)

PKCS7_MIME = ("application/pkcs7-mime", "application/x-pkcs7-mime")
PKCS7_SIGNATURE = ("application/pkcs7-signature", "application/x-pkcs7-signature")
_P7M_NAMES = (".p7m", ".p7s", ".p7c", ".p7z")


@dataclass(frozen=True)
class OpenOptions:
    """Policy for opening. ``authserv_id`` names us in ``Authentication-Results``."""

    authserv_id: str = "localhost"
    footer: bool = True
    #: S/MIME layers peeled at most (sign-encrypt-sign is three)
    max_depth: int = 6
    #: refuse to work on messages larger than this (bytes)
    max_size: int = 200 * 1024 * 1024
    #: where the message comes from. ``"transit"`` (from outside, the gateway): our own
    #: headers in it are forgeries and their removal is reported. ``"stored"`` (a
    #: mailbox the gateway already filled, read by the IMAP proxy or the archive): our
    #: headers there were written at delivery; they are replaced by fresh ones quietly.
    origin: str = "transit"


@dataclass(frozen=True)
class OpenedMessage:
    """The message as its recipient should see it, and its status."""

    data: bytes
    status: MessageStatus
    changed: bool = True
    #: every line of ``data`` ends with CRLF, and no CR or LF stands alone (it was
    #: built for a CRLF message and canonicalised): readers need not check again
    crlf: bool = False


@dataclass
class _State:
    layers: list[str] = field(default_factory=list)
    signers: list[SignerStatus] = field(default_factory=list)
    decryption: DecryptionStatus | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    partially_signed: bool = False
    covers_whole: bool = True
    protection: HeaderProtectionStatus | None = None


def is_pkcs7_mime(entity: mime.Entity) -> bool:
    ctype, params = entity.content_type()
    if ctype in PKCS7_MIME:
        return True
    if ctype == "application/octet-stream":
        name = params.get("name") or ""
        disposition = entity.get("Content-Disposition") or ""
        return name.lower().endswith(_P7M_NAMES) or ".p7m" in disposition.lower()
    return False


def cms_content_type(der: bytes) -> str:
    """``signed_data``, ``enveloped_data``, ``authenticated_enveloped_data`` or another name."""
    quick = _plain_content_type(der)
    if quick is not None:
        return quick
    try:
        info = asn1_cms.ContentInfo.load(der)
        return str(info["content_type"].native)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
        raise MalformedMessage(f"not a CMS object: {e}") from None


def _plain_content_type(data: bytes) -> str | None:
    """The content type of a plain DER ContentInfo read from its first bytes, without
    asn1crypto (which costs more here than the rest of this function's callers); None
    for anything else (BER, odd tags), which then takes the full parser."""
    try:
        outer = element_at(data, 0, len(data))
        if outer is None or outer[0] != 0x30:
            return None
        oid = element_at(data, outer[1], outer[2])
        if oid is None or oid[0] != 0x06:
            return None
        content = element_at(data, oid[2], outer[2])
        if content is None or content[0] != 0xA0:
            return None
        return _content_type_name(data[outer[1] : oid[2]])
    except (ValueError, TypeError, KeyError, IndexError, OverflowError):
        return None


@functools.lru_cache(maxsize=64)
def _content_type_name(encoded_oid: bytes) -> str:
    """Cached: the same few content types come in every message."""
    return str(asn1_cms.ContentType.load(encoded_oid).native)


def sender_address(entity: mime.Entity) -> str | None:
    """The single address of the From field, lower-cased; None when absent or ambiguous."""
    values = entity.get_all("From")
    if len(values) != 1:
        return None
    return _single_address(values[0]) if len(values[0]) <= 1000 else _address_of(values[0])


@functools.lru_cache(maxsize=1024)
def _single_address(value: str) -> str | None:
    """Cached: email's address parser costs more than the rest of the header work."""
    return _address_of(value)


def _address_of(value: str) -> str | None:
    addresses = [a for _, a in email.utils.getaddresses([value]) if a]
    if len(addresses) != 1:
        return None
    return addresses[0].lower()


def _signer_statuses(
    result: SignedDataResult,
    validator: CertificateValidator | None,
    sender: str | None,
) -> list[SignerStatus]:
    out = []
    for info in result.signers:
        cert_status = None
        if info.certificate is not None and validator is not None:
            cert_status = validator.validate(
                info.certificate,
                purpose="sign",
                extra_certificates=result.certificates,
                sender=sender,
            )
        out.append(
            SignerStatus(
                certificate=info.certificate,
                digest_algorithm=info.digest_algorithm,
                signature_algorithm=info.signature_algorithm,
                checks=info.checks,
                certificate_status=cert_status,
                signing_time=info.signing_time,
                capabilities=info.capabilities,
                errors=info.errors,
            )
        )
    if not out:
        out.append(
            SignerStatus(
                certificate=None,
                digest_algorithm="",
                signature_algorithm="",
                checks=(Check("signature", Outcome.FAIL, "the signed data has no signer"),),
                certificate_status=None,
            )
        )
    return out


def _verify_clear_signed(entity: mime.Entity) -> tuple[bytes, SignedDataResult]:
    """Verify a multipart/signed entity; return the signed part's bytes and the result."""
    boundary = entity.content_type()[1].get("boundary", "")
    _, parts, _, _ = mime.split_multipart(entity.body, boundary)
    if len(parts) != 2:
        raise MalformedMessage(f"multipart/signed with {len(parts)} parts instead of 2")
    signed_bytes, sig_raw = parts
    sig = mime.parse_entity(sig_raw)
    if sig.mime_type not in PKCS7_SIGNATURE:
        raise MalformedMessage(f"multipart/signed whose second part is {sig.mime_type}")
    der = sig.decoded_body()
    canonical = mime.to_crlf(signed_bytes)
    result = verify_data(der, canonical)
    if canonical != signed_bytes and not all(s.valid for s in result.signers):
        # a signer that did not canonicalise (rare): try the bytes as they stand
        raw_result = verify_data(der, signed_bytes)
        if all(s.valid for s in raw_result.signers):
            result = raw_result
    return signed_bytes, result


def _scan_nested(
    entity: mime.Entity,
    state: _State,
    validator: CertificateValidator | None,
    sender: str | None,
    depth: int,
) -> None:
    """Look into a multipart that is not itself an S/MIME layer: refuse, flag, report."""
    if depth > 32:
        raise MalformedMessage("MIME nesting too deep")
    boundary = entity.content_type()[1].get("boundary", "")
    _, parts, _, _ = mime.split_multipart(entity.body, boundary)
    for raw in parts:
        part = mime.parse_entity(raw)
        if is_pkcs7_mime(part):
            try:
                kind = cms_content_type(part.decoded_body())
            except MalformedMessage:
                continue
            if kind in ("enveloped_data", "authenticated_enveloped_data"):
                state.errors.append(
                    "an encrypted part inside a multipart with other parts was not decrypted "
                    "(only a message that is encrypted as a whole is decrypted)"
                )
            elif kind == "signed_data":
                state.partially_signed = True
        elif part.mime_type == "multipart/signed":
            state.partially_signed = True
            try:
                _, result = _verify_clear_signed(part)
                state.signers.extend(_signer_statuses(result, validator, sender))
            except SMIMEProxyError as e:
                state.errors.append(f"nested signed part: {e}")
        elif part.is_multipart():
            _scan_nested(part, state, validator, sender, depth + 1)


def _peel(
    top: mime.Entity,
    keys: Sequence[KeyPair],
    validator: CertificateValidator | None,
    sender: str | None,
    options: OpenOptions,
    state: _State,
) -> tuple[mime.Entity, mime.Entity | None, bool]:
    """Peel S/MIME layers off the root. Returns (content to show, the innermost content
    root that may carry protected headers, whether anything was changed).

    The root's body is taken out of ``top`` (``top.body`` is left empty), so that a big
    encrypted body is freed as soon as it is decoded; a caller that shows the message
    unchanged puts it back (see :func:`_restore_body`).
    """
    current = mime.Entity(top.content_headers(), top.body, top.eol)
    top.body = b""
    changed = False
    hp_root: mime.Entity | None = None
    for _ in range(options.max_depth + 1):
        if len(state.layers) >= options.max_depth:
            state.errors.append(f"more than {options.max_depth} S/MIME layers; stopped there")
            break
        if is_pkcs7_mime(current):
            der = current.decoded_body()
            kind = cms_content_type(der)
            if kind in ("enveloped_data", "authenticated_enveloped_data"):
                layer = "enveloped" if kind == "enveloped_data" else "auth-enveloped"
                state.layers.append(layer)
                # an undecryptable message is shown from the original, never from here:
                # the base64 text can go before the content is decrypted beside it
                current.body = b""
                try:
                    opened = decrypt_data(der, keys)
                except DecryptionFailed as e:
                    state.decryption = DecryptionStatus(False, kind, error=str(e))
                    break
                del der
                if state.decryption is None or not state.decryption.decrypted:
                    state.decryption = DecryptionStatus(
                        True,
                        kind,
                        cipher=opened.cipher,
                        key_algorithm=opened.key_algorithm,
                        recipient=opened.recipient.certificate,
                        integrity_protected=opened.integrity_protected,
                    )
                current = mime.parse_entity(opened.content)
                del opened  # parse_entity copied the body; the decrypted bytes can go
                changed = True
                continue
            if kind == "signed_data":
                state.layers.append("opaque-signed")
                result = verify_data(der)
                state.signers.extend(_signer_statuses(result, validator, sender))
                current = mime.parse_entity(result.content)
                changed = True
                continue
            state.warnings.append(f"S/MIME object of type {kind} left as it is")
            break
        if current.mime_type == "multipart/signed":
            state.layers.append("signed")
            signed_bytes, result = _verify_clear_signed(current)
            state.signers.extend(_signer_statuses(result, validator, sender))
            inner = mime.parse_entity(signed_bytes)
            hp_root = inner
            if is_pkcs7_mime(inner) or inner.mime_type == "multipart/signed":
                # encrypt-then-sign or sign-then-sign: look inside as well; the outer
                # signature then no longer covers what is shown
                current = inner
                changed = True
                continue
            return current, hp_root, changed
        if current.is_multipart():
            _scan_nested(current, state, validator, sender, 0)
            if state.partially_signed:
                state.covers_whole = False
        break
    return current, hp_root or current, changed


def _status(state: _State, sender: str | None, malformed: bool = False) -> MessageStatus:
    warnings = list(state.warnings)
    status = MessageStatus(
        layers=tuple(state.layers),
        decryption=state.decryption,
        signers=tuple(state.signers),
        signature_covers_whole=state.covers_whole,
        partially_signed=state.partially_signed,
        header_protection=state.protection,
        errors=tuple(state.errors),
        warnings=tuple(warnings),
        malformed=malformed,
        from_address=sender,
    )
    if status.decryption and status.decryption.decrypted and not status.integrity_protected:
        warnings.append(
            "encrypted with a mode that does not protect integrity (AES-CBC) and not signed: "
            "the content may have been altered"
        )
        status = replace(status, warnings=tuple(warnings))
    return status


def _finish(
    top: mime.Entity,
    outer_headers: list[mime.HeaderField],
    content: mime.Entity | None,
    status: MessageStatus,
    options: OpenOptions,
    flag: str | None = None,
) -> bytes:
    out = mime.Entity(list(outer_headers), b"", top.eol)
    body_pieces: list[bytes] = []
    if content is not None:
        body_entity = mime.Entity(
            [mime.HeaderField(h.name, h.raw) for h in content.content_headers()],
            content.body,
            content.eol,
        )
        if options.footer and (status.signed or status.encrypted or status.errors):
            wrapped, body_pieces = wrap_pieces(body_entity, status)
            out.headers = [h for h in out.headers if h.key != "mime-version"]
            out.add("MIME-Version", "1.0")
            out.headers.extend(wrapped.content_headers())
        else:
            out.headers.extend(body_entity.headers)
            out.body = body_entity.body
    else:
        out.headers.extend(top.content_headers())
        out.body = top.body
    results = authentication_results(options.authserv_id, status)
    out.add("Authentication-Results", results, first=True)
    dec = decryption_header(status)
    if dec:
        out.add(DECRYPTION_HEADER, dec, first=True)
    if flag:
        out.add(STATUS_HEADER, flag, first=True)
    # one join of header and body pieces: the whole message is built once
    data = b"".join([out.header_bytes(), out.eol, out.body, *body_pieces])
    return mime.to_eol(data, top.eol) if content is not None else data


def open_message(
    message: bytes,
    *,
    keys: Sequence[KeyPair] = (),
    validator: CertificateValidator | None = None,
    options: OpenOptions | None = None,
) -> OpenedMessage:
    """Open ``message`` for its recipient: decrypt with ``keys``, verify with ``validator``.

    Never raises for bad input: a message that cannot be processed comes back with its
    body unchanged, flagged in ``X-SMIMEProxy-Status`` and in the status object.
    """
    options = options or OpenOptions()
    if len(message) > options.max_size:
        status = MessageStatus(errors=("message too large to open",), malformed=True)
        top = mime.parse_entity(message)
        strip_lookalikes(top, options.authserv_id)
        data = _finish(top, top.other_headers(), None, status, options, "too-large; unchanged")
        return OpenedMessage(data, status, changed=False)
    top = mime.parse_entity(message)
    removed = strip_lookalikes(top, options.authserv_id)
    sender = sender_address(top)
    state = _State()
    if removed and options.origin == "transit":
        names = ", ".join(sorted(set(removed)))
        state.warnings.append(f"removed look-alike status headers: {names}")
    # _peel takes the body out of ``top``, so a big encrypted body is freed once decoded;
    # where the message is shown unchanged, it is cut from ``message`` again (its tail)
    body_length = len(top.body)
    try:
        content, hp_root, changed = _peel(top, keys, validator, sender, options, state)
    except SMIMEProxyError as e:
        state.errors.append(str(e))
        status = _status(state, sender, malformed=True)
        _restore_body(top, message, body_length)
        data = _finish(top, top.other_headers(), None, status, options, "malformed; unchanged")
        return OpenedMessage(data, status, changed=False)

    outer_headers = top.other_headers()
    if hp_root is not None and hp_root.get("Content-Type"):
        verified = [s.identity for s in state.signers if s.verified]
        merged, payload, protection = unprotect(top, hp_root, signer_addresses=verified)
        if hp_root is content:
            # legacy display elements go; a multipart/signed stays byte for byte
            content = payload
        if protection.restored or protection.mismatches:
            state.protection = protection
            # protected headers come from the sender: no look-alikes of ours from there either
            restored = mime.Entity([h for h in merged if h.key != "mime-version"], b"", top.eol)
            strip_lookalikes(restored, options.authserv_id)
            outer_headers = restored.headers
    if changed or state.layers:
        content, footers = strip_footers(content)
        if footers:
            state.warnings.append("removed a look-alike smimeproxy footer from the content")
    status = _status(state, sender)
    failed_decrypt = status.decryption is not None and not status.decryption.decrypted
    if failed_decrypt:
        _restore_body(top, message, body_length)
        data = _finish(top, top.other_headers(), None, status, options, "undecryptable; unchanged")
        return OpenedMessage(data, status, changed=False)
    hp_root = None  # may hold a copy of the signed part: not needed any more
    data = _finish(top, outer_headers, content, status, options)
    # _finish canonicalises the line ends of a message with content to the message's own
    return OpenedMessage(data, status, crlf=content is not None and top.eol == mime.CRLF)


def _restore_body(top: mime.Entity, message: bytes, body_length: int) -> None:
    """Put the root's body back into ``top``: parse_entity made it the tail of ``message``."""
    top.body = message[len(message) - body_length :] if body_length else b""
