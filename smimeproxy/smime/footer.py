"""The human footer: who signed, whether that was verified, whether it was encrypted.

The footer is added *around* the message, never into it: the original content (headers
that describe it and its body, byte for byte) becomes the first part of a new
``multipart/mixed`` and the footer the second, so a ``multipart/signed`` part stays
verifiable by a client that checks signatures itself.

Signer names, certificate subjects and error texts come from whoever sent the message:
every one of them is stripped of control and bidirectional-override characters, bounded
and, in HTML, escaped. The HTML has no remote resources.

A footer part carries :data:`FOOTER_MARKER_HEADER`, so that :func:`strip_footers` can
remove look-alikes planted from outside and our own footers when a message comes back
(forwarded, saved to Sent). Not guaranteed: parts inside a ``multipart/signed`` or an
encrypted part are never touched, so a footer look-alike the *signer* put into signed
content stays (the signer is named in the real footer).
"""

from __future__ import annotations

import html
import quopri
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from smimeproxy.errors import MalformedMessage
from smimeproxy.smime.mime import (
    CRLF,
    Entity,
    HeaderField,
    build_multipart,
    delimiter_lines,
    new_boundary,
    parse_entity,
)
from smimeproxy.smime.status import Check, MessageStatus, Outcome, SignerStatus

#: on the footer MIME part, so we can recognise it
FOOTER_MARKER_HEADER = "X-SMIMEProxy-Footer"
FOOTER_MARKER_VALUE = "1"
#: the first line of the footer text (RFC 3676 section 4.3 signature separator)
SEPARATOR = "-- "
MAX_FIELD = 200
MAX_DEPTH = 32
#: footers that appear only once in a wrapper we made are unwrapped again
_WRAPPER = "multipart/mixed"


# -- words ---------------------------------------------------------------------------------
def clean(text: str, limit: int = MAX_FIELD) -> str:
    """``text`` without control, format (bidi override) or line-separator characters."""
    if len(text) <= _CACHED_TEXT_LIMIT:
        return _clean_cached(text, limit)
    return _clean(text, limit)


#: clean() looks at every character; the same names and texts recur in every footer
_CACHED_TEXT_LIMIT = 1000


@lru_cache(maxsize=1024)
def _clean_cached(text: str, limit: int) -> str:
    return _clean(text, limit)


def _clean(text: str, limit: int) -> str:
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\t\r\n" or cat in ("Zl", "Zp"):
            out.append(" ")
        elif cat not in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(ch)
    cleaned = re.sub(r"\s+", " ", "".join(out)).strip()
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip() + "..."
    return cleaned


_CIPHER = re.compile(r"^aes(\d+)_(cbc|gcm|ccm|wrap)$")
_CIPHER_NAMES = {
    "tripledes_3key": "Triple-DES",
    "des": "DES",
    "rc2": "RC2",
    "chacha20_poly1305": "ChaCha20-Poly1305",
}


def cipher_name(cipher: str | None) -> str:
    """``aes256_gcm`` -> ``AES-256-GCM``; unknown names are shown as they are."""
    if not cipher:
        return "an unknown cipher"
    m = _CIPHER.match(cipher)
    if m:
        return f"AES-{m.group(1)}-{m.group(2).upper()}"
    return _CIPHER_NAMES.get(cipher, clean(cipher, 40))


def _issuer(signer: SignerStatus) -> str | None:
    cs = signer.certificate_status
    if cs is not None and len(cs.chain) > 1:
        return clean(cs.chain[1].subject.rfc4514_string())
    if signer.certificate is not None:
        return clean(signer.certificate.issuer.rfc4514_string())
    return None


def _problems(checks: tuple[Check, ...]) -> list[str]:
    return [
        clean(f"{c.name}: {c.detail}" if c.detail else f"{c.name} failed", 120)
        for c in checks
        if c.outcome in (Outcome.FAIL, Outcome.UNKNOWN)
    ]


def _signer_line(signer: SignerStatus, whole: bool) -> str:
    who = clean(signer.identity)
    issuer = _issuer(signer)
    if not signer.cryptographically_valid:
        reasons = _problems(signer.checks) or [clean(e, 120) for e in signer.errors]
        return (
            f"Signed by {who}: the signature is NOT valid (the message may have been altered): "
            + ("; ".join(reasons) or "bad signature")
            + "."
        )
    cs = signer.certificate_status
    if cs is None:
        return f"Signed by {who}: signature NOT verified: the signer's certificate is missing."
    if not cs.trusted:
        reasons = _problems(cs.checks) or ["no path to a trusted certificate authority"]
        return f"Signed by {who}: signature NOT verified: " + "; ".join(reasons) + "."
    by = f" (certificate issued by {issuer})" if issuer else ""
    if not whole:
        return f"Signed by {who}: signature valid{by}, but it does not cover the whole message."
    return f"Signed by {who}: signature verified{by}."


def footer_lines(status: MessageStatus) -> list[str]:
    """The footer as plain sentences, one per line, attacker text already cleaned."""
    lines: list[str] = []
    whole = status.signature_covers_whole and not status.partially_signed
    if status.malformed:
        lines.append(
            "This message could not be checked because it is malformed; it is shown as it arrived."
        )
    for signer in status.signers:
        lines.append(_signer_line(signer, whole))
    if status.partially_signed or (status.signers and not status.signature_covers_whole):
        lines.append(
            "Only part of this message is signed: text outside the signed part was NOT checked"
            " and may come from someone else."
        )
    if not status.signers and not status.partially_signed:
        lines.append("This message is not signed: the sender is not confirmed.")
    dec = status.decryption
    if dec is not None:
        if not dec.decrypted:
            lines.append(
                "This message is encrypted but could not be decrypted: "
                + clean(dec.error or "no key for any recipient", 160)
                + "."
            )
        elif status.integrity_protected:
            lines.append(f"Encrypted ({cipher_name(dec.cipher)}, integrity protected).")
        else:
            lines.append(
                f"Encrypted with {cipher_name(dec.cipher)} without a valid signature: not"
                " integrity protected (it could have been altered on the way)."
            )
    hp = status.header_protection
    if hp is not None:
        for mismatch in hp.mismatches:
            lines.append("Header mismatch: " + clean(mismatch) + ".")
    for error in status.errors:
        lines.append("Problem: " + clean(error) + ".")
    for warning in status.warnings:
        lines.append("Warning: " + clean(warning) + ".")
    return list(dict.fromkeys(lines))


def footer_text(status: MessageStatus) -> str:
    """The footer as plain text, starting with the ``-- `` separator line."""
    return _text(footer_lines(status))


def _text(lines: list[str]) -> str:
    return "\n".join([SEPARATOR, "smimeproxy:", *lines]) + "\n"


def footer_html(status: MessageStatus) -> str:
    """The same words as HTML, every piece escaped; no scripts, images or remote links."""
    return _html(footer_lines(status))


def _html(lines: list[str]) -> str:
    items = "".join(f"<li>{html.escape(line, quote=True)}</li>\n" for line in lines)
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>smimeproxy</title></head>\n'
        '<body><div class="smimeproxy-footer" style="border-top:1px solid #888;'
        'margin-top:1em;padding-top:0.5em;font-family:sans-serif;font-size:smaller">\n'
        f"<p><b>smimeproxy</b></p>\n<ul>\n{items}</ul>\n</div></body></html>\n"
    )


# -- building the footer part -----------------------------------------------------------
def _qp(text: str, eol: bytes) -> bytes:
    """Quoted-printable (RFC 2045 section 6.7) with the message's own line ends."""
    data = quopri.encodestring(text.replace("\r\n", "\n").encode("utf-8"))
    return data.replace(b"\n", eol)


def _leaf(content_type: str, text: str, eol: bytes) -> bytes:
    headers = (
        f"Content-Type: {content_type}; charset=utf-8".encode()
        + eol
        + b"Content-Transfer-Encoding: quoted-printable"
        + eol
    )
    return headers + eol + _qp(text, eol)


def _leaves(lines: tuple[str, ...], eol: bytes) -> tuple[bytes, bytes]:
    """The text and HTML parts for these footer sentences."""
    return (
        _leaf("text/plain", _text(list(lines)), eol),
        _leaf("text/html", _html(list(lines)), eol),
    )


#: the same few footers recur (same senders, same verdicts): encode each once
_leaves_cached = lru_cache(maxsize=256)(_leaves)


def footer_part(status: MessageStatus, eol: bytes = CRLF) -> Entity:
    """The footer MIME part: ``multipart/alternative`` of text and HTML, marked as ours."""
    marker = [
        HeaderField.make("Content-Disposition", "inline", eol),
        HeaderField.make(FOOTER_MARKER_HEADER, FOOTER_MARKER_VALUE, eol),
    ]
    lines = tuple(footer_lines(status))  # once for both alternatives
    leaves = _leaves_cached(lines, eol) if sum(map(len, lines)) <= 8192 else _leaves(lines, eol)
    part = build_multipart(
        [],
        "alternative",
        list(leaves),
        eol=eol,
    )
    part.headers.extend(marker)
    return part


def wrap_with_footer(entity: Entity, status: MessageStatus) -> Entity:
    """A NEW message: ``entity``'s content as part 1 of a ``multipart/mixed``, the footer part 2.

    The message's other header fields stay on the outside (in order), ``MIME-Version:
    1.0`` is set; part 1 is the original Content-* fields (their raw bytes) and the
    original body, unchanged. ``entity`` itself is not modified.
    """
    wrapper, pieces = wrap_pieces(entity, status)
    wrapper.body = b"".join(pieces)
    return wrapper


def wrap_pieces(entity: Entity, status: MessageStatus) -> tuple[Entity, list[bytes]]:
    """:func:`wrap_with_footer` as the wrapper's header fields (its body empty) and the
    pieces of its body, not joined: the caller joins them once into the whole message,
    so a 10 MB body is copied once, not three times."""
    eol = entity.eol
    content = entity.content_headers()
    outside = [HeaderField(h.name, h.raw) for h in entity.other_headers()]
    footer = footer_part(status, eol).to_bytes()
    boundary = new_boundary()
    wrapper = build_multipart(outside, "mixed", [], eol=eol, boundary=boundary)
    wrapper.body = b""
    delim = b"--" + boundary.encode()
    # build_multipart's layout: each part between delimiter lines, then the closing one
    pieces = [
        *(delim, eol, b"".join(h.raw for h in content), eol, entity.body, eol),
        *(delim, eol, footer, eol),
        *(delim, b"--", eol),
    ]
    wrapper.add("MIME-Version", "1.0")
    # a multipart may only be as "wide" as its widest part (RFC 2045 section 6.4)
    cte = entity.transfer_encoding()
    if cte in ("8bit", "binary") or not entity.body.isascii():
        wrapper.add("Content-Transfer-Encoding", "binary" if cte == "binary" else "8bit")
    return wrapper, pieces


# -- removing footers ---------------------------------------------------------------------
@dataclass
class _Span:
    """One part of a multipart body: its delimiter line and its bytes, as offsets."""

    delim_start: int
    start: int
    end: int


def part_spans(body: bytes, boundary: str) -> tuple[list[_Span], int | None]:
    """Offsets of each part of a multipart body and of the closing delimiter (if any).

    Uses the delimiter rule of :func:`smimeproxy.smime.mime.split_multipart` (the line end
    before a delimiter belongs to it), so that parts can be cut out of ``body`` leaving
    every other byte where it was.
    """
    spans: list[_Span] = []
    for start, end, closing in delimiter_lines(body, boundary):
        if spans:
            spans[-1].end = start
        if closing:
            return spans, start
        spans.append(_Span(start, end, len(body)))
    return spans, None


def _is_footer(part: Entity) -> bool:
    return part.get(FOOTER_MARKER_HEADER) is not None


def _untouchable(part: Entity) -> bool:
    mime_type = part.mime_type
    return mime_type in ("multipart/signed", "multipart/encrypted")


def _strip_body(entity: Entity, depth: int) -> tuple[bytes, int, bytes | None]:
    """(new body, footers removed, the single remaining part if the wrapper should go)."""
    if depth > MAX_DEPTH:
        raise MalformedMessage("MIME nesting too deep")
    if not entity.is_multipart() or _untouchable(entity):
        return entity.body, 0, None
    body = entity.body
    spans, closing = part_spans(body, entity.content_type()[1].get("boundary", ""))
    if not spans:
        return body, 0, None
    removed = 0
    pieces = [body[: spans[0].delim_start]]
    kept: list[tuple[int, bytes]] = []
    for index, span in enumerate(spans):
        raw = body[span.start : span.end]
        part = parse_entity(raw)
        if _is_footer(part):
            removed += 1
            continue
        new_raw = raw
        if part.is_multipart() and not _untouchable(part):
            new_body, n, single = _strip_body(part, depth + 1)
            if single is not None:
                new_raw, removed = single, removed + n
            elif n:
                new_raw, removed = raw[: len(raw) - len(part.body)] + new_body, removed + n
        pieces.append(body[span.delim_start : span.start] + new_raw)
        kept.append((index, new_raw))
    if closing is not None:
        pieces.append(body[closing:])
    new_body = b"".join(pieces)
    own_removed = len(spans) - len(kept)
    if own_removed and entity.mime_type == _WRAPPER and len(kept) == 1 and kept[0][0] == 0:
        return new_body, removed, kept[0][1]
    return new_body, removed, None


def strip_footers(entity: Entity) -> tuple[Entity, int]:
    """Remove every footer part (ours or a look-alike) from ``entity``; return the count.

    Parts carrying :data:`FOOTER_MARKER_HEADER` are removed at any depth of nested
    multiparts (never inside ``multipart/signed`` or ``multipart/encrypted``). A
    ``multipart/mixed`` that is left with only its first part (the shape
    :func:`wrap_with_footer` makes) is unwrapped: at the top, the message's non-content
    headers get that part's content headers. All other bytes stay as they were.
    ``entity`` itself is not modified.
    """
    new_body, removed, single = _strip_body(entity, 0)
    if not removed:
        return Entity(list(entity.headers), entity.body, entity.eol, entity.terminated), 0
    if single is None:
        return Entity(list(entity.headers), new_body, entity.eol, entity.terminated), removed
    inner = parse_entity(single)
    outside = [h for h in entity.headers if not h.key.startswith("content-")]
    has_version = any(h.key == "mime-version" for h in outside)
    inside = [h for h in inner.headers if not (has_version and h.key == "mime-version")]
    return Entity(outside + inside, inner.body, entity.eol, True), removed
